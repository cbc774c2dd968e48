"""The fresh held-out prompt set (issue 27): 72 harmful and 72 harmless instructions written for this project
after the built-in test split had been read while choosing the search's defaults.

No command and no prompt source reads it (``--harmful builtin:...`` names only the built-in sets): only the
final benchmark run (``benchmarks/search.py --holdout``) does, through ``load_holdout``, which first appends
the date, the commit and the reader to a log (docs/bench/holdout-reads.md), so every read is on record.
Defaults are chosen on train and validation prompts only (docs/search.md).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from ..errors import RefusalError
from .prompt_sets import KINDS

HOLDOUT_SHA256 = {  # the files' bytes: a changed set is a new set, and the log's earlier reads no longer describe it
    "harmful": "47753e70ac63ec8b4f548d014037e73a1e004790aa2fca88e21bf9bd8e7e643e",
    "harmless": "5c4a55f2cfdfbb571db87a136fbfca99d41bca2c4545cf88d70efacd3acb3250",
}
LOG_HEADER = "# Reads of the fresh held-out set\n\nEvery read of src/refusal/prompts/holdout_*.jsonl, appended by `refusal.holdout.load_holdout`.\n\n"


def holdout_bytes(kind: str) -> bytes:
    """The packaged file of held-out set ``kind``, its hash checked (no instruction is parsed here)."""
    if kind not in KINDS:
        raise RefusalError(f"unknown held-out set {kind!r}; choose one of {', '.join(KINDS)}")
    data = resources.files("refusal").joinpath("prompts").joinpath(f"holdout_{kind}.jsonl").read_bytes()
    if hashlib.sha256(data).hexdigest() != HOLDOUT_SHA256[kind]:
        raise RefusalError(f"prompts/holdout_{kind}.jsonl does not match its pinned sha256; restore the file (a changed set is not the held-out set)")
    return data


def load_holdout(log: Path, reader: str, commit: str) -> dict[str, list[str]]:
    """Both held-out sets ({"harmful": [...], "harmless": [...]}), after a line naming the date, ``commit`` and
    ``reader`` is appended to ``log``: the explicit opt-in of the one run allowed to read them."""
    if not reader.strip() or not commit.strip():
        raise RefusalError("reading the held-out set needs a reader and a commit to log; only the final benchmark run reads it")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    hashes = ", ".join(f"{kind} {HOLDOUT_SHA256[kind][:12]}" for kind in KINDS)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(("" if log.stat().st_size else LOG_HEADER) + f"- {when}: commit {commit}, read by {reader} ({hashes})\n")
    data = {kind: holdout_bytes(kind) for kind in KINDS}  # read (and checked against the pinned sha256) only once logged
    return {kind: [json.loads(line)["instruction"] for line in data[kind].decode("utf-8").splitlines() if line.strip()] for kind in KINDS}
