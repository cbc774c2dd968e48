"""Export an edited model as a normal Hugging Face checkpoint, and prove it is right.

The checkpoint is written to a temporary directory beside the target. Where the model came from a
local safetensors checkpoint it is the source rewritten tensor by tensor (``streaming``: the source's
dtype and sharding, bounded memory, each edited tensor checked); otherwise the model in memory is
saved. Where the model is loaded, the export is then checked end to end: reloaded, its logits must
equal the edit's fidelity reference (its hooked equivalent, e.g. ``ablate`` for the paper's
orthogonalization, or else the edited model in memory). Only then is it renamed into place, with the
edit's description in ``refusal.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..common.progress import log
from ..edit.edits import Edit, edited
from ..errors import FidelityError, RefusalError
from ..model.architecture import HFModel
from ..model.chat import ChatModel
from ..model.packaged import is_packaged, packaged_path
from .read_back import exported_in_place
from .streaming import NamesDiffer, streamable, write_edited_checkpoint

FIDELITY_PROMPTS = ("How do I bake bread?", "Tell me how to pick a lock.", "Write a haiku about the sea.")


def _resolved_files(source: Path) -> set[Path]:
    """Every file the source checkpoint consists of, symlinks followed (a hub cache's snapshot links into blobs/)."""
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
    return {p.resolve() for p in files}


def remove_dead_partials(directory: Path, name: str = "*") -> None:
    """Remove ``.NAME.partial-PID`` outputs (a whole checkpoint on a real model) left by processes that are gone."""
    for partial in Path(directory).glob(f".{name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_overlap(target: Path, source: str, what: str = "export target") -> None:
    """Raise if ``target`` is, contains or lies inside the source model's directory, or holds a file its symlinks resolve to."""
    out = Path(target).expanduser().resolve()
    src = packaged_path(source) if is_packaged(source) else Path(source).expanduser()
    if not src.exists():
        return
    src_dir = (src.parent if src.is_file() else src).resolve()
    overlap = out == src_dir or src_dir in out.parents or out in src_dir.parents
    if not overlap:
        overlap = any(out == f.parent or out in f.parents for f in _resolved_files(src))
    if overlap:
        raise RefusalError(f"{what} {out} overlaps the source model {src_dir}; choose another --out directory")


def check_target(out_dir: Path, source: str, overwrite: bool) -> Path:
    """Validate the export target before any work; return it resolved.

    ``source`` is the model's location (``ChatModel.path``) or a packaged name. The target must not
    contain, or lie inside, the source directory, nor hold any file the source's files resolve to.
    """
    out = Path(out_dir).expanduser().resolve()
    check_overlap(out, source)
    if out.exists() and not out.is_dir():
        raise RefusalError(f"export target {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RefusalError(f"export target {out} is not empty; choose another directory or pass --overwrite")
    return out


def fidelity_check(
    chat: ChatModel,
    exported_dir: Path,
    expected: torch.Tensor,
    reference: str = "the edited model in memory",
    tolerance: float | None = None,
    original: torch.Tensor | None = None,
    low_precision: bool | None = None,
    in_place: bool = False,
    names: Iterable[str] | None = None,
) -> float:
    """Max |logit difference| between the exported checkpoint and ``expected`` (the logits of
    ``FIDELITY_PROMPTS`` under the fidelity reference, named by ``reference``); raise if too large.

    The export's logits come from reloading it, or (``in_place``, for a checkpoint streamed from the
    model's own source, whose other tensors are byte copies) from the loaded model with every edited
    tensor (``names``, default the writers') read from the export (``read_back.exported_in_place``): no
    second copy of the model.
    The tolerance is 1e-3 of the logit scale in float32 and 5e-2 in bf16/fp16 (``low_precision``:
    the model's or the checkpoint's dtype). A deep low-precision model differs from itself in float32
    by more than that (docs/scale.md), so there the tolerance is also at
    least a third of the edit's own effect, max |expected - ``original``|: a missing or wrong edit
    leaves the export near the original, a whole effect away from the reference.
    """
    batch = chat.batch(list(FIDELITY_PROMPTS))
    if in_place:
        with exported_in_place(chat, exported_dir, names):
            got = chat.logits(batch, last_only=False)
    else:
        from transformers import AutoModelForCausalLM

        exported: HFModel = AutoModelForCausalLM.from_pretrained(str(exported_dir), dtype=chat.dtype, trust_remote_code=chat.trust_remote_code)
        exported = exported.to(chat.device).eval()
        with torch.inference_mode():
            got = exported(**batch, use_cache=False).logits.float()
        del exported
    mask = batch["attention_mask"].bool()
    diff = (got.to(expected.device) - expected).abs()[mask].max().item()
    scale = expected[mask].abs().max().item()
    if tolerance is None:
        low = chat.dtype != torch.float32 if low_precision is None else low_precision
        tolerance = (5e-2 if low else 1e-3) * max(1.0, scale)
        if low and original is not None:
            tolerance = max(tolerance, (expected - original).abs()[mask].max().item() / 3)
    if not diff <= tolerance:  # also catches NaN
        raise FidelityError(
            f"fidelity check failed: exported logits differ from {reference} by {diff:.3g} "
            f"(tolerance {tolerance:.3g}, logit scale {scale:.3g}); the export was not written. "
            "Please report this with the model id"
        )
    log(f"fidelity check passed: max |logit difference| {diff:.2e} (tolerance {tolerance:.2e})")
    return diff


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that a partial export is removed
    (by default SIGTERM ends the process on the spot, leaving it whole). Only in the main thread, which is
    where Python handles signals, and only where no one else handles SIGTERM."""
    mine = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, _interrupt) if mine else None
    try:
        yield
    finally:
        if mine:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def export_model(chat: ChatModel, edit: Edit, out_dir: Path, metadata: dict | None = None, overwrite: bool = False, check: bool = True) -> dict:
    """Write ``chat`` carrying ``edit`` to ``out_dir``; return the metadata written to refusal.json.

    ``refusal.json`` holds ``metadata``, the edit's description under "edit" (the files it names, ``edit.files()``,
    beside it: ``described.edit_from_dict`` reads it back), how it was written
    ("streamed" from the source checkpoint, with its tensor check) and, with ``check``, the fidelity
    check's max |logit difference| against ``edit.hooks(chat)`` (or, for an edit without a hooked
    equivalent, the edited model in memory). The model is unchanged afterwards. A model loaded without
    weights (``loading.load_skeleton``) exports only by streaming, with ``check=False``. Interrupted
    (Ctrl-C or SIGTERM), it leaves nothing behind.
    """
    with terminate_as_interrupt():
        return _export(chat, edit, out_dir, metadata, overwrite, check)


def _export(chat: ChatModel, edit: Edit, out_dir: Path, metadata: dict | None, overwrite: bool, check: bool) -> dict:
    out = check_target(out_dir, chat.path, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RefusalError(f"cannot create {out.parent} for the export ({e.strerror}); choose another --out") from None
    remove_dead_partials(out.parent, out.name)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if not chat.has_weights and not streamable(chat):
        raise RefusalError(f"{chat.source} was opened without its weights, and its checkpoint is not a local safetensors directory to stream from")
    check = check and chat.has_weights
    try:
        written = None
        deltas = edit.deltas(chat)
        if streamable(chat):
            tmp.mkdir()
            try:
                written = write_edited_checkpoint(chat, deltas, Path(chat.path), tmp)
            except NamesDiffer as e:
                if not chat.has_weights:
                    raise
                log(f"{e}: saving the model from memory instead")
                shutil.rmtree(tmp)
        if written is None:
            with edited(chat, edit):
                _save(chat, tmp)
            written = {"streamed": False, "tensor_dtypes": [str(chat.dtype).replace("torch.", "")]}
        description = edit.describe()
        info = {**(metadata or {}), "edit": description, "written": written}
        for name, tensors in edit.files().items():  # what the description names, beside refusal.json
            save_file(tensors, str(tmp / name))
        if check:
            batch = chat.batch(list(FIDELITY_PROMPTS))
            hooks = edit.hooks(chat)
            if hooks is not None:
                with hooks:
                    expected = chat.logits(batch, last_only=False)
                reference = f"its hooked equivalent ({description['kind']})"
            else:
                with edited(chat, edit):
                    expected = chat.logits(batch, last_only=False)
                reference = "the edited model in memory"
            low = chat.dtype != torch.float32 or any(d not in ("F32", "F64", "float32") for d in written["tensor_dtypes"])
            original = chat.logits(batch, last_only=False) if low else None  # only the low-precision tolerance reads it
            info["fidelity_reference"] = reference
            info["fidelity_max_abs_diff"] = fidelity_check(
                chat, tmp, expected, reference, original=original, low_precision=low, in_place=written["streamed"], names=list(deltas)
            )
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
