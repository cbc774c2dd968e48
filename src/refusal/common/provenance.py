"""Where an artifact came from: content hashes of models and files, the environment, timestamps.

A model's fingerprint is the sha256 of the files it loads: its config, tokenizer and template files
and the weight files transformers reads (through the index, subfolders included; symlinks resolved,
so a Hugging Face cache snapshot hashes its blobs). Hashing a multi-GB checkpoint takes seconds, so the size and
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

    from .. import __version__

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
    """The files a local checkpoint loads: a .gguf file, or a directory's weight files as transformers finds them
    (``model.safetensors`` or the files its index names, in subfolders too; else ``pytorch_model.bin`` or its
    index's files) and its top-level config, tokenizer and template files (and its own code, ``has_own_code``).
    Weights it does not load and dotfiles are left out."""
    path = Path(location).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    from .safetensors_files import checkpoint_files

    weights = checkpoint_files(path) or _torch_files(path)
    suffixes = set(MODEL_SUFFIXES) - {".safetensors", ".bin"} | ({".py"} if has_own_code(path) else set())
    others = [p for p in path.iterdir() if p.is_file() and p.suffix in suffixes and not p.name.startswith(".") and p.name != "refusal.json"]
    return sorted({*weights, *others}, key=lambda p: _name(p, path))


def has_own_code(directory: Path) -> bool:
    """True when the checkpoint's config or tokenizer config maps classes to its own ``*.py`` files (``auto_map``)."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            if "auto_map" in json.loads((directory / name).read_text(encoding="utf-8")):
                return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def _torch_files(directory: Path) -> list[Path]:
    """The PyTorch weight files transformers loads where there are no safetensors ones."""
    if (directory / "pytorch_model.bin").is_file():
        return [directory / "pytorch_model.bin"]
    try:
        weight_map = json.loads((directory / "pytorch_model.bin.index.json").read_text(encoding="utf-8"))["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _name(file: Path, directory: Path) -> str:
    """A file's name in the fingerprint: its path within the checkpoint (just its name at the top level)."""
    return file.relative_to(directory).as_posix() if file.is_relative_to(directory) else file.name


def _stats(files: list[Path], directory: Path) -> dict[str, list[int]]:
    return {_name(f, directory): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def model_fingerprint(location: str, known: dict | None = None) -> dict:
    """{"path", "sha256", "files"} of a local checkpoint; a hub id gets sha256 None (its id is its identity).

    ``known`` is an earlier fingerprint of the same path: its hash is reused while every file's size
    and modification time are unchanged.
    """
    files = model_files(location)
    if not files:
        return {"path": location, "sha256": None, "files": {}}
    directory = Path(location).expanduser()
    stats = _stats(files, directory)
    if known and known.get("path") == location and known.get("files") == stats and known.get("sha256"):
        return dict(known)
    h = hashlib.sha256()
    for file in files:
        h.update(_name(file, directory).encode())
        h.update(file_sha256(file.resolve()).encode())
    return {"path": location, "sha256": h.hexdigest(), "files": stats}


def source_fingerprint(spec: str) -> str:
    """Identity of a prompt or corpus source: the content hash of a local file, the spec itself otherwise
    (``builtin`` ships with this version of refusal; an ``hf:`` dataset is fetched once into the run)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return "sha256:" + file_sha256(path)
    return spec
