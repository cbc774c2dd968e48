"""Edits: one abstraction for every change to a model's weights, applied in place and reverted exactly.

An ``Edit`` is what it does to named checkpoint tensors (``deltas``: one ``deltas.TensorDelta`` per tensor,
which the in-memory edit, the streamed export and its read-back consume); it applies itself to a loaded
model, saving each tensor into a ``weights.Snapshot`` before touching it; ``describe`` is what an export
records (``described.edit_from_dict`` reads it back), ``files`` the files the description names; ``hooks``
is its hooked equivalent (the export's fidelity reference), or None when it has none. Three edits exist:
``tensor_deltas.TensorDeltas`` (any deltas given directly: a merged LoRA, a bias edit) and two removals of
a direction, whose ``removal`` builds their ``Projection`` deltas:

- ``Orthogonalization(direction)``: the paper's edit, W <- W - u u^T W on every writer (embeddings
  row-wise, biases too); its hooked equivalent is ``interventions.ablate``.
- ``KernelEdit(unit, params)``: the search's trials (docs/search.md). A trial removes a direction
  from the residual writers with a strength per layer and component:

    W_attn,i <- W_attn,i - s_attn(i) * u u^T W_attn,i        (Linear weights [d_model, in])
    W_mlp,i  <- W_mlp,i  - s_mlp(i)  * u u^T W_mlp,i
    E        <- E - s_attn(0) * E u u^T                       (token embeddings, row-wise)

  with a smooth strength kernel per component, ``s(i) = floor + (peak - floor) * exp(-(i - centre)^2 / (2 width^2))``.
  Strength 1 at every layer is exactly the paper's orthogonalization. A variant (``settings.variant_parts``)
  is a direction form and a norm choice, independent of each other. Forms: ``projection`` (u as given);
  ``projected`` (u first made orthogonal to the harmless mean activation at its source layer: grimjim's
  "projected abliteration"); ``biprojected_targets`` (``projected``, then, for each target layer's writers,
  orthogonal to that layer's harmless mean, so no writer changes its layer's harmless mean direction: the
  published biprojection). Norms: none; ``written_norms`` (every written vector then rescaled to its original
  norm); ``coordinate_norms`` (each residual coordinate's weights keep their norm: the published
  norm-preserving form, which projects the coordinate-normalised matrix and rescales). Old names:
  ``norm_preserving`` = ``projection+written_norms``, ``biprojected`` = ``projected``. With ``clean`` set,
  the direction is first ridge-residualised against the protected prompts' activations
  (``cleaning.Protection``, strength 10**clean).

``edited(chat, edit)`` applies an edit for the duration of a block; ``Editor(chat)`` runs many
trials on one model with one snapshot (norms computed once), reverting after each, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from ..direction.cleaning import Protection
from ..errors import RefusalError
from ..model.architecture import Writer
from ..model.chat import ChatModel
from ..residual.directions import Candidates, unit_vector
from ..residual.interventions import ablate, damp_outputs
from ..settings import variant_parts
from .deltas import Removal, TensorDelta
from .weights import Snapshot


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
    clean: float | None = None  # log10 of the ridge strength the direction is cleaned with; None: not cleaned
    second: dict | None = None  # {"vector": [d_model floats], "strength": s, ...}: a second direction (search.second_trials)

    def validate(self, n_layers: int, n_post: int) -> None:
        try:
            variant_parts(self.variant)
        except RefusalError as error:
            raise RefusalError(f"unknown edit variant {self.variant!r}: {str(error).split('; ', 1)[1]}") from None
        if not 0 <= self.layer <= n_layers:
            raise RefusalError(f"source layer {self.layer} is out of range; use 0 .. {n_layers}")
        if not -n_post <= self.position < 0:
            raise RefusalError(f"position {self.position} is out of range; use -1 .. -{n_post}")
        if self.clean is not None and not math.isfinite(self.clean):
            raise RefusalError(f"clean {self.clean} is not a finite log10 ridge strength; use a number such as 1.0")
        if self.second is not None:
            vector, strength = self.second.get("vector"), self.second.get("strength")
            if not (isinstance(vector, list) and vector and isinstance(strength, (int, float)) and math.isfinite(strength)):
                raise RefusalError("the edit's second direction needs a 'vector' (a list of numbers) and a finite 'strength'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EditParams:
        data = dict(data)
        return cls(**{**data, "attn": Kernel(**data["attn"]), "mlp": Kernel(**data["mlp"])})


def source_direction(candidates: Candidates, params: EditParams, protection: Protection | None = None) -> torch.Tensor:
    """The unit direction a trial removes: blended between layers, cleaned, and made orthogonal to the source
    layer's harmless mean for the ``projected`` and ``biprojected_targets`` forms."""
    low = math.floor(params.layer)
    high = min(low + 1, candidates.n_layers)
    t = params.layer - low
    raw = (1 - t) * candidates.direction(low, params.position) + t * candidates.direction(high, params.position)
    if params.clean is not None:
        if protection is None:
            raise RefusalError("this edit cleans its direction but no protected activations were given; rerun refusal search to make them")
        raw = protection.clean(raw, params.layer, params.position, params.clean)
    unit = unit_vector(raw)
    if variant_parts(params.variant)[0] != "projection":
        index = candidates.n_post + params.position
        mean = (1 - t) * candidates.mean_harmless[low, index] + t * candidates.mean_harmless[high, index]
        m = mean.double() / mean.double().norm().clamp_min(1e-12)
        unit = unit_vector((unit.double() - (unit.double() @ m) * m).float())
    return unit


def target_units(unit: torch.Tensor, means: torch.Tensor) -> list[torch.Tensor]:
    """``unit`` made orthogonal to each layer's harmless mean (``means`` [layers, d_model]) and of unit norm."""
    m = means.double() / means.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    u = unit.double()
    return [unit_vector((u - (u @ row) * row).float()) for row in m]


def second_direction(unit: torch.Tensor, params: EditParams) -> torch.Tensor | None:
    """The trial's second direction (``params.second``) made orthogonal to ``unit`` and of unit norm, or None."""
    if params.second is None:
        return None
    vector = torch.tensor(params.second["vector"], dtype=torch.float64)
    if vector.shape != unit.shape:
        raise RefusalError(f"the second direction has {vector.numel()} numbers; the model's d_model is {unit.numel()}")
    u = unit.double() / unit.double().norm()
    return unit_vector((vector - (vector @ u) * u).float())


class Edit(Protocol):
    """A change to a model's weights that can be applied in place and reverted exactly."""

    def deltas(self, chat: ChatModel) -> dict[str, TensorDelta]:
        """What the edit does to each tensor it changes, by checkpoint name (``deltas``): what the in-memory edit,
        the streamed export and its read-back consume."""
        ...

    def files(self) -> dict[str, dict[str, torch.Tensor]]:
        """The safetensors files ``describe`` names (file name -> tensors), written beside refusal.json; often none."""
        ...

    def apply(self, chat: ChatModel, snapshot: Snapshot) -> None:
        """Edit the weights in place, saving each tensor into ``snapshot`` before touching it."""
        ...

    def describe(self) -> dict:
        """JSON-able description, e.g. {"kind": "orthogonalization"} or {"kind": "kernel", "params": {...}}."""
        ...

    def hooks(self, chat: ChatModel) -> AbstractContextManager | None:
        """The hooked equivalent of this edit (the export's fidelity reference), or None."""
        ...


class RemovalEdit:
    """An edit that is a ``Removal``: its deltas and its in-place form both come from ``removal``; no extra files."""

    def removal(self, n_layers: int) -> Removal:
        raise NotImplementedError

    def deltas(self, chat: ChatModel) -> dict[str, TensorDelta]:
        return self.removal(chat.n_layers).deltas(chat)

    def files(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    def apply(self, chat: ChatModel, snapshot: Snapshot) -> None:
        self.removal(chat.n_layers).apply(chat, snapshot)


class Orthogonalization(RemovalEdit):
    """The paper's edit: no writer can add a component along ``direction``; equals ``ablate`` exactly."""

    def __init__(self, direction: torch.Tensor):
        self.direction = direction

    def removal(self, n_layers: int) -> Removal:
        return Removal(((unit_vector(self.direction), lambda writer: 1.0),))

    def describe(self) -> dict:
        return {"kind": "orthogonalization"}

    def hooks(self, chat: ChatModel) -> AbstractContextManager:
        return ablate(chat, self.direction)


class KernelEdit(RemovalEdit):
    """A search trial: ``unit`` removed with the per-layer strengths and the variant of ``params``; the
    ``biprojected_targets`` form needs ``means``, the harmless mean per layer at the source position [layers, d_model]."""

    def __init__(self, unit: torch.Tensor, params: EditParams, means: torch.Tensor | None = None):
        self.unit = unit
        self.params = params
        self.second = second_direction(unit, params)
        self.form, self.norms = variant_parts(params.variant)
        if self.form == "biprojected_targets" and means is None:
            raise RefusalError(f"the {params.variant} edit needs the harmless mean of every layer; build it with KernelEdit.from_candidates")
        self.means = means if self.form == "biprojected_targets" else None
        self.targets = target_units(unit, means) if self.form == "biprojected_targets" and means is not None else None

    @classmethod
    def from_candidates(cls, candidates: Candidates, params: EditParams, protection: Protection | None = None) -> KernelEdit:
        means = candidates.mean_harmless[:, candidates.n_post + params.position]
        return cls(source_direction(candidates, params, protection), params, means)

    def removal(self, n_layers: int) -> Removal:
        strengths = {"attn": self.params.attn.strengths(n_layers), "mlp": self.params.mlp.strengths(n_layers)}

        def strength(writer: Writer) -> float:  # the embeddings follow the attention kernel at layer 0
            return strengths["attn"][0] if writer.component == "embed" else strengths[writer.component][writer.layer]

        targets = self.targets
        unit = self.unit if targets is None else lambda writer: targets[writer.layer]  # embeddings are layer 0
        steps: tuple = ((unit, strength),)
        if self.second is not None:  # a second direction, removed from every writer with one strength
            second_strength = float(self.params.second["strength"])  # type: ignore[index]
            steps += ((self.second, lambda writer: second_strength),)
        return Removal(steps, norms=self.norms)

    def describe(self) -> dict:
        return {"kind": "kernel", "params": self.params.to_dict()}

    def hooks(self, chat: ChatModel) -> AbstractContextManager | None:
        """Each writer's output damped along the direction(s) with the kernels' strengths, computed here from the
        params, not from ``removal``: an independent reference. None where norms are rescaled: rescaling written
        vectors or coordinates is not a function of the writer's output, so the edit in memory is the reference."""
        if self.norms != "none":
            return None
        per_layer = {"attn": self.params.attn.strengths(chat.n_layers), "mlp": self.params.mlp.strengths(chat.n_layers)}
        unit: torch.Tensor | Callable[[Writer], torch.Tensor] = self.unit
        if self.means is not None:  # biprojected_targets: the unit made orthogonal to each target layer's harmless mean, here again
            u, means = self.unit.double(), self.means.double()
            unit = lambda w: (u - (u @ means[w.layer]) * means[w.layer] / means[w.layer].square().sum().clamp_min(1e-24)).float()
        steps: list = [(unit, lambda w: per_layer["attn"][0] if w.component == "embed" else per_layer[w.component][w.layer])]
        if self.second is not None and self.params.second is not None:
            steps.append((self.second, lambda w, s=float(self.params.second["strength"]): s))
        return damp_outputs(chat, steps)


@contextmanager
def edited(chat: ChatModel, edit: Edit) -> Iterator[None]:
    """Within the block the model carries ``edit``; afterwards every tensor is restored bit for bit (also on errors)."""
    snapshot = Snapshot(chat)
    try:
        edit.apply(chat, snapshot)
        yield
    finally:
        snapshot.restore()


def orthogonalized(chat: ChatModel, direction: torch.Tensor) -> AbstractContextManager:
    """Within the block the weights are orthogonalized against ``direction``; afterwards restored bit for bit."""
    return edited(chat, Orthogonalization(direction))


class Editor:
    """Many edits on one model, one at a time: ``with Editor(chat) as editor: with editor.applied(edit): ...``.

    One snapshot serves every trial: a tensor is cloned the first time any trial touches it, the
    original norms of norm-preserving edits are computed once, and each trial is reverted bit for bit.
    With ``hook_experts`` (the default) fused mixture-of-experts parameters are not copied: their
    edit is an output hook (the same map; ``weights.Snapshot.hook_output``), except for
    norm-preserving edits, which rescale each expert's vectors and so copy them.
    """

    def __init__(self, chat: ChatModel, hook_experts: bool = True):
        self.chat = chat
        self.snapshot = Snapshot(chat, hook_experts)  # fused experts by output hooks: no copy of every expert

    @contextmanager
    def applied(self, edit: Edit) -> Iterator[None]:
        """The model carries ``edit`` within the block and is reverted afterwards (also on errors)."""
        try:
            edit.apply(self.chat, self.snapshot)
            yield
        finally:
            self.snapshot.restore(keep=True)

    def close(self) -> None:
        """Revert, re-tie embeddings that were tied, and free the snapshot."""
        self.snapshot.restore()

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
