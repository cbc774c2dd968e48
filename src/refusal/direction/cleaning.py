"""Cleaner directions: the refusal direction with what the edit must not touch regressed out (docs/search.md).

Removing a direction d from every writer damages a prompt in proportion to how much that prompt's
residual stream carries along d. The *protected* prompts (harmless train prompts and the built-in
code/math problems) say where the model's ordinary work lives; ridge residualisation removes from d
the part their activations explain, each principal direction shrunk by how much they use it:

    H = protected activations at the source layer and position      [n, d_model]
    M = Hᵀ H / n = V diag(σ²) Vᵀ                                     (second moment: the mean counts too)
    u(α) ∝ β (M + β I)⁻¹ d = d − V diag(σ² / (σ² + β)) Vᵀ d,          β = α · tr(M) / d_model

α → ∞ gives d (the paper's direction); α → 0 gives d with every protected direction removed. The
search's parameter is ``clean`` = log10 α. A fractional source layer l = ⌊l⌋ + t blends the two
layers' second moments, M = (1 − t) M⌊l⌋ + t M⌊l⌋+1, as it blends their directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import RefusalError, check_finite
from ..model.chat import ChatModel
from ..residual.activations import collect_activations
from ..residual.directions import load_tensors, save_tensors

CLEAN_RANGE = (-1.0, 3.0)  # searched log10 α: from strong cleaning to almost none (at the top the cleaned direction is nearly d)


@dataclass
class Protection:
    """Per-prompt activations of the protected prompts: ``acts`` [n_prompts, n_layers + 1, len(positions), d_model]."""

    acts: torch.Tensor
    positions: list[int]  # negative post-instruction offsets, e.g. [-1]
    metadata: dict = field(default_factory=dict)

    def moment_factor(self, layer: float, position: int) -> torch.Tensor:
        """A matrix F (float64) with Fᵀ F = M, the protected second moment at (fractional) ``layer``."""
        if position not in self.positions:
            raise RefusalError(f"the protected activations have positions {self.positions}, not {position}; rerun refusal search")
        n_rows = self.acts.shape[1] - 1
        low = min(math.floor(layer), n_rows)
        t = layer - low
        k = self.positions.index(position)
        parts = [math.sqrt(1 - t) * self.acts[:, low, k].double()]
        if t > 0:
            parts.append(math.sqrt(t) * self.acts[:, min(low + 1, n_rows), k].double())
        return torch.cat(parts) / math.sqrt(len(self.acts))

    def clean(self, direction: torch.Tensor, layer: float, position: int, log_alpha: float) -> torch.Tensor:
        """``direction`` ridge-residualised against the protected activations (float32, not normalised)."""
        factor = self.moment_factor(layer, position)  # [m, d]
        _, sigma, vt = torch.linalg.svd(factor, full_matrices=False)  # sigma² are M's nonzero eigenvalues
        beta = 10.0**log_alpha * float((sigma**2).sum()) / factor.shape[1]
        if beta <= 0:
            raise RefusalError("the protected activations are all zero; check the protected prompts")
        d = direction.double()
        shrink = sigma**2 / (sigma**2 + beta)
        out = (d - vt.T @ (shrink * (vt @ d))).float()
        check_finite(out, "cleaned direction")
        return out

    def save(self, path: Path) -> None:
        save_tensors({"acts": self.acts.contiguous()}, {**self.metadata, "positions": self.positions}, path)

    @classmethod
    def load(cls, path: Path) -> Protection:
        tensors, metadata = load_tensors(path, ("acts",))
        return cls(tensors["acts"], list(metadata.pop("positions", [-1])), metadata)


def protect(chat: ChatModel, prompts: list[str], positions: list[int], batch_size: int = 32, metadata: dict | None = None) -> Protection:
    """The protected prompts' residual activations at every layer and the given positions (float32)."""
    if not prompts:
        raise RefusalError("no protected prompts; raise --protect-prompts or set it to 0 to search without cleaning")
    acts = collect_activations(chat, prompts, batch_size)  # [n, n_layers + 1, n_post, d]
    index = [chat.n_post + p for p in positions]
    kept = acts[:, :, index].contiguous()
    check_finite(kept, "protected activations")
    return Protection(kept, list(positions), dict(metadata or {}))
