"""Where refusal keeps what it builds once per machine: converted packaged models and the organism.

A module of its own so that ``models`` (which names the organism) and ``organism`` (which caches
itself) can both use it without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$REFUSAL_CACHE, or ~/.cache/refusal."""
    return Path(os.environ.get("REFUSAL_CACHE") or Path.home() / ".cache" / "refusal").expanduser()
