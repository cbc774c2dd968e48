"""The hardening's resumable state in one safetensors file: the adapter, the best adapter so far, AdamW's moments,
and (as metadata) the step, the elapsed time, the checkpoints and the fingerprint of what it was trained from."""

from __future__ import annotations

from pathlib import Path

import torch

from ..common.progress import log
from ..errors import RefusalError
from ..residual.directions import load_tensors, save_tensors


def save_state(path: Path, state: dict, fingerprint: str) -> None:
    """``training.train``'s state -> ``path`` (atomically)."""
    optimizer = state["optimizer"]
    tensors = {f"adapter/{k}": v for k, v in state["adapter"].items()}
    tensors |= {f"best/{k}": v for k, v in state["best"]["adapter"].items()}
    for index, moments in optimizer["state"].items():
        tensors |= {f"opt/{index}/{key}": torch.as_tensor(value).detach().cpu().clone() for key, value in moments.items()}
    metadata = {
        "fingerprint": fingerprint,
        "step": state["step"],
        "elapsed": state["elapsed"],
        "history": state["history"],
        "best_checkpoint": state["best"]["checkpoint"],
        "param_groups": optimizer["param_groups"],
    }
    save_tensors(tensors, metadata, path)


def load_state(path: Path, fingerprint: str) -> dict:
    """The saved state when it was trained from the same inputs (``fingerprint``), else {} (start again)."""
    if not path.is_file():
        return {}
    try:
        tensors, meta = load_tensors(path, ())
    except RefusalError as e:
        log(f"harden: the saved state cannot be read ({e}); starting again")
        return {}
    if meta.get("fingerprint") != fingerprint:
        log("harden: the model, prompts, direction or hardening settings changed; starting the training again")
        return {}
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, name = key.split("/", 2)
            moments.setdefault(int(index), {})[name] = value
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    log(f"harden: resuming after step {meta['step']}")
    return {
        "step": meta["step"],
        "elapsed": meta["elapsed"],
        "history": meta["history"],
        "best": {"checkpoint": meta["best_checkpoint"], "adapter": part("best/")},
        "adapter": part("adapter/"),
        "optimizer": {"state": moments, "param_groups": meta["param_groups"]},
    }
