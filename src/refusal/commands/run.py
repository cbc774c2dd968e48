"""``refusal run`` and its stage commands as library functions: extract -> select -> export -> evaluate.

Each stage gets its artifact from the run directory (``ctx.get``: reused while fresh, that is made from the
same model, prompts and settings, else made again; the artifacts are declared in ``run.artifacts``).

    workspace.start(...)          validate every input, load the model, open the run directory
    candidates(ctx)               difference-in-means directions        -> candidates.safetensors
    selection(ctx)                the paper's scores and choice         -> selection.json, direction.safetensors
    export(ctx, edit, ...)        orthogonalized weights, fidelity check -> RUN/model
    evaluate_run(ctx, ...)        original vs edits on the test split   -> RUN/report (commands.evaluate)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.export import check_target, export_model
from ..checkpoint.streaming import too_large_to_load
from ..common.progress import log
from ..common.provenance import environment, timestamp
from ..direction.cleaning import Protection
from ..edit.edits import Edit, EditParams, KernelEdit, Orthogonalization
from ..errors import RefusalError
from ..residual.directions import Candidates, Direction
from ..run.directory import RunDir
from ..run.lock import lock_run
from ..run.makers import protected_prompts
from ..run.workspace import Check, Context, reopen, start
from ..search.trials import paper_params
from ..settings import Settings


@dataclass
class RunResult:
    path: Path
    chosen: dict | None
    report: dict | None
    timings: dict

    def summary(self) -> dict:
        out: dict = {"run": str(self.path), "timings": self.timings}
        if self.chosen is not None:
            out["chosen"] = self.chosen
        if self.report is not None:
            out["refusal_rates"] = self.report["rates"]
            out["kl"] = self.report.get("kl")
        return out


# ---- stages ---------------------------------------------------------------------------------------
def candidates(ctx: Context, reuse_only: bool = False) -> Candidates:
    """Difference-in-means candidates from the train splits (reused while fresh; ``reuse_only``: refused when not)."""
    return ctx.require("candidates") if reuse_only else ctx.get("candidates")


def selection(ctx: Context) -> tuple[dict, Direction]:
    """The paper's selection (reused while fresh): every candidate's scores, the choice, its direction."""
    return ctx.get("selection")


def export(ctx: Context, edit: Edit, out: Path, source: str, overwrite: bool = False, extra: dict | None = None, reuse: bool = False) -> dict:
    """Write ``edit`` applied to the model as a checkpoint at ``out`` (fidelity-checked); RUN/model is the artifact
    made from ``source`` ("selection" or "search") and the edit (``reuse``: kept while it is fresh)."""
    inside = Path(out).resolve() == ctx.run.file("model").resolve()

    def write(*_: object) -> dict:
        metadata = {
            "created": timestamp(),
            "source_model": {k: ctx.run.info.get("model", {}).get(k) for k in ("source", "path", "sha256")},
            "upstream": {source: ctx.run.entry(source).get("fingerprint")},  # the selection or search it was made from
            "datasets": ctx.prompts.summary(),
            "environment": environment(),
            **(extra or {}),
            "run": os.path.relpath(ctx.run.path.resolve(), Path(out).resolve()),
        }
        return export_model(ctx.chat, edit, out, metadata, overwrite=overwrite or inside)

    if inside:
        return ctx.get("model", make=write, remake=not reuse, edit=edit.describe(), source=source)
    start = time.perf_counter()
    info = write()
    ctx.timed("export", start)
    return info


# ---- the search's artifacts, as the export reads them ---------------------------------------------
def paper_edit(ctx: Context, cands: Candidates) -> tuple[EditParams, str]:
    """The study's first trial: the paper's selected direction where the run has a fresh selection."""
    if ctx.fresh("selection"):
        chosen = ctx.run.read("selection")["chosen"]
        return paper_params(chosen["layer"], chosen["position"]), "the paper's selection (selection.json)"
    layer = max(1, int(ctx.settings.search.max_layer_fraction * cands.n_layers))
    return paper_params(layer, ctx.settings.search.source_positions[0]), f"strength 1 at layer {layer} (no selection.json)"


def protection(ctx: Context, reuse_only: bool = False) -> Protection | None:
    """The protected prompts' activations (reused while fresh); None when the search does not clean its directions."""
    if not protected_prompts(ctx):
        return None
    return ctx.require("protection") if reuse_only else ctx.get("protection")


def trial_edit(ctx: Context, cands: Candidates, trial: int, result: dict | None = None) -> tuple[KernelEdit, dict]:
    """The edit of finished trial ``trial`` (from ``result`` or a fresh search.json) and its refusal.json metadata."""
    if result is None:
        result = ctx.require("search")
    record = next((t for t in result.get("trials", []) if t.get("trial") == trial), None)
    if record is None:
        known = ", ".join(str(t) for t in result.get("front", []))
        raise RefusalError(f"trial {trial} is not a finished trial in {ctx.run.file('search')}; front trials: {known}")
    params = EditParams.from_dict(record["params"])
    params.validate(cands.n_layers, cands.n_post)  # search.json may have been edited by hand
    extra = {"search_trial": {"trial": trial, "params": record["params"], "refusal": record["refusal"], "kl": record["kl"]}}
    cleaner = protection(ctx, reuse_only=True) if params.clean is not None else None
    return KernelEdit.from_candidates(cands, params, cleaner), extra


# ---- commands ---------------------------------------------------------------------------------------
def run(settings: Settings, out: Path, overwrite: bool = False, export_model_dir: bool = True, check: Check | None = None) -> RunResult:
    """``refusal run``: every stage, each reused while fresh, then the report (original, ablated, added, edited).
    ``check(model, prompts)``: a caller's own check, run with the others before anything is written."""
    from .evaluate import evaluate_run

    begin = time.perf_counter()
    export_to = Path(out) / "model" if export_model_dir else None
    ctx = start(settings, out, overwrite, export_to=export_to, inherit=("search", "harden"), check=check)
    cands = candidates(ctx)
    chosen, direction = selection(ctx)
    edit = Orthogonalization(direction.vector)
    if export_model_dir:
        export(
            ctx,
            edit,
            ctx.run.file("model"),
            "selection",
            extra={"direction": {"layer": direction.layer, "position": direction.position, "fallback": direction.metadata.get("fallback")}},
            reuse=True,
        )
    report = evaluate_run(ctx, cands, chosen, direction, edited=export_model_dir)
    ctx.timed("total", begin)
    return RunResult(ctx.run.path, chosen["chosen"], report, ctx.run.info.get("timings", {}))


def extract(settings: Settings, out: Path, overwrite: bool = False) -> RunResult:
    """``refusal extract``: the prompts and the candidates only."""
    ctx = start(settings, out, overwrite, inherit=("search", "harden"))
    candidates(ctx)
    return RunResult(ctx.run.path, None, None, ctx.run.info.get("timings", {}))


def select(path: Path, options: dict) -> RunResult:
    """``refusal select --run RUN``: selection again with ``options`` (selection settings) changed in the run."""
    run = RunDir.open(path)
    lock_run(path)
    settings = run.settings
    for name, value in options.items():
        setattr(settings.selection, name, value)
    settings.validate()
    cands = Candidates.load(run.file("candidates"))
    settings.selection.validate(cands.n_layers, cands.n_post)  # before run.json changes
    run.update(settings=settings.to_dict())
    ctx = reopen(path)
    candidates(ctx, reuse_only=True)
    chosen, _ = selection(ctx)
    return RunResult(ctx.run.path, chosen["chosen"], None, ctx.run.info.get("timings", {}))


def export_run(path: Path, out: Path, overwrite: bool = False, trial: int | None = None, streaming: bool | None = None) -> dict:
    """``refusal export --run RUN``: the selected direction's orthogonalization, or search trial ``trial``.

    ``streaming`` (None: when the checkpoint is larger than half the available memory) exports without
    loading the model: the source checkpoint is rewritten tensor by tensor (``streaming``)."""
    run = RunDir.open(path)
    source = run.info.get("model", {}).get("path") or run.settings.model.model
    check_target(out, source, overwrite)
    if streaming is None:
        streaming = too_large_to_load(source)
        if streaming:
            log("the checkpoint is larger than half the available memory: exporting by streaming (--streaming)")
    ctx = reopen(path, weights=not streaming)
    cands = candidates(ctx, reuse_only=True)
    if trial is not None:
        edit, extra = trial_edit(ctx, cands, trial)
        info = export(ctx, edit, out, "search", overwrite, extra)
        return {"out": str(out), "trial": trial, "fidelity_max_abs_diff": info.get("fidelity_max_abs_diff"), "written": info["written"]}
    _, direction = ctx.require("selection")
    info = export(
        ctx,
        Orthogonalization(direction.vector),
        out,
        "selection",
        overwrite,
        {"direction": {"layer": direction.layer, "position": direction.position, "fallback": direction.metadata.get("fallback")}},
    )
    return {"out": str(out), "fidelity_max_abs_diff": info.get("fidelity_max_abs_diff"), "written": info["written"]}
