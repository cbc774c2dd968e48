"""``edit_from_dict``: an edit back from its description (``Edit.describe``, as refusal.json or search.json keep it).

A description holds what the edit is; the data it was built from comes as arguments, as the run has it:

- ``{"kind": "orthogonalization"}`` with ``direction=`` (the selected direction);
- ``{"kind": "kernel", "params": {...}}`` with ``candidates=`` (the run's ``Candidates``) and, for a cleaned
  direction, ``protection=`` (``cleaning.Protection``), as ``KernelEdit.from_candidates`` takes them;
- ``{"kind": "tensor_deltas", ...}`` with ``directory=`` (the folder of refusal.json) where its deltas are in a file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..direction.cleaning import Protection
from ..errors import RefusalError
from ..residual.directions import Candidates
from .edits import Edit, EditParams, KernelEdit, Orthogonalization
from .tensor_deltas import TensorDeltas

ARTIFACTS: dict[str, type | tuple[type, ...]] = {
    "direction": torch.Tensor,
    "candidates": Candidates,
    "protection": Protection,
    "directory": (str, Path),
}


def edit_from_dict(data: dict, **artifacts: object) -> Edit:
    """The edit ``data`` describes (the inverse of ``describe``), built with the run's ``artifacts`` (module docstring)."""
    for name, value in artifacts.items():
        if name not in ARTIFACTS:
            raise RefusalError(f"edit_from_dict got an unknown artifact {name!r}; give {', '.join(ARTIFACTS)}")
        if value is not None and not isinstance(value, ARTIFACTS[name]):
            raise RefusalError(f"edit_from_dict's {name} is a {type(value).__name__}; give a {_names(ARTIFACTS[name])}")
    kind = data.get("kind")
    if kind == "orthogonalization":
        direction = artifacts.get("direction")
        if not isinstance(direction, torch.Tensor):
            raise RefusalError("an orthogonalization edit needs its direction; pass direction= the selected direction's vector")
        return Orthogonalization(direction)
    if kind == "kernel":
        candidates = artifacts.get("candidates")
        if not isinstance(candidates, Candidates):
            raise RefusalError("a kernel edit needs the run's candidate directions; pass candidates= (refusal run's candidates)")
        params = EditParams.from_dict(data["params"])
        params.validate(candidates.n_layers, candidates.n_post)  # a description may have been edited by hand
        protection = artifacts.get("protection")
        return KernelEdit.from_candidates(candidates, params, protection if isinstance(protection, Protection) else None)
    if kind == "tensor_deltas":
        directory = artifacts.get("directory")
        return TensorDeltas.from_description(data, Path(directory) if isinstance(directory, (str, Path)) else None)
    raise RefusalError(f"unknown edit kind {kind!r} in the description; known: orthogonalization, kernel, tensor_deltas")


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
