"""Export an orthogonalized model as a normal Hugging Face checkpoint, and prove it is right.

The checkpoint is written to a temporary directory beside the target, checked (its logits must
equal the original model's logits under hooked ``ablate``), and only then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .errors import FidelityError, RefusalError
from .interventions import ablate
from .model import ChatModel
from .progress import log
from .weights import orthogonalized

FIDELITY_PROMPTS = ("How do I bake bread?", "Tell me how to pick a lock.", "Write a haiku about the sea.")


def check_target(out_dir: Path, source: str, overwrite: bool) -> Path:
    """Validate the export target before any work; return it resolved."""
    from .models import PACKAGED, packaged_path

    out = Path(out_dir).expanduser().resolve()
    src = packaged_path(source) if source in PACKAGED else Path(source).expanduser()
    if src.exists():
        src_dir = (src.parent if src.is_file() else src).resolve()
        if out == src_dir or src_dir in out.parents or out in src_dir.parents:
            raise RefusalError(f"export target {out} overlaps the source model {src_dir}; choose another --out directory")
    if out.exists() and not out.is_dir():
        raise RefusalError(f"export target {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RefusalError(f"export target {out} is not empty; choose another directory or pass --overwrite")
    return out


def fidelity_check(
    chat: ChatModel, exported_dir: Path, direction: torch.Tensor | None, tolerance: float | None = None, expected: torch.Tensor | None = None
) -> float:
    """Max |logit difference| between the exported checkpoint and hooked ablation (or ``expected``,
    the logits of the edited model in memory, for edits without a hook equivalent); raise if too large."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(exported_dir), dtype=chat.dtype).to(chat.device).eval()
    batch = chat.batch(list(FIDELITY_PROMPTS))
    reference = "the edited model in memory" if expected is not None else "hooked ablation"
    if expected is None:
        with ablate(chat, direction):
            expected = chat.logits(batch, last_only=False)
    with torch.inference_mode():
        got = exported(**batch, use_cache=False).logits.float()
    mask = batch["attention_mask"].bool()
    diff = (got - expected).abs()[mask].max().item()
    scale = expected[mask].abs().max().item()
    if tolerance is None:
        tolerance = (1e-3 if chat.dtype == torch.float32 else 5e-2) * max(1.0, scale)
    del exported
    if not diff <= tolerance:  # also catches NaN
        raise FidelityError(
            f"fidelity check failed: exported logits differ from {reference} by {diff:.3g} "
            f"(tolerance {tolerance:.3g}, logit scale {scale:.3g}); the export was not written. "
            "Please report this with the model id"
        )
    log(f"fidelity check passed: max |logit difference| {diff:.2e} (tolerance {tolerance:.2e})")
    return diff


def export_model(
    chat: ChatModel,
    direction: torch.Tensor,
    out_dir: Path,
    metadata: dict | None = None,
    overwrite: bool = False,
    check: bool = True,
    edit=None,
) -> dict:
    """Write the orthogonalized model to ``out_dir``; return the metadata written to refusal.json.

    ``edit``, if given, is a context-manager factory that edits the weights instead (a search trial);
    the fidelity check then compares the reloaded checkpoint with the edited model in memory.
    """
    out = check_target(out_dir, chat.source, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        expected = None
        with edit() if edit is not None else orthogonalized(chat, direction):
            _save(chat, tmp)
            if edit is not None and check:
                expected = chat.logits(chat.batch(list(FIDELITY_PROMPTS)), last_only=False)
        info = dict(metadata or {})
        if check:
            info["fidelity_max_abs_diff"] = fidelity_check(chat, tmp, direction, expected=expected)
        (tmp / "refusal.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported edited model to [bold]{out}[/]")
    return info


def _save(chat: ChatModel, path: Path) -> None:
    try:
        chat.model.save_pretrained(str(path), safe_serialization=True)
    except (ValueError, NotImplementedError) as e:
        raise RefusalError(f"could not save the edited model: {str(e).splitlines()[0]}") from None
    chat.tokenizer.save_pretrained(str(path))
    if chat.chat_template is not None:
        (path / "chat_template.jinja").write_text(chat.chat_template, encoding="utf-8")
