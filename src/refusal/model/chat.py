"""Model adapter: a chat model and the parts of it the refusal method reads and edits.

``ChatModel`` bundles a ``transformers`` causal LM with its tokenizer and the places the refusal
direction lives in (found by ``architecture``): the decoder layers, the embeddings and the residual
writers. Chat formatting goes through the tokenizer's template, and the post-instruction tokens
are derived from the template itself. ``loading`` builds one from a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import RefusalError, UnsupportedModelError
from ..settings import REFUSAL_WORDS, tree_field
from .architecture import HFModel, Tokenizer, Writer, find_decoder_layers, find_embeddings, find_writers

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class ChatModel:
    """A causal LM, its tokenizer and the parts of it the refusal method reads and edits."""

    model: HFModel
    tokenizer: Tokenizer
    source: str  # what the user named: "demo", a hub id, a path
    layers: nn.ModuleList
    embeddings: list[Writer]  # component "embed": token embedding, then learned positions
    writers: list[Writer]  # component "attn" / "mlp", in layer order
    chat_template: str | None = tree_field("model.chat_template")  # as loaded
    path: str = ""  # the resolved location a reload uses (local directory or hub id); defaults to source
    trust_remote_code: bool = tree_field("model.trust_remote_code")  # as loaded
    template_kwargs: dict = field(default_factory=lambda: {"enable_thinking": False})
    _post_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.path:
            self.path = self.source

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self) -> PretrainedConfig:
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
    def has_weights(self) -> bool:
        """False for a structure without weights (``loading.load_skeleton``: the streamed export's model) or one whose
        writers were offloaded by accelerate (their parameters then live on the meta device between calls)."""
        return all(w.weight.device.type != "meta" for w in (*self.embeddings, *self.writers))

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
        try:
            return self.tokenizer.apply_chat_template(messages, **kwargs)
        except Exception as e:  # jinja2's syntax, runtime and sandbox errors, the template's own raise_exception
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e).strip() else type(e).__name__
            if type(e).__name__ == "SecurityError":  # jinja2.exceptions.SecurityError: the sandbox stopped the template
                raise RefusalError(
                    f"the chat template of {self.source} does something Jinja's sandbox forbids ({why}) while rendering "
                    f"{instruction[:40]!r}; fix the template or pass --chat-template FILE"
                ) from None
            raise RefusalError(f"the chat template of {self.source} cannot be rendered ({why}); fix it or pass --chat-template FILE") from None

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

    def check_context(
        self, instructions: list[str], new_tokens: int, suffix: int = 0, suffix_name: str = "the suffix", new_name: str = "--max-new-tokens"
    ) -> None:
        """Refuse, before any work, chat prompts that with a ``suffix`` of that many tokens and ``new_tokens`` generated
        (or scored) after them would not fit the model's context."""
        limit = self.max_positions
        if limit is None or not instructions:
            return
        longest, prompt = max((len(self.encode(x)), x) for x in instructions)
        total = longest + suffix + new_tokens
        if total <= limit:
            return
        after = f" and {new_name} {new_tokens}" if new_tokens else ""
        if suffix and longest + new_tokens <= limit:  # the suffix is what does not fit
            raise RefusalError(
                f"{suffix_name} is {suffix} tokens: the longest prompt ({longest} tokens) with it{after} makes {total}, more than the "
                f"model's context of {limit} tokens; use a suffix of at most {limit - longest - new_tokens} tokens"
            )
        shown = f"{prompt[:40]!r}{'...' if len(prompt) > 40 else ''}"
        raise RefusalError(
            f"the prompt {shown} is {longest} tokens: with {new_name} {new_tokens} that makes {longest + new_tokens}, more than the "
            f"model's context of {limit} tokens; lower {new_name} or shorten the prompt"
        )

    def logits(self, batch: dict[str, torch.Tensor], last_only: bool = True, grad: bool = False) -> torch.Tensor:
        """Forward pass without cache; float32 logits (last position only by default).

        Runs under ``torch.inference_mode()`` unless ``grad`` asks for a graph to differentiate.
        """
        with torch.inference_mode(not grad):
            out = self.model(**batch, use_cache=False, logits_to_keep=1 if last_only else 0)
        logits = out.logits.float()
        return logits[:, -1] if last_only else logits


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
