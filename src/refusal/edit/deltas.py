"""An edit as what it does to named checkpoint tensors: one ``TensorDelta`` per tensor it changes.

Every edit (``edits.Edit.deltas``) is a dict from a checkpoint tensor name to a delta; the in-memory edit
(``apply_deltas``), the streamed export and its read-back (``checkpoint``) all consume that dict, so any tensor
can be edited, not only the residual writers. Three kinds:

- ``Projection(steps, rows, norms)``: the rank-1 removals of a writer tensor (``edits.Removal``): for each
  (unit, strength) step its written vectors (rows, or columns) lose ``strength`` times their component along
  ``unit``. In memory it is ``weights.project_tensor`` (the search's trials, unchanged); streamed it is
  ``tensor_edit.TensorEdit``.
- ``LowRank(a, b, scale)``: W <- W + scale * a @ b, ``a`` [out, r] and ``b`` [r, in] in the tensor's layout as
  stored (a ``nn.Linear`` weight is [out, in]): a merged LoRA.
- ``Added(delta)``: W <- W + delta, any tensor (a bias, a norm's gain) and a delta of its shape.

Streamed, each delta edits the tensor as stored in float32 blocks of at most ``tensor_edit.BLOCK_BYTES`` and
returns its post-condition's worst residual in units of the rounding float32 allows (at most 1 when right).
In memory ``LowRank`` and ``Added`` run the same blocks on the parameter itself, so both agree bit for bit
where the dtypes agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import RefusalError
from ..model.architecture import Writer
from ..model.chat import ChatModel
from . import tensor_edit
from .tensor_edit import TensorEdit
from .weights import Snapshot, embeddings_tied, project_tensor

CHECKED_NUMBERS = 1 << 16  # numbers of each LowRank/Added tensor checked against float64 (its first ones)


class TensorDelta(Protocol):
    """A change to one named tensor: streamed in float32 blocks, or applied to the parameter in memory."""

    kind: str  # "projection", "low_rank" or "added": what ``tensor_deltas`` records

    def streamed(self, name: str, tensor: torch.Tensor, device: torch.device | None = None) -> float:
        """Edit ``tensor`` (as stored, any float dtype) in place; return the post-condition's worst residual."""
        ...

    def in_memory(self, name: str, tensor: torch.Tensor, snapshot: Snapshot) -> None:
        """Edit the model's parameter ``tensor`` called ``name`` in place (already saved into ``snapshot``)."""
        ...

    def tensors(self) -> dict[str, torch.Tensor]:
        """The delta's tensors by part name (``numbers`` holds its other values): what an export stores."""
        ...

    def numbers(self) -> dict:
        """The delta's JSON-able values besides its tensors."""
        ...


@dataclass(frozen=True)
class Projection:
    """Rank-1 removals of one writer tensor: float32 [d_model] units (gain-adjusted behind a post-norm) with a
    strength each, in order; ``rows``: the written vectors are rows; ``norms`` as in ``edits.Removal``."""

    steps: tuple[tuple[torch.Tensor, float], ...]
    rows: bool
    norms: str = "none"
    kind = "projection"

    def streamed(self, name: str, tensor: torch.Tensor, device: torch.device | None = None) -> float:
        return TensorEdit(name, self.steps, self.rows, self.norms).apply(tensor, device)

    def in_memory(self, name: str, tensor: torch.Tensor, snapshot: Snapshot) -> None:
        for unit, strength in self.steps:
            project_tensor(tensor, unit, strength, self.rows, self.norms, snapshot)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"units": torch.stack([unit for unit, _ in self.steps])}

    def numbers(self) -> dict:
        return {"strengths": [strength for _, strength in self.steps], "rows": self.rows, "norms": self.norms}


@dataclass(frozen=True)
class LowRank:
    """W <- W + scale * a @ b for a matrix W [out, in] as stored: ``a`` [out, r], ``b`` [r, in] (a merged LoRA)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float = 1.0
    kind = "low_rank"

    @torch.no_grad()
    def streamed(self, name: str, tensor: torch.Tensor, device: torch.device | None = None) -> float:
        shape = (self.a.shape[0], self.b.shape[-1])
        if tensor.dim() != 2 or tuple(tensor.shape) != shape or self.a.shape[1] != self.b.shape[0]:
            raise RefusalError(f"tensor {name} has shape {tuple(tensor.shape)}; its low-rank delta a @ b is {shape}: give a and b of its layout")
        device = device or tensor.device
        a, b = self.a.to(device, torch.float32), self.b.to(device, torch.float32)
        size = max(1, tensor_edit.BLOCK_BYTES // (4 * tensor.shape[1]))
        worst = 0.0
        for i in range(0, tensor.shape[0], size):
            block = tensor[i : i + size]
            x = block.to(device, torch.float32, copy=True)
            x.addmm_(a[i : i + size], b, alpha=self.scale)
            if i == 0:
                rows = max(1, min(len(x), CHECKED_NUMBERS // tensor.shape[1]))
                before = block[:rows].to(device, torch.float64)
                product = a[:rows].double() @ b.double()
                want = before + self.scale * product
                bound = before.abs() + abs(self.scale) * (a[:rows].double().abs() @ b.double().abs()) * a.shape[1]
                worst = max(worst, _residual(x[:rows], want, bound))
            block.copy_(x)
        return worst

    def in_memory(self, name: str, tensor: torch.Tensor, snapshot: Snapshot) -> None:
        self.streamed(name, tensor)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"a": self.a, "b": self.b}

    def numbers(self) -> dict:
        return {"scale": self.scale}


@dataclass(frozen=True)
class Added:
    """W <- W + delta, ``delta`` of W's shape: a bias, a norm's gain, or any tensor's full change."""

    delta: torch.Tensor
    kind = "added"

    @torch.no_grad()
    def streamed(self, name: str, tensor: torch.Tensor, device: torch.device | None = None) -> float:
        if tuple(tensor.shape) != tuple(self.delta.shape):
            raise RefusalError(f"tensor {name} has shape {tuple(tensor.shape)}; its added delta has {tuple(self.delta.shape)}: give one of its shape")
        device = device or tensor.device
        flat, delta = tensor.view(-1), self.delta.reshape(-1)
        size = max(1, tensor_edit.BLOCK_BYTES // 4)
        worst = 0.0
        for i in range(0, flat.numel(), size):
            x = flat[i : i + size].to(device, torch.float32, copy=True)
            d = delta[i : i + size].to(device, torch.float32)
            x.add_(d)
            if i == 0:
                n = min(len(x), CHECKED_NUMBERS)
                before = flat[:n].to(device, torch.float64)
                worst = max(worst, _residual(x[:n], before + d[:n].double(), before.abs() + d[:n].double().abs()))
            flat[i : i + size].copy_(x)
        return worst

    def in_memory(self, name: str, tensor: torch.Tensor, snapshot: Snapshot) -> None:
        self.streamed(name, tensor)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta}

    def numbers(self) -> dict:
        return {}


def _residual(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> float:
    """Largest |got - want| in units of the rounding float32 allows for values of magnitude ``bound``."""
    allowed = 8 * torch.finfo(torch.float32).eps * bound + 1e-6
    worst = float(((got.double() - want).abs() / allowed).max())
    return worst if worst == worst else math.inf  # NaN: failed (``max`` would drop it)


def delta_from(kind: str, tensors: dict[str, torch.Tensor], numbers: dict) -> TensorDelta:
    """The delta that ``tensors()`` and ``numbers()`` describe (``tensor_deltas`` reads a stored edit with it)."""
    if kind == "projection":
        units = tensors["units"].float()
        steps = tuple((unit, float(s)) for unit, s in zip(units, numbers["strengths"], strict=True))
        return Projection(steps, bool(numbers["rows"]), str(numbers.get("norms", "none")))
    if kind == "low_rank":
        return LowRank(tensors["a"], tensors["b"], float(numbers.get("scale", 1.0)))
    if kind == "added":
        return Added(tensors["delta"])
    raise RefusalError(f"unknown tensor delta kind {kind!r}; use projection, low_rank or added")


def named_tensor(chat: ChatModel, name: str) -> torch.Tensor:
    """The model's parameter called ``name`` (a ``state_dict`` name, as in the checkpoint)."""
    try:
        return chat.model.get_parameter(name)
    except AttributeError:
        raise RefusalError(f"the model has no parameter {name}; name a tensor of model.state_dict()") from None


@torch.no_grad()
def apply_deltas(chat: ChatModel, deltas: dict[str, TensorDelta], snapshot: Snapshot) -> None:
    """In place: every named tensor changed by its delta, saved into ``snapshot`` first. A tied token embedding is
    untied first (``Snapshot.save``); a fused experts' projection is an output hook where ``snapshot.hook_experts``
    (its bias then too: the hook sees the output with it)."""
    writers = {w.weight_name: w for w in (*chat.embeddings, *chat.writers)}
    hooked = {
        name: writer
        for name, writer in writers.items()
        if isinstance(delta := deltas.get(name), Projection) and snapshot.hook_experts and writer.weight.dim() == 3 and delta.norms == "none"
    }
    skipped = {w.bias_name for w in hooked.values() if isinstance(deltas.get(w.bias_name or ""), Projection)}
    output = chat.model.get_output_embeddings()
    for name, delta in deltas.items():
        tensor = named_tensor(chat, name)
        if tensor.device.type == "meta":  # offloaded by accelerate (its value lives elsewhere), or a skeleton's
            raise RefusalError(
                f"{name} has no weights in memory (offloaded by --device-map, or a model structure only); "
                "edits in place need every edited tensor in GPU or CPU memory: give the placement more memory, or export with --streaming"
            )
        if name in skipped:
            continue
        if name in hooked and isinstance(delta, Projection):
            for unit, strength in delta.steps:
                snapshot.hook_output(hooked[name].module, unit, strength)  # fused experts have no post-norm gain
            continue
        if embeddings_tied(chat) and output is not None and tensor is output.weight and name != token_embedding_name(chat):
            raise RefusalError(f"{name} is tied to the token embedding; edit {token_embedding_name(chat)} instead, or untie them first")
        snapshot.save(tensor)
        delta.in_memory(name, tensor, snapshot)


def token_embedding_name(chat: ChatModel) -> str:
    """The token embedding's checkpoint name."""
    return chat.embeddings[0].weight_name


@dataclass(frozen=True)
class Removal:
    """What an edit does to each residual writer: for each step in order, the writer loses ``strength(writer)``
    times its component along the step's unit (one for every writer, or a function of the writer: one per
    target layer). ``norms``: "none", "written_norms" (every written vector then rescaled to its original norm)
    or "coordinate_norms" (each residual coordinate's weights keep their norm; ``projection.project_out_coordinates``).
    ``deltas`` is it as ``Projection`` deltas by checkpoint name: what the in-memory edit and the export consume."""

    steps: tuple[tuple[torch.Tensor | Callable[[Writer], torch.Tensor], Callable[[Writer], float]], ...]
    norms: str = "none"

    @staticmethod
    def unit(step_unit: torch.Tensor | Callable[[Writer], torch.Tensor], writer: Writer) -> torch.Tensor:
        """The step's unit direction for ``writer``."""
        return step_unit if isinstance(step_unit, torch.Tensor) else step_unit(writer)

    def deltas(self, chat: ChatModel) -> dict[str, TensorDelta]:
        """A ``Projection`` of every writer tensor (weights and biases) with a step of nonzero strength, by checkpoint
        name; units float32 on the CPU, gain-adjusted behind a post-norm; biases keep no norms."""
        deltas: dict[str, TensorDelta] = {}
        for writer in (*chat.embeddings, *chat.writers):
            units = [writer.direction(Removal.unit(unit, writer).float().cpu()).float().cpu() for unit, _ in self.steps]
            steps = tuple((u, s) for u, (_, strength) in zip(units, self.steps) if (s := strength(writer)) != 0)
            if not steps:
                continue
            deltas[writer.weight_name] = Projection(steps, writer.rows, self.norms)
            if writer.bias_name is not None:
                deltas[writer.bias_name] = Projection(steps, rows=True)
        return deltas

    def apply(self, chat: ChatModel, snapshot: Snapshot) -> None:
        apply_deltas(chat, self.deltas(chat), snapshot)
