"""One checkpoint tensor's rank-1 removals in bounded memory: ``deltas.Projection`` streamed (``streaming``).

A ``TensorEdit`` applies a ``Removal``'s steps to one writer tensor read from a checkpoint, in float32 blocks of
at most ``BLOCK_BYTES`` (on the GPU where there is one), cast back to the tensor's dtype, and checks the first
``CHECKED`` vectors step by step: the component along each step's direction must be (1 - strength) times what it
was, and where norms are kept, the kept norms must hold to the precision of the tensor's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RefusalError

FILE_WORKERS = 4  # at most this many files rewritten at once (each holds one edited tensor at a time): ``streaming.file_workers``
BLOCK_BYTES = 64 << 20  # float32 bytes of one block of an edited matrix
CHECKED = 256  # vectors of each edited tensor checked step by step (its first ones)


@dataclass(frozen=True)
class TensorEdit:
    """One checkpoint tensor's edit: for each (unit, strength) step in order, its vectors lose ``strength``
    times their component along ``unit``; ``norms`` (``edits.Removal``): "written_norms" rescales them to their
    original norms at the end, "coordinate_norms" applies each step in the published norm-preserving form."""

    name: str
    steps: tuple[tuple[torch.Tensor, float], ...]  # float32 [d_model] units, gain-adjusted behind a post-norm
    rows: bool  # the written vectors are rows (embeddings, Conv1D, biases) rather than columns (Linear)
    norms: str = "none"

    @torch.no_grad()
    def apply(self, tensor: torch.Tensor, device: torch.device | None = None) -> float:
        """Edit ``tensor`` (any float dtype) in place, block by block, computing in float32 on ``device`` (default
        the CPU); returns the largest check residual (``check``). A 3-D tensor holds fused experts, one matrix
        per expert along its first dimension."""
        if device is not None and device.type == "cuda" and tensor.device.type == "cpu" and _fits_on(device, tensor):
            work = tensor.to(device)  # one contiguous transfer each way, not one per (strided) block
            worst = self.apply(work, device)
            tensor.copy_(work)
            return worst
        if tensor.dim() == 3:
            return max((self.apply(matrix, device) for matrix in tensor), default=0.0)
        if tensor.dim() == 1:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 2:
            raise RefusalError(f"checkpoint tensor {self.name} is {tensor.dim()}-D; only vectors, matrices and fused experts can be edited")
        d = tensor.shape[1] if self.rows else tensor.shape[0]
        if d != self.steps[0][0].numel():
            shape = tuple(tensor.shape)
            raise RefusalError(f"checkpoint tensor {self.name} has shape {shape}, which does not write d_model = {self.steps[0][0].numel()} vectors")
        device = device or torch.device("cpu")
        steps = [(unit.to(device, torch.float32), strength) for unit, strength in self.steps]
        if self.norms == "coordinate_norms":
            return self._apply_coordinates(tensor, steps, device)
        dim = -1 if self.rows else 0
        worst = 0.0
        for k, block in enumerate(self._blocks(tensor)):
            x = block.to(device, torch.float32, copy=True)  # [vectors, d_model] (rows) or [d_model, vectors]
            norms = x.norm(dim=dim) if self.norms == "written_norms" else None  # [vectors]
            checked = k == 0  # each tensor's first CHECKED vectors are checked step by step: a wrong name, orientation or direction shows
            original = self._first(x).clone() if checked else None
            for unit, strength in steps:
                before = self._first(x).clone() if checked else None
                if self.rows:
                    x.addr_(x @ unit, unit, alpha=-strength)  # x <- x - s (x u) u^T
                else:
                    x.addr_(unit, unit @ x, alpha=-strength)  # x <- x - s u (u^T x)
                if before is not None and original is not None:
                    worst = max(worst, self.check(before, self._first(x), unit, strength, original))
            if norms is not None:
                x.mul_((norms / x.norm(dim=dim).clamp_min(1e-12)).unsqueeze(dim))
            block.copy_(x)
            if norms is not None and checked:
                want = norms[:CHECKED]
                got = self._first(block).to(device, torch.float32).norm(dim=dim)
                worst = max(worst, float(((got - want).abs() / (8 * torch.finfo(block.dtype).eps * want + 1e-6)).max()))
        return worst

    def _blocks(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Views of at most ``BLOCK_BYTES`` of float32 each, whole vectors (rows, or columns) each."""
        d = tensor.shape[1] if self.rows else tensor.shape[0]
        size = max(1, BLOCK_BYTES // (4 * d))
        n = tensor.shape[0] if self.rows else tensor.shape[1]
        return [tensor[i : i + size] if self.rows else tensor[:, i : i + size] for i in range(0, n, size)]

    def _apply_coordinates(self, tensor: torch.Tensor, steps: list[tuple[torch.Tensor, float]], device: torch.device) -> float:
        """Each step in the published norm-preserving form (``projection.project_out_coordinates``), block by block:
        one pass for each residual coordinate's norm, one for its norm after the step, one to write. The first
        block is checked: in the coordinate-normalised matrix the component along the unit is (1 - strength) times."""
        worst = 0.0
        for unit, strength in steps:
            sums = [torch.zeros(unit.numel(), dtype=torch.float64, device=device) for _ in range(2)]
            for stage in range(3):
                coord, after = (v.sqrt().float().clamp_min(1e-12) for v in sums)
                for k, block in enumerate(self._blocks(tensor)):
                    x = block.to(device, torch.float32, copy=True)
                    xt = x if self.rows else x.T  # [vectors, d_model]
                    if stage == 0:
                        sums[0] += (xt.double() ** 2).sum(0)
                        continue
                    y = xt / coord
                    y = y - strength * (y @ unit).unsqueeze(-1) * unit
                    if stage == 1:
                        sums[1] += (y.double() ** 2).sum(0)
                        continue
                    out = y * (coord / after)
                    if k == 0:
                        normal = (xt / coord)[:CHECKED]
                        got, want = (out[:CHECKED] * after / coord) @ unit, (1 - strength) * (normal @ unit)
                        allowed = 8 * torch.finfo(torch.float32).eps * normal.norm(dim=-1) + 1e-6
                        worst = max(worst, float(((got - want).abs() / allowed).max()))
                    block.copy_(out if self.rows else out.T)
        return worst

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        """The first ``CHECKED`` vectors of a block (rows, or columns)."""
        return x[:CHECKED] if self.rows else x[:, :CHECKED]

    def check(self, before: torch.Tensor, after: torch.Tensor, unit: torch.Tensor, strength: float, original: torch.Tensor) -> float:
        """Largest error of one step's result along ``unit``, in units of the rounding float32 allows (at most 1 for
        a correct edit): the component must be (1 - strength) times what it was."""
        got = after @ unit if self.rows else unit @ after
        want = (1 - strength) * (before @ unit if self.rows else unit @ before)
        allowed = 8 * torch.finfo(torch.float32).eps * original.norm(dim=-1 if self.rows else 0) + 1e-6
        return float(((got - want).abs() / allowed).max())


def _fits_on(device: torch.device, tensor: torch.Tensor) -> bool:
    """True when ``tensor`` plus its float32 blocks, once per file worker, take at most half of ``device``'s free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return 2 * FILE_WORKERS * (tensor.nbytes + 2 * BLOCK_BYTES) <= free
