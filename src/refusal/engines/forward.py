"""Forward passes behind one protocol, beside generation: logits and residuals at chosen prompt positions.

A measurement that needs no generation (the refusal log-odds of the first response token, a projection
on the direction) reads the model through ``Forward`` instead of reaching into ``ChatModel``: prompts are
token ids already chat-formatted (``ChatModel.encode``, ``suffixes.SuffixedPrompt.ids``), run in left-padded
batches in input order, and positions are negative offsets from the end of each prompt (-1: the last
token), as everywhere in the package. ``HFForward`` runs the loaded transformers model under whatever
hooks are active, so it serves a hooked or edited model as ``HFEngine`` does.

Residual index ``l`` in ``[0, n_layers)`` is the input of decoder layer ``l``; ``n_layers`` is the
final residual before the final norm (``residual.activations``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..errors import RefusalError
from ..model.chat import ChatModel
from ..residual.activations import batches, residual_reader


class Forward(Protocol):
    """A forward-pass backend: next-token logits and residual activations at positions counted from the end."""

    def logits_at(self, prompts: list[list[int]], positions: list[int]) -> torch.Tensor:
        """[n, len(positions), vocab] float32 logits on CPU; position p predicts the token after prompt[p]."""
        ...

    def residuals_at(self, prompts: list[list[int]], layers: list[int], positions: list[int]) -> torch.Tensor:
        """[n, len(layers), len(positions), d_model] float32 residual activations on CPU."""
        ...


class HFForward:
    """Forward passes of the loaded transformers model (hooks, if any, stay active), ``batch_size`` prompts at a time."""

    def __init__(self, chat: ChatModel, batch_size: int = 16):
        self.chat, self.batch_size = chat, batch_size

    def logits_at(self, prompts: list[list[int]], positions: list[int]) -> torch.Tensor:
        """[n, len(positions), vocab] float32 logits; only the last ``-min(positions)`` positions reach the unembedding."""
        keep = self._check(prompts, positions)
        rows = []
        for group in batches(prompts, self.batch_size):
            with torch.inference_mode():  # ``ChatModel.logits`` with ``logits_to_keep`` beyond the last position
                out = self.chat.model(**self.chat.pad(group), use_cache=False, logits_to_keep=keep)
            rows.append(out.logits.float()[:, [keep + p for p in positions]].cpu())
        return torch.cat(rows)

    def residuals_at(self, prompts: list[list[int]], layers: list[int], positions: list[int]) -> torch.Tensor:
        """[n, len(layers), len(positions), d_model] float32 residuals (``activations.residual_reader``)."""
        keep = self._check(prompts, positions)
        n_layers = self.chat.n_layers
        wrong = [layer for layer in layers if not 0 <= layer <= n_layers]
        if not layers or wrong:
            raise RefusalError(f"residual layers {wrong or layers} are not readable; use indices 0 .. {n_layers} ({n_layers}: the final residual)")
        current: dict[int, torch.Tensor] = {}

        def sink(index: int, x: torch.Tensor) -> None:
            if index in layers:
                current[index] = x[:, [keep + p for p in positions]].cpu()

        rows = []
        with residual_reader(self.chat, keep, sink):
            for group in batches(prompts, self.batch_size):
                current.clear()
                self.chat.logits(self.chat.pad(group))
                rows.append(torch.stack([current[layer] for layer in layers], dim=1))
        return torch.cat(rows)

    @staticmethod
    def _check(prompts: list[list[int]], positions: list[int]) -> int:
        """How many trailing positions the reads need; a one-line error for no prompts or a position outside a prompt."""
        if not prompts:
            raise RefusalError("a forward pass needs at least one prompt; none was given")
        shortest = min(len(p) for p in prompts)
        if not positions or any(not -shortest <= p < 0 for p in positions):
            raise RefusalError(f"positions {positions} are not all inside every prompt; use offsets from -1 to -{shortest} (the shortest prompt)")
        return -min(positions)
