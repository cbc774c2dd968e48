"""Parametrised weight edits that apply and revert cheaply: the search's trials (docs/search.md).

A trial removes a direction from the residual writers with a strength per layer and component:

    W_attn,i <- W_attn,i - s_attn(i) * u u^T W_attn,i        (Linear weights [d_model, in])
    W_mlp,i  <- W_mlp,i  - s_mlp(i)  * u u^T W_mlp,i
    E        <- E - s_attn(0) * E u u^T                       (token embeddings, row-wise)

with a smooth strength kernel per component, ``s(i) = floor + (peak - floor) * exp(-(i - centre)^2 / (2 width^2))``.
Strength 1 at every layer is exactly the paper's orthogonalization (``weights.orthogonalize_weights``).

Variants:
- ``projection``: the formulas above.
- ``norm_preserving``: after the projection, every vector the matrix writes into the residual
  stream (a column of a Linear weight, a row of the embedding) is rescaled to its original norm.
- ``biprojected``: the direction is first made orthogonal to the harmless mean activation at its
  source layer, so the edit leaves the harmless mean's own direction untouched.

``WeightEditor`` snapshots the edited tensors once; ``revert`` copies them back, bit for bit, so a
search never reloads the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from .directions import Candidates, unit_vector
from .errors import RefusalError
from .model import ChatModel
from .weights import _edited_tensors, _is_conv1d, project_out, project_out_bias, retie_embeddings, untie_embeddings

VARIANTS = ("projection", "norm_preserving", "biprojected")


@dataclass(frozen=True)
class Kernel:
    """Edit strength over layers for one component."""

    peak: float = 1.0
    centre: float = 0.0
    width: float | None = None  # None: flat, every layer at ``peak``
    floor: float = 0.0

    def strengths(self, n_layers: int) -> list[float]:
        if self.width is None:
            return [self.peak] * n_layers
        return [self.floor + (self.peak - self.floor) * math.exp(-0.5 * ((i - self.centre) / max(self.width, 1e-6)) ** 2) for i in range(n_layers)]


@dataclass(frozen=True)
class EditParams:
    """One trial: where the direction comes from and how strongly each component is edited."""

    layer: float  # source layer; a fraction blends the directions of the two neighbouring layers
    position: int = -1
    attn: Kernel = Kernel()
    mlp: Kernel = Kernel()
    variant: str = "projection"

    def validate(self, n_layers: int, n_post: int) -> None:
        if self.variant not in VARIANTS:
            raise RefusalError(f"unknown edit variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if not 0 <= self.layer <= n_layers:
            raise RefusalError(f"source layer {self.layer} is out of range; use 0 .. {n_layers}")
        if not -n_post <= self.position < 0:
            raise RefusalError(f"position {self.position} is out of range; use -1 .. -{n_post}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EditParams:
        data = dict(data)
        return cls(**{**data, "attn": Kernel(**data["attn"]), "mlp": Kernel(**data["mlp"])})


def source_direction(candidates: Candidates, params: EditParams) -> torch.Tensor:
    """The unit direction a trial removes: blended between layers, biprojected if asked."""
    low = math.floor(params.layer)
    high = min(low + 1, candidates.n_layers)
    t = params.layer - low
    raw = (1 - t) * candidates.direction(low, params.position) + t * candidates.direction(high, params.position)
    unit = unit_vector(raw)
    if params.variant == "biprojected":
        index = candidates.n_post + params.position
        mean = (1 - t) * candidates.mean_harmless[low, index] + t * candidates.mean_harmless[high, index]
        m = mean.double() / mean.double().norm().clamp_min(1e-12)
        unit = unit_vector((unit.double() - (unit.double() @ m) * m).float())
    return unit


class WeightEditor:
    """Applies ``EditParams`` to a loaded model in place and reverts exactly; use as a context manager."""

    def __init__(self, chat: ChatModel):
        self.chat = chat
        self.was_tied = untie_embeddings(chat)
        self.tensors = _edited_tensors(chat)
        self.saved = [t.detach().clone() for t in self.tensors]
        self.norms: dict[tuple[int, int], torch.Tensor] = {}
        self.dirty = False

    @torch.no_grad()
    def apply(self, unit: torch.Tensor, params: EditParams) -> None:
        """Edit the weights for one trial (reverting any previous trial first)."""
        if self.dirty:
            self.revert()
        self.dirty = True
        n = self.chat.n_layers
        strength = {"attn": params.attn.strengths(n), "mlp": params.mlp.strengths(n)}
        keep_norm = params.variant == "norm_preserving"
        for embedding in self.chat.embeddings:
            if strength["attn"][0] != 0:
                project_out(embedding.weight, unit, strength["attn"][0], True, self._norms(embedding.weight, 1) if keep_norm else None)
        for writer in self.chat.writers:
            s = strength[writer.component][writer.layer]
            if s == 0:
                continue
            module = writer.module
            u = writer.direction(unit).to(module.weight.device)
            rows = _is_conv1d(module)  # Conv1D [in, out]: rows are the written vectors; Linear [out, in]: columns
            project_out(module.weight, u, s, rows, self._norms(module.weight, 1 if rows else 0) if keep_norm else None)
            if getattr(module, "bias", None) is not None:
                project_out_bias(module.bias, u, s)

    def _norms(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Float32 norms of the original written vectors, computed once per tensor."""
        key = (id(tensor), dim)
        if key not in self.norms:
            original = self.saved[next(i for i, t in enumerate(self.tensors) if t is tensor)]
            self.norms[key] = original.float().norm(dim=dim)
        return self.norms[key]

    @torch.no_grad()
    def revert(self) -> None:
        for tensor, original in zip(self.tensors, self.saved):
            tensor.copy_(original)
        self.dirty = False

    def close(self) -> None:
        """Revert and give back the snapshot (and re-tie embeddings that were tied)."""
        self.revert()
        self.saved, self.norms = [], {}
        if self.was_tied:
            retie_embeddings(self.chat)

    def __enter__(self) -> WeightEditor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def trial(self, unit: torch.Tensor, params: EditParams) -> Iterator[None]:
        """The model edited by ``params`` within the block, reverted afterwards (also on errors)."""
        try:
            self.apply(unit, params)
            yield
        finally:
            self.revert()
