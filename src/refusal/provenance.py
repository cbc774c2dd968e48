"""Where an artifact came from: content hashes of models and files, the environment, timestamps.

A model's fingerprint is the sha256 of its config and weight files (symlinks resolved, so a Hugging
Face cache snapshot hashes its blobs). Hashing a multi-GB checkpoint takes seconds, so the size and
modification time of every file are kept beside the hash: while they match, the recorded hash is
reused (the way git's index trusts stat data), otherwise the files are hashed again.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".gguf", ".jinja", ".model", ".txt")


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment() -> dict:
    import torch
    import transformers

    from . import __version__

    return {"refusal": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def digest(value: object) -> str:
    """sha256 of a JSON-able value (keys sorted): the fingerprint of settings and inputs."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def model_files(location: str) -> list[Path]:
    """The files that define a local checkpoint (a .gguf file, or a directory's config, weights and tokenizer)."""
    path = Path(location).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES and p.name != "refusal.json")


def _stats(files: list[Path]) -> dict[str, list[int]]:
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def model_fingerprint(location: str, known: dict | None = None) -> dict:
    """{"path", "sha256", "files"} of a local checkpoint; a hub id gets sha256 None (its id is its identity).

    ``known`` is an earlier fingerprint of the same path: its hash is reused while every file's size
    and modification time are unchanged.
    """
    files = model_files(location)
    if not files:
        return {"path": location, "sha256": None, "files": {}}
    stats = _stats(files)
    if known and known.get("path") == location and known.get("files") == stats and known.get("sha256"):
        return dict(known)
    h = hashlib.sha256()
    for file in files:
        h.update(file.name.encode())
        h.update(file_sha256(file.resolve()).encode())
    return {"path": location, "sha256": h.hexdigest(), "files": stats}


def source_fingerprint(spec: str) -> str:
    """Identity of a prompt or corpus source: the content hash of a local file, the spec itself otherwise
    (``builtin`` ships with this version of refusal; an ``hf:`` dataset is fetched once into the run)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return "sha256:" + file_sha256(path)
    return spec
