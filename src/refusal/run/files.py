"""The run directory's JSON files: written atomically, read back with a one-line error naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RefusalError


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
    finally:  # after a failed write (a full disk, an interrupt) no half-written temporary file is left behind
        tmp.unlink(missing_ok=True)


def read_json(path: Path, fix: str) -> dict:
    """A JSON object from ``path``; a one-line error naming the file and ``fix`` if it is missing or not an object."""
    if not path.is_file():
        raise RefusalError(f"{path} does not exist; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefusalError(f"{path} is not valid JSON ({getattr(e, 'msg', e)}); {fix}") from None
    if not isinstance(data, dict):
        raise RefusalError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def check_version(found: object, expected: str, what: Path | str, fix: str) -> None:
    if found != expected:
        raise RefusalError(f"{what} has format version {found!r}, this refusal reads version {expected!r}; {fix}")
