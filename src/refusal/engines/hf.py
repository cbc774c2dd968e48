"""Batched generation behind a small engine interface.

``HFEngine`` runs ``model.generate`` (left padding, KV cache, stop at EOS) under whatever hooks are
active, so the same engine serves the unedited model, a model inside ``ablate``/``add``, and an
exported checkpoint. Prompts are batched by token length (less padding) and returned in input
order. ``stop_when`` ends a sequence as soon as a judge can decide from its text so far (a refusal
phrase has appeared), which saves most of the tokens of refused prompts; leave it out to read full
completions. ``engines.vllm.VLLMEngine`` implements ``Engine`` with vLLM for checkpoints on disk (the
original, an export): it serves edits baked into weights only, not hooks. Everything that
generates (evaluation, the search's confirmation and original prefixes) takes an ``Engine``, made by
``factory.make_engine`` and closed when done (``close`` frees a vLLM model). A prompt
is an instruction (chat-formatted here) or a list of token ids already formatted (a prompt with an
adversarial suffix, ``suffixes.SuffixedPrompt.ids``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..common.progress import track
from ..model.architecture import Tokenizer
from ..model.chat import ChatModel

StopWhen = Callable[[str], bool]
STOP_EVERY = 4  # new tokens between two ``stop_when`` checks (``VLLMEngine`` cuts its output at the same points)
Prompt = str | list[int]  # an instruction, or the token ids of a chat-formatted prompt


class Engine(Protocol):
    """A generation backend: greedy (or seeded sampled) completions of chat-formatted instructions."""

    def generate_ids(self, instructions: Sequence[Prompt], max_new_tokens: int, stop_when: StopWhen | None = None) -> list[list[int]]:
        """New token ids per prompt, in input order, cut after the first end-of-sequence token."""
        ...

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Texts of ``generate_ids``' output, without special tokens."""
        ...

    def generate(self, instructions: Sequence[Prompt], max_new_tokens: int, stop_when: StopWhen | None = None) -> list[str]:
        """Completions of chat-formatted ``instructions``, in input order, without special tokens."""
        ...

    def close(self) -> None:
        """Free what the engine holds (a vLLM model's GPU memory); a later call may build it again."""
        ...


@dataclass
class Sampling:
    """Sampled instead of greedy decoding; ``seed`` makes it repeatable."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


class _StopWhenDecided:
    """A transformers stopping criterion: per sequence, stop once ``stop_when(text so far)`` is true."""

    def __init__(self, tokenizer: Tokenizer, prompt_len: int, stop_when: StopWhen, every: int = STOP_EVERY) -> None:
        self.tokenizer, self.prompt_len, self.stop_when, self.every = tokenizer, prompt_len, stop_when, every

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        n_new = input_ids.shape[1] - self.prompt_len
        if n_new == 0 or n_new % self.every:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([self.stop_when(t) for t in texts], dtype=torch.bool, device=input_ids.device)


class HFEngine:
    """Generation with the loaded transformers model (hooks, if any, stay active)."""

    def __init__(self, chat: ChatModel, batch_size: int = 16, sampling: Sampling | None = None, description: str = "generating"):
        self.chat, self.batch_size, self.sampling, self.description = chat, batch_size, sampling, description

    def generate_ids(self, instructions: Sequence[Prompt], max_new_tokens: int, stop_when: StopWhen | None = None) -> list[list[int]]:
        """New token ids per prompt (input order), cut after the first EOS."""
        chat = self.chat
        tokenizer: Any = chat.tokenizer  # typed loosely in ChatModel; a transformers tokenizer
        model: Any = chat.model
        from transformers import StoppingCriteriaList

        encoded = [list(x) if isinstance(x, list) else chat.encode(x) for x in instructions]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        groups = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = set(eos_ids(chat))
        out: dict[int, list[int]] = {}
        for group in track(groups, self.description):
            batch = chat.pad([encoded[i] for i in group])
            prompt_len = batch["input_ids"].shape[1]
            options: dict[str, Any] = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            if self.sampling is not None:
                torch.manual_seed(self.sampling.seed)
                options = dict(do_sample=True, temperature=self.sampling.temperature, top_p=self.sampling.top_p, top_k=None)
            criteria = StoppingCriteriaList([_StopWhenDecided(tokenizer, prompt_len, stop_when)]) if stop_when else None
            with torch.inference_mode():
                generated = model.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    stopping_criteria=criteria,
                    **options,
                )
            for i, row in zip(group, generated[:, prompt_len:].tolist()):
                cut = next((k for k, t in enumerate(row) if t in eos), None)
                row = row[: cut + 1] if cut is not None else row
                while cut is None and row and row[-1] == pad_id:  # a sequence stopped early by stop_when
                    row = row[:-1]
                out[i] = row
        return [out[i] for i in range(len(instructions))]

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Texts without special tokens."""
        tokenizer: Any = self.chat.tokenizer
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    def generate(self, instructions: Sequence[Prompt], max_new_tokens: int, stop_when: StopWhen | None = None) -> list[str]:
        """Completions in input order, without special tokens."""
        return self.decode(self.generate_ids(instructions, max_new_tokens, stop_when))

    def close(self) -> None:
        """Nothing to free: the model belongs to ``chat``."""


def eos_ids(chat: ChatModel) -> list[int]:
    model: Any = chat.model
    tokenizer: Any = chat.tokenizer
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if ids is None:
        ids = tokenizer.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids or [])


def generate(
    chat: ChatModel,
    instructions: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    description: str = "generating",
    stop_when: StopWhen | None = None,
) -> list[str]:
    """Greedy completions of chat-formatted instructions, decoded without special tokens."""
    return HFEngine(chat, batch_size, description=description).generate(instructions, max_new_tokens, stop_when)
