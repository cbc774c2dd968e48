"""Model adapter: load a chat model and find what the method needs in it.

``ChatModel`` bundles a ``transformers`` causal LM with its tokenizer and the places the refusal
direction lives in: the decoder layers (whose inputs are the residual stream), the embeddings,
and every module that writes into the residual stream (attention and MLP output projections).
Nothing here is hard-coded per family: layers are found by path suffix, writers by known
attribute paths, and the post-instruction tokens are derived from the chat template itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .errors import RefusalError, UnsupportedModelError
from .progress import log

SUPPORTED_FAMILIES = "Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, GPT-2, GPT-NeoX, OLMo 2"

# Where the decoder layers live, by the suffix of their ModuleList's name.
_LAYER_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
)
# Residual-stream writers inside one decoder layer, tried in order.
_ATTN_OUT = ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attention.dense", "attn.out_proj", "self_attn.out_proj")
_MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "mlp.fc_out", "fc2")
# Extra embeddings added straight into the residual stream (learned positions).
_POSITION_EMBEDDINGS = ("wpe", "embed_positions")

REFUSAL_WORDS = ("I", "As", "Sorry", "I'm", "Unfortunately", "Apologies")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A transformers PreTrainedModel / tokenizer. Typed loosely: their attributes reach mypy through
# nn.Module.__getattr__ (Tensor | Module) and untyped tokenizer classes.
HFModel = Any
Tokenizer = Any


@dataclass
class Writer:
    """A weight that writes into the residual stream: an embedding, or a layer's attention or MLP output.

    ``rows`` is the weight's orientation, found once here: True when the written vectors are its
    rows (``nn.Embedding`` [vocab, d_model], GPT-2's ``Conv1D`` [in, d_model]), False when they are its
    columns (``nn.Linear`` [d_model, in]). ``weight_name``/``bias_name`` are the parameters' names
    in ``model.state_dict()``. ``gain`` is set when a normalisation with elementwise gains sits
    between the module and the residual add (Gemma 2/3, OLMo 2 "post-norms"): the module's output is
    then orthogonal to the residual direction u after the norm exactly when it is orthogonal to
    gain * u before it. Embeddings count as layer 0.
    """

    module: nn.Module
    component: str  # "embed", "attn" or "mlp"
    layer: int
    gain: torch.Tensor | None = None
    rows: bool = False
    weight_name: str = ""
    bias_name: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.module.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return cast(torch.Tensor, self.module.bias) if self.bias_name is not None else None

    def direction(self, unit: torch.Tensor) -> torch.Tensor:
        """The unit direction to remove from this module's raw output (float32)."""
        if self.gain is None:
            return unit
        u = self.gain.to(unit.device) * unit
        return u / u.norm().clamp_min(1e-12)


@dataclass
class ChatModel:
    """A causal LM, its tokenizer and the parts of it the refusal method reads and edits."""

    model: HFModel
    tokenizer: Tokenizer
    source: str  # what the user named: "demo", a hub id, a path
    layers: nn.ModuleList
    embeddings: list[Writer]  # component "embed": token embedding, then learned positions
    writers: list[Writer]  # component "attn" / "mlp", in layer order
    chat_template: str | None = None
    path: str = ""  # the resolved location a reload uses (local directory or hub id); defaults to source
    trust_remote_code: bool = False
    template_kwargs: dict = field(default_factory=lambda: {"enable_thinking": False})
    _post_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.path:
            self.path = self.source

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self):
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def n_heads(self) -> int:
        """Attention heads per layer (query heads)."""
        config = self.text_config
        for key in ("num_attention_heads", "n_head"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        raise UnsupportedModelError(f"{type(self.model).__name__}'s config names no attention head count")

    @property
    def head_dim(self) -> int:
        """Dimension of one attention head (the config's ``head_dim`` where it sets one)."""
        value = getattr(self.text_config, "head_dim", None)
        return value if isinstance(value, int) and value > 0 else self.d_model // self.n_heads

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes, if its config says."""
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(self.text_config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # ---- chat formatting -------------------------------------------------------------------
    def format_chat(self, instruction: str) -> str:
        """The instruction as one user turn plus the assistant generation prompt."""
        messages = [{"role": "user", "content": instruction}]
        kwargs = dict(tokenize=False, add_generation_prompt=True, **self.template_kwargs)
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def encode(self, instruction: str) -> list[int]:
        """Token ids of the chat-formatted instruction (the template supplies special tokens)."""
        return self.tokenizer(self.format_chat(instruction), add_special_tokens=False)["input_ids"]

    @property
    def post_instruction_ids(self) -> list[int]:
        """Template tokens after the user's instruction, e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``.

        Derived by rendering several different instructions and taking the longest common token
        suffix: whatever the template appends after any instruction is exactly that suffix.
        """
        if self._post_ids is None:
            probes = ["Say hello", "What is two plus two?", "List three colours."]
            suffixes = [self._tokens_after_instruction(p) for p in probes]
            n = 0
            while all(len(x) > n for x in suffixes) and len({x[-1 - n] for x in suffixes}) == 1:
                n += 1
            if n == 0:
                raise RefusalError(
                    "the chat template appends no tokens after the user's instruction, so there are no "
                    "post-instruction positions; use a chat model or pass --chat-template FILE"
                )
            self._post_ids = suffixes[0][-n:]
        return self._post_ids

    def _tokens_after_instruction(self, instruction: str) -> list[int]:
        """Token ids that start after the instruction's last character in the rendered prompt.

        Tokenizers without offsets fall back to the whole prompt; the common suffix over several
        probes then still isolates the template's tail.
        """
        text = self.format_chat(instruction)
        end = text.rfind(instruction) + len(instruction)
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):
            return self.encode(instruction)
        return [i for i, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]) if start >= end]

    @property
    def n_post(self) -> int:
        return len(self.post_instruction_ids)

    def refusal_token_ids(self, words: tuple[str, ...] | list[str] = REFUSAL_WORDS) -> list[int]:
        """First tokens of typical refusals, as this tokenizer splits them.

        A word counts only if its first token is the whole word or ends at a non-letter
        ("I" of "I'm"): a fragment like "Ap" of "Apologies" would also start ordinary answers.
        Duplicates and unknown tokens are dropped.
        """
        unk = getattr(self.tokenizer, "unk_token_id", None)
        ids: list[int] = []
        for word in words:
            toks = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            if not toks or toks[0] == unk or toks[0] in ids:
                continue
            piece = self.tokenizer.decode([toks[0]]).strip()
            if piece == word or (piece and word.startswith(piece) and not word[len(piece)].isalpha()):
                ids.append(toks[0])
        if not ids:
            raise RefusalError(f"none of the refusal words {list(words)} is a token of this tokenizer; pass --refusal-tokens")
        return ids

    def batch(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        """Chat-format, tokenize and left-pad a batch; position ids count real tokens only."""
        encoded = [self.encode(x) for x in instructions]
        return self.pad(encoded)

    def pad(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-pad token id lists into input_ids / attention_mask / position_ids on the model's device."""
        limit = self.max_positions
        longest = max(len(s) for s in sequences)
        if limit is not None and longest > limit:
            raise RefusalError(f"a prompt has {longest} tokens, more than the model's {limit}; shorten the instructions")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, longest - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, longest - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "position_ids": positions.to(self.device)}

    def logits(self, batch: dict[str, torch.Tensor], last_only: bool = True, grad: bool = False) -> torch.Tensor:
        """Forward pass without cache; float32 logits (last position only by default).

        Runs under ``torch.inference_mode()`` unless ``grad`` asks for a graph to differentiate.
        """
        with torch.inference_mode(not grad):
            out = self.model(**batch, use_cache=False, logits_to_keep=1 if last_only else 0)
        logits = out.logits.float()
        return logits[:, -1] if last_only else logits


# ---- locating modules ------------------------------------------------------------------------
def _get(module: nn.Module, path: str) -> nn.Module | None:
    found: Any = module
    for part in path.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found


def find_decoder_layers(model: HFModel) -> nn.ModuleList:
    """The decoder layers: the one ModuleList whose name ends with a known suffix."""
    override = getattr(model, "refusal_layers_path", None)
    if override:
        layers = _get(model, override)
        if isinstance(layers, nn.ModuleList):
            return layers
        raise UnsupportedModelError(f"refusal_layers_path {override!r} is not a ModuleList in {type(model).__name__}")
    matches = [
        m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and any(name == p or name.endswith("." + p) for p in _LAYER_PATHS)
    ]
    if len(matches) != 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: {'no' if not matches else 'more than one'} decoder layer list found "
            f"(looked for {', '.join(_LAYER_PATHS)}). Supported: {SUPPORTED_FAMILIES}; "
            "or set model.refusal_layers_path to the dotted path of its layers"
        )
    return matches[0]


def _norm_gain(norm: nn.Module, d_model: int) -> torch.Tensor:
    """Elementwise gain of an RMS-style norm, up to scale: its output on the all-ones vector."""
    weight = next(norm.parameters())
    with torch.no_grad():
        gain = norm(torch.ones(1, d_model, dtype=weight.dtype, device=weight.device)).float()[0]
    return gain.cpu()


def _orientation(module: nn.Module, d_model: int, where: str) -> bool:
    """True when ``module``'s weight stores the vectors it writes as rows, False as columns; decided once, here."""
    if isinstance(module, nn.Embedding):
        return True
    if isinstance(module, nn.Linear):
        return False
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):  # GPT-2: y = x W + b with W [in, out]
        return True
    shape = tuple(getattr(module, "weight", torch.empty(0)).shape)
    if len(shape) == 2 and shape[0] != shape[1] and d_model in shape:
        return shape[1] == d_model
    raise UnsupportedModelError(f"{where} ({type(module).__name__}, weight {shape}) has no known orientation; supported: {SUPPORTED_FAMILIES}")


def _writer(module: nn.Module, component: str, layer: int, names: dict[int, str], d_model: int, gain: torch.Tensor | None = None) -> Writer:
    name = names[id(module)]
    bias = getattr(module, "bias", None)
    return Writer(
        module=module,
        component=component,
        layer=layer,
        gain=gain,
        rows=_orientation(module, d_model, name),
        weight_name=f"{name}.weight",
        bias_name=f"{name}.bias" if isinstance(bias, torch.Tensor) else None,
    )


def find_writers(model: HFModel, layers: nn.ModuleList, d_model: int) -> list[Writer]:
    """Attention and MLP output projections of every layer, with post-norm gains where present."""
    names = {id(m): n for n, m in model.named_modules()}
    writers: list[Writer] = []
    for i, layer in enumerate(layers):
        # A post-feedforward norm marks the "sandwich" layout (Gemma 2/3, OLMo 2): there the
        # post_attention_layernorm normalises the attention output before the residual add.
        sandwich = hasattr(layer, "post_feedforward_layernorm")
        for component, paths, post in (("attn", _ATTN_OUT, "post_attention_layernorm"), ("mlp", _MLP_OUT, "post_feedforward_layernorm")):
            module = next((m for m in (_get(layer, p) for p in paths) if m is not None), None)
            if module is None:
                raise UnsupportedModelError(
                    f"{type(model).__name__} is not supported: layer {i} ({type(layer).__name__}) has no {component} output projection "
                    f"(looked for {', '.join(paths)}). Supported: {SUPPORTED_FAMILIES}"
                )
            gain = _norm_gain(getattr(layer, post), d_model) if sandwich else None
            writers.append(_writer(module, component, i, names, d_model, gain))
    return writers


def find_embeddings(model: HFModel) -> list[Writer]:
    """The token embedding plus any learned position embedding that adds into the residual (component "embed")."""
    names = {id(m): n for n, m in model.named_modules()}
    token = model.get_input_embeddings()
    d_model = token.weight.shape[1]
    modules = [token]
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for name in _POSITION_EMBEDDINGS:
        module = getattr(base, name, None)
        if isinstance(module, nn.Embedding) and module.weight.shape[1] == d_model:
            modules.append(module)
    return [_writer(m, "embed", 0, names, d_model) for m in modules]


def wrap_model(
    model: HFModel,
    tokenizer: Tokenizer,
    source: str = "<in-memory>",
    chat_template: str | None = None,
    path: str | None = None,
    trust_remote_code: bool = False,
) -> ChatModel:
    """Build a ChatModel around an already-loaded model and tokenizer (``path``: where a reload finds it; default ``source``)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise RefusalError(f"the tokenizer of {source} has no chat template; pass --chat-template FILE (a Jinja template)")
    model.eval()
    layers = find_decoder_layers(model)
    embeddings = find_embeddings(model)
    writers = find_writers(model, layers, embeddings[0].weight.shape[1])
    return ChatModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        layers=layers,
        embeddings=embeddings,
        writers=writers,
        chat_template=chat_template,
        path=path or source,
        trust_remote_code=trust_remote_code,
    )


# ---- loading ---------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise RefusalError(f"unknown device {device!r}; choose auto, cpu, cuda or mps")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype | str:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else "auto"
    if dtype not in DTYPES:
        raise RefusalError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def mark_dequantized(model: HFModel) -> None:
    """Clear the GGUF 'quantized' flag: transformers has already dequantized the weights to floats.

    Without this, ``save_pretrained`` refuses to write the (plain float) model.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_tokenizer(location: str, kwargs: dict):
    """AutoTokenizer, except that a plain saved ``tokenizers`` pipeline is loaded as it was saved.

    transformers 5 otherwise rebuilds the family's own tokenizer class from the vocabulary
    (e.g. a word-level tokenizer saved beside a Qwen2 config comes back as byte-level BPE).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(location) / "tokenizer_config.json"
    if "gguf_file" not in kwargs and config_file.is_file():
        import json

        declared = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(location)
    return AutoTokenizer.from_pretrained(location, **kwargs)


def _hub_snapshot(hub_id: str) -> str:
    """The local snapshot directory a hub id was loaded from (its files link into the cache's blobs/), else the id."""
    try:
        from transformers.utils import cached_file

        config = cached_file(hub_id, "config.json", local_files_only=True)
    except (OSError, ValueError, ImportError):
        return hub_id
    return str(Path(config).parent) if config else hub_id


def load_checkpoint(
    location: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | Path | None = None,
    source: str | None = None,
) -> ChatModel:
    """Load a chat model from a hub id, a local directory or a ``.gguf`` file (``models.load_model`` also takes packaged names).

    ``source`` is the name the user gave (default: ``location``), kept as ``ChatModel.source``.
    ``dtype='auto'`` means float32 on CPU (bf16 matmuls are slow there) and the checkpoint's own
    dtype on accelerators. ``device_map='auto'`` spreads a large model over the available devices.
    """
    from transformers import AutoModelForCausalLM

    source = str(location) if source is None else source
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    template_text = None
    if chat_template is not None:
        path = Path(chat_template)
        if not path.is_file():
            raise RefusalError(f"chat template file {path} does not exist; give a Jinja template file")
        template_text = path.read_text(encoding="utf-8")

    path = Path(location).expanduser()
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if path.is_file():
        if path.suffix != ".gguf":
            raise RefusalError(f"model file {path} is not a .gguf file; give a model directory, a .gguf file or a hub id")
        where, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            where, kwargs["gguf_file"] = str(path), ggufs[0].name
        elif not (path / "config.json").exists():
            raise RefusalError(f"model directory {path} has no config.json (and not exactly one .gguf file); is it a Hugging Face checkpoint?")
        else:
            where = str(path)
    elif str(location).startswith((".", "/", "~")) or str(location).endswith(".gguf") or str(location).count("/") > 1:
        raise RefusalError(f"model path {source} does not exist; check the path, or give a hub id like Qwen/Qwen2.5-0.5B-Instruct")
    else:
        where = str(location)

    log(f"loading [bold]{source}[/] ({device}, {torch_dtype if isinstance(torch_dtype, str) else str(torch_dtype).replace('torch.', '')})")
    try:
        tokenizer = _load_tokenizer(where, kwargs)
        model: HFModel = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, device_map=device_map, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RefusalError(f"could not load model {source}: {first}") from None
    if "gguf_file" in kwargs:
        mark_dequantized(model)
    if device_map is None:
        model.to(device)
    resolved = str(path.resolve()) if path.exists() else _hub_snapshot(where)
    return wrap_model(model, tokenizer, source=source, chat_template=template_text, path=resolved, trust_remote_code=trust_remote_code)
