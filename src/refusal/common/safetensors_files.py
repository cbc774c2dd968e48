"""Safetensors checkpoints read and rewritten by offsets, for the streamed export (``streaming``).

A safetensors file is an 8-byte header length, a JSON header (each tensor's dtype, shape and byte
range) and the tensors' bytes. ``rewrite_file`` writes a copy in which chosen tensors are edited in
memory and everything else moves in the kernel (``os.copy_file_range``), never holding more than
one tensor; ``checkpoint_files`` and ``tensor_locations`` find a checkpoint's files (through its
index) and where each tensor lives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import RefusalError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
COPY_BYTES = 64 << 20  # bytes per kernel copy or read when copying unedited tensors
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"  # transformers 5 reads it before the index where both exist


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__ plus it under "__metadata__" if present, offset of the data) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100 << 20:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise RefusalError(f"{path} is not a readable safetensors file ({e}); re-download or re-save the checkpoint") from None
    return header, 8 + size


def weights_entry(directory: Path) -> Path | None:
    """The file transformers 5 opens for a checkpoint directory's weights: the one its config names as
    ``transformers_weights``, else ``model.safetensors``, else the index (in that order); None where there is none."""
    try:
        explicit = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        explicit = None
    if isinstance(explicit, str):
        return directory / _inside(explicit, directory / "config.json")
    return next((directory / name for name in (SINGLE, INDEX) if (directory / name).is_file()), None)


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files transformers loads from a checkpoint directory (``weights_entry``, through the index
    where it is one); none where there is no entry: other ``*.safetensors`` files are never read. A file named
    outside the directory is refused; a subfolder is fine."""
    entry = weights_entry(directory)
    if entry is None or not entry.name.endswith(".index.json"):
        return [] if entry is None else [entry]
    try:
        weight_map = json.loads(entry.read_text(encoding="utf-8")).get("weight_map", {})
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise RefusalError(f"{entry} is not a valid safetensors index ({e}); re-download or re-save the checkpoint") from None
    return [directory / _inside(name, entry) for name in names]


def _inside(name: object, where: Path) -> str:
    """``name`` if it is a relative path with no ``..``; symlinks are not followed (a hub snapshot's files link out of it)."""
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise RefusalError(f"{where} names the file {name!r}, outside the checkpoint directory; re-download or re-save the checkpoint")
    return name


def tensor_locations(directory: Path) -> dict[str, tuple[Path, dict]]:
    """name -> (file, header entry) for every tensor of the checkpoint."""
    found: dict[str, tuple[Path, dict]] = {}
    for file in checkpoint_files(directory):
        header, _ = read_header(file)
        for name, entry in header.items():
            if name != "__metadata__":
                found[name] = (file, entry)
    return found


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous uint8 CPU tensor."""
    array: Any = tensor.numpy()
    return memoryview(array).cast("B")


class _Files:
    """A source and a target file copied by offsets: ``copy`` moves bytes in the kernel where it can
    (``os.copy_file_range``), ``read``/``write`` go through memory for the tensors that are edited."""

    def __init__(self, source: Path, target: Path):
        self.name = str(source)
        self.src = os.open(source, os.O_RDONLY)
        self.dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.fast = hasattr(os, "copy_file_range")

    def read(self, offset: int, n: int) -> torch.Tensor:
        """``n`` bytes from ``offset`` as a uint8 tensor (not zero-filled first)."""
        out = torch.empty(n, dtype=torch.uint8)
        view, done = _bytes(out), 0
        while done < n:
            if hasattr(os, "preadv"):  # straight into the buffer
                got = os.preadv(self.src, [view[done:]], offset + done)
            else:  # macOS
                chunk = os.pread(self.src, n - done, offset + done)
                view[done : done + len(chunk)], got = chunk, len(chunk)
            if got <= 0:
                raise RefusalError(f"{self.name} ends early; the checkpoint is truncated: re-download or re-save it")
            done += got
        return out

    def write(self, offset: int, data: bytes | torch.Tensor) -> None:
        view, done = _bytes(data) if isinstance(data, torch.Tensor) else memoryview(data), 0
        while done < len(view):
            done += os.pwrite(self.dst, view[done:], offset + done)

    def copy(self, src_offset: int, dst_offset: int, n: int) -> None:
        while n > 0:
            moved = 0
            if self.fast:
                try:
                    moved = os.copy_file_range(self.src, self.dst, min(n, 1 << 30), src_offset, dst_offset)
                except OSError:  # another file system or an old kernel: through memory
                    self.fast = False
            if not self.fast:
                chunk = self.read(src_offset, min(n, COPY_BYTES))
                self.write(dst_offset, chunk)
                moved = len(chunk)
            if moved <= 0:
                raise RefusalError(f"{self.name} ends early; the checkpoint is truncated: re-download or re-save it")
            src_offset, dst_offset, n = src_offset + moved, dst_offset + moved, n - moved

    def close(self) -> None:
        os.close(self.src)
        os.close(self.dst)


def rewrite_file(source: Path, target: Path, edits: Mapping[str, Callable[[torch.Tensor], float]], copies: dict[str, str]) -> dict[str, float]:
    """Write ``source`` to ``target`` with ``edits[name](tensor)`` editing each named tensor in place (and returning
    its check residual); ``copies`` maps a new tensor name to the source tensor whose *original* bytes it gets
    (placed first). Returns each edited tensor's check residual."""
    header, start = read_header(source)
    metadata = header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    shift = sum(header[old]["data_offsets"][1] - header[old]["data_offsets"][0] for old in copies.values())
    new: dict = {}
    offset = 0
    for name, old in copies.items():
        begin, end = header[old]["data_offsets"]
        new[name] = {**header[old], "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    for name, entry in entries:
        begin, end = entry["data_offsets"]
        new[name] = {**entry, "data_offsets": [begin + shift, end + shift]}
    if metadata is not None:
        new["__metadata__"] = metadata
    blob = json.dumps(new, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    base = 8 + len(blob)  # where the target's data begins
    residuals: dict[str, float] = {}
    files = _Files(source, target)
    try:
        files.write(0, len(blob).to_bytes(8, "little") + blob)
        for name, old in copies.items():
            begin, end = header[old]["data_offsets"]
            files.copy(start + begin, base + new[name]["data_offsets"][0], end - begin)
        position = 0
        for name, entry in entries:
            if name not in edits:
                continue
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in DTYPES:
                raise RefusalError(f"checkpoint tensor {name} is stored as {entry['dtype']}; only float tensors can be edited (dequantize it first)")
            files.copy(start + position, base + shift + position, begin - position)
            raw = files.read(start + begin, end - begin)
            if raw.numel():
                tensor = raw.view(DTYPES[entry["dtype"]]).view(entry["shape"])
                residuals[name] = edits[name](tensor)
            files.write(base + shift + begin, raw)
            position = end
        data_end = max((e["data_offsets"][1] for _, e in entries), default=0)
        files.copy(start + position, base + shift + position, data_end - position)
    finally:
        files.close()
    return residuals
