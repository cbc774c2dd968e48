"""Load a chat model from a checkpoint: a hub id, a local directory or a ``.gguf`` file.

``model.packaged.load_model`` (which also takes packaged names like ``demo``) is the entry point; this
module resolves device and dtype, loads tokenizer and weights, and wraps them in a ``ChatModel``
that remembers where it came from (``path``) and how (``trust_remote_code``), so a reload matches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..common.progress import log
from ..common.safetensors_files import checkpoint_files, tensor_locations
from ..errors import RefusalError
from .architecture import HFModel, Tokenizer
from .chat import ChatModel, wrap_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise RefusalError(f"unknown device {device!r}; choose auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RefusalError(f"--device {device}: there is no CUDA GPU on this machine; use --device cpu (or auto)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RefusalError("--device mps: Apple's MPS is not available on this machine; use --device cpu (or auto)")
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


def _load_tokenizer(location: str, kwargs: dict) -> Tokenizer:
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
    """Load a chat model from a hub id, a local directory or a ``.gguf`` file (``model.packaged.load_model`` also takes packaged names).

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
        try:
            template_text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            raise RefusalError(f"chat template file {path} is not readable UTF-8 text ({type(e).__name__}); give a Jinja template file") from None

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
            checkpoint_files(path)  # an index naming a file outside the directory is refused before loading
            where = str(path)
    elif str(location).startswith((".", "/", "~")) or str(location).endswith(".gguf") or str(location).count("/") > 1:
        raise RefusalError(f"model path {source} does not exist; check the path, or give a hub id like Qwen/Qwen2.5-0.5B-Instruct")
    else:
        where = str(location)

    log(f"loading [bold]{source}[/] ({device}, {torch_dtype if isinstance(torch_dtype, str) else str(torch_dtype).replace('torch.', '')})")
    _check_remote_code(path, trust_remote_code, source)
    try:
        tokenizer = _load_tokenizer(where, kwargs)
        loaded: Any = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, device_map=device_map, output_loading_info=True, **kwargs)
        model: HFModel = loaded[0]
        info: dict = loaded[1]
    except Exception as e:  # transformers, safetensors and tokenizers raise many types for a broken checkpoint
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        hint = "; if the model needs its own code, pass --trust-remote-code" if "trust_remote_code" in str(e) and not trust_remote_code else ""
        raise RefusalError(f"could not load model {source}: {first}{hint}") from None
    missing = [k for k in info.get("missing_keys", []) if not (k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False))]
    if missing:
        raise RefusalError(
            f"checkpoint {source} is missing {len(missing)} tensor(s), e.g. {missing[0]}; they would be random: re-download or re-save it"
        )
    if "gguf_file" in kwargs:
        mark_dequantized(model)
    if device_map is None:
        model.to(device)
    resolved = str(path.resolve()) if path.exists() else _hub_snapshot(where)
    chat = wrap_model(model, tokenizer, source=source, chat_template=template_text, path=resolved, trust_remote_code=trust_remote_code)
    try:
        rendered = {chat.format_chat("Say hello"), chat.format_chat("List three colours.")}
    except RefusalError:  # the template's own error, named by format_chat
        raise
    except Exception as e:  # jinja2 syntax and runtime errors
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        raise RefusalError(f"the chat template of {source} cannot be rendered ({why}); fix it or pass --chat-template FILE") from None
    if len(rendered) == 1:
        raise RefusalError(
            f"the chat template of {source} ignores the user's message (two instructions render alike); fix it or pass --chat-template FILE"
        )
    return chat


def _check_remote_code(path: Path, trust_remote_code: bool, source: str) -> None:
    """A checkpoint whose config maps the model to its own code needs --trust-remote-code; say so up front."""
    config = path / "config.json" if path.is_dir() else None
    if trust_remote_code or config is None or not config.is_file():
        return
    import json

    try:
        auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return
    if isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map:
        raise RefusalError(f"model {source} runs its own code ({auto_map['AutoModelForCausalLM']}); read it, then pass --trust-remote-code")


def load_skeleton(
    location: str | Path, trust_remote_code: bool = False, chat_template: str | Path | None = None, source: str | None = None
) -> ChatModel:
    """A local safetensors checkpoint's structure without its weights, for the streamed export.

    The model is built on the meta device from its config; only its vectors (norm gains, biases) are
    read from the checkpoint, since a post-norm's gain decides the direction its writer is edited along.
    Writers, their names and orientations come out as for a loaded model; no forward pass is possible.
    """
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    source = str(location) if source is None else source
    path = Path(location).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file() and checkpoint_files(path)):
        others = sorted(p.name for p in path.glob("*.safetensors")) if path.is_dir() else []
        if others:  # transformers would load none of them: which one is the model is not known
            raise RefusalError(
                f"{source} has {', '.join(others)} but neither model.safetensors nor model.safetensors.index.json; "
                "rename the model's file to model.safetensors (or add an index)"
            )
        raise RefusalError(f"{source} is not a local checkpoint directory with config.json and safetensors files; the streamed export needs one")
    _check_remote_code(path, trust_remote_code, source)
    template_text = Path(chat_template).read_text(encoding="utf-8") if chat_template is not None else None
    try:
        tokenizer = _load_tokenizer(str(path), {"trust_remote_code": trust_remote_code})
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model: Any = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for a broken checkpoint
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise RefusalError(f"could not read the structure of {source}: {first}") from None
    locations = tensor_locations(path)
    vectors = [name for name, param in model.named_parameters() if param.dim() <= 1]
    missing = [name for name in vectors if name not in locations]
    if missing:
        raise RefusalError(f"the checkpoint at {source} has no tensor {missing[0]}: its names differ from the model's; export with the model loaded")
    for file in sorted({locations[name][0] for name in vectors}):  # each file opened once
        with safe_open(str(file), framework="pt") as f:
            for name in (n for n in vectors if locations[n][0] == file):
                set_module_tensor_to_device(model, name, "cpu", value=f.get_tensor(name).float())
    return wrap_model(model, tokenizer, source=source, chat_template=template_text, path=str(path.resolve()), trust_remote_code=trust_remote_code)
