"""``TensorDeltas``: an edit given directly as its tensor deltas (``deltas``), e.g. a merged LoRA or a bias edit.

It applies in memory, streams into an export and is read back like any edit; it has no hooked equivalent, so
the export's fidelity reference is the edit in memory. Its description (``describe``) names every delta with its
kind and values, and a sha256 of them all: small deltas are inline in the description (``INLINE_NUMBERS``),
larger ones in ``FILE`` beside refusal.json (``files``), read back by ``from_description`` and refused if
their digest is not the recorded one.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from ..errors import RefusalError
from ..model.chat import ChatModel
from .deltas import TensorDelta, apply_deltas, delta_from
from .weights import Snapshot

FILE = "edit.safetensors"  # the deltas' tensors beside refusal.json, keys "<tensor name>:<part>"
INLINE_NUMBERS = 1024  # deltas of at most this many numbers in all are kept inline in the description


class TensorDeltas:
    """The edit that changes each named checkpoint tensor by its delta; ``note`` (JSON-able) is recorded with it,
    e.g. how a LoRA was trained."""

    def __init__(self, deltas: dict[str, TensorDelta], note: dict | None = None):
        if not deltas:
            raise RefusalError("a tensor-deltas edit has no delta; give at least one tensor name and its delta")
        self.tensor_deltas = dict(deltas)
        self.note = note
        self._digest: str | None = None

    def deltas(self, chat: ChatModel) -> dict[str, TensorDelta]:
        return dict(self.tensor_deltas)

    def apply(self, chat: ChatModel, snapshot: Snapshot) -> None:
        apply_deltas(chat, self.tensor_deltas, snapshot)

    def hooks(self, chat: ChatModel) -> AbstractContextManager | None:
        return None  # no hooked equivalent: the export is checked against the edit in memory

    def stored(self) -> dict[str, torch.Tensor]:
        """Every delta's tensors, keyed "<tensor name>:<part>", contiguous on the CPU, sharing no storage."""
        return {f"{name}:{part}": t.detach().cpu().contiguous().clone() for name, d in self.tensor_deltas.items() for part, t in d.tensors().items()}

    def inline(self) -> bool:
        return sum(t.numel() for d in self.tensor_deltas.values() for t in d.tensors().values()) <= INLINE_NUMBERS

    def digest(self) -> str:
        """sha256 of every delta's name, kind, values and tensors (dtype, shape, bytes): identifies the edit."""
        if self._digest is None:
            self._digest = deltas_digest(self.tensor_deltas)
        return self._digest

    def describe(self) -> dict:
        tensors = {}
        for name, delta in self.tensor_deltas.items():
            record = {"delta": delta.kind, **delta.numbers()}
            if self.inline():
                record["tensors"] = {part: _inline(t) for part, t in delta.tensors().items()}
            tensors[name] = record
        note = {"note": self.note} if self.note is not None else {}
        return {"kind": "tensor_deltas", "sha256": self.digest(), "file": None if self.inline() else FILE, "tensors": tensors, **note}

    def files(self) -> dict[str, dict[str, torch.Tensor]]:
        return {} if self.inline() else {FILE: self.stored()}

    @classmethod
    def from_description(cls, data: dict, directory: Path | None = None) -> TensorDeltas:
        """The edit ``describe`` gave ``data``, its file (if any) read from ``directory``; refused if its digest differs."""
        stored: dict[str, torch.Tensor] = {}
        if data.get("file"):
            if directory is None:
                raise RefusalError(f"this tensor-deltas edit keeps its deltas in {data['file']}; pass directory= the folder holding it")
            path = Path(directory) / data["file"]
            if not path.is_file():
                raise RefusalError(f"{path} is missing; it holds the edit's deltas: copy it back beside refusal.json, or re-export")
            from safetensors.torch import load_file

            stored = load_file(str(path))
        deltas: dict[str, TensorDelta] = {}
        if not isinstance(data.get("tensors"), dict):
            raise RefusalError("this tensor-deltas description names no tensors; it is not one refusal wrote: re-export the edit")
        for name, record in data["tensors"].items():
            numbers = {k: v for k, v in record.items() if k not in ("delta", "tensors")}
            parts = record.get("tensors")
            if parts is not None:
                tensors = {part: _from_inline(value) for part, value in parts.items()}
            else:
                tensors = {key.rsplit(":", 1)[1]: t for key, t in stored.items() if key.rsplit(":", 1)[0] == name}
            deltas[name] = delta_from(record["delta"], tensors, numbers)
        edit = cls(deltas, data.get("note"))
        if edit.digest() != data.get("sha256"):
            where = data.get("file") or "its description"
            raise RefusalError(f"the edit's deltas in {where} do not match the sha256 recorded with them; they were changed: re-export the edit")
        return edit


def deltas_digest(deltas: dict[str, TensorDelta]) -> str:
    """sha256 of the deltas in name order: name, kind, values, and each tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(deltas):
        delta = deltas[name]
        h.update(json.dumps([name, delta.kind, delta.numbers()], sort_keys=True).encode())
        for part, t in sorted(delta.tensors().items()):
            t = t.detach().cpu().contiguous()
            h.update(json.dumps([part, str(t.dtype), list(t.shape)]).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _inline(t: torch.Tensor) -> dict:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "values": t.detach().cpu().reshape(-1).tolist()}


def _from_inline(value: dict) -> torch.Tensor:
    dtype = getattr(torch, value["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise RefusalError(f"an inline delta has dtype {value['dtype']!r}, which torch does not know; use float32, bfloat16 or float16")
    return torch.tensor(value["values"], dtype=dtype).reshape(value["shape"])
