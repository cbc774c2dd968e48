"""``refusal run`` and its stage commands as library functions: extract -> select -> export -> evaluate.

Each stage checks whether its artifact in the run directory is fresh (``run_dir``: made from the same
model, prompts and settings) and otherwise recomputes it; data stays in memory within one call.

    workspace.start(...)          validate every input, load the model, open the run directory
    candidates(ctx)               difference-in-means directions        -> candidates.safetensors
    selection(ctx, candidates)    the paper's scores and choice         -> selection.json, direction.safetensors
    export(ctx, edit, ...)        orthogonalized weights, fidelity check -> RUN/model
    assess.evaluate_run(ctx, ...) original vs edits on the test split   -> RUN/report
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
from ..data.prompt_sets import dataset_hash, load_capability, load_self_questions
from ..direction.cleaning import Protection, protect
from ..direction.selection import score_candidates, select_direction
from ..edit.edits import Edit, EditParams, KernelEdit, Orthogonalization
from ..errors import RefusalError
from ..residual.activations import mean_activations
from ..residual.directions import Candidates, Direction, compute_candidates
from ..run import given as given_run
from ..run.directory import ARTIFACTS, RunDir, write_json
from ..run.lock import lock_run
from ..run.workspace import Context, reopen, start, validation_inputs
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
def candidate_inputs(ctx: Context) -> dict:
    return given_run.candidate_inputs(ctx.model_id, ctx.prompts)


def candidates(ctx: Context, reuse_only: bool = False) -> Candidates:
    """Difference-in-means candidates from the train splits (reused while fresh)."""
    run, inputs = ctx.run, candidate_inputs(ctx)
    if run.fresh("candidates", ctx.settings, inputs):
        return Candidates.load(run.file("candidates"))
    if reuse_only:
        run.ensure_fresh("candidates", ctx.settings, inputs)
    run.remove("candidates")
    start = time.perf_counter()
    chat, batch = ctx.chat, ctx.settings.evaluation.batch_size
    log(f"post-instruction tokens: {chat.tokenizer.convert_ids_to_tokens(chat.post_instruction_ids)}")
    mean_harmful = mean_activations(chat, ctx.prompts.get("harmful", "train"), batch, "harmful activations")
    mean_harmless = mean_activations(chat, ctx.prompts.get("harmless", "train"), batch, "harmless activations")
    result = compute_candidates(
        mean_harmful,
        mean_harmless,
        {
            "created": timestamp(),
            "model": ctx.model_id,
            "harmful_train_sha256": inputs["harmful_train"],
            "harmless_train_sha256": inputs["harmless_train"],
            "rows": "decoder-layer inputs 0..n_layers-1, then the final residual",
            "positions": "negative offsets -n_post..-1",
        },
    )
    result.save(run.file("candidates"))
    run.record("candidates", ctx.settings, inputs)
    ctx.timed("extract", start)
    return result


def selection_inputs(ctx: Context) -> dict:
    return validation_inputs(ctx.prompts)


def selection(ctx: Context, cands: Candidates) -> tuple[dict, Direction]:
    """The paper's selection (reused while fresh): every candidate's scores, the choice, its direction."""
    run, inputs, upstream = ctx.run, selection_inputs(ctx), ("candidates",)
    if run.fresh("selection", ctx.settings, inputs, upstream):
        return run.read("selection"), Direction.load(run.file("selection", 1))
    partial = run.file("selection", 2)
    for name in ("selection.json", "direction.safetensors"):
        (run.path / name).unlink(missing_ok=True)
    start = time.perf_counter()
    chat, s = ctx.chat, ctx.settings
    refusal_ids = chat.refusal_token_ids(s.evaluation.refusal_tokens)
    records = score_candidates(
        chat,
        cands,
        ctx.prompts.get("harmful", "val"),
        ctx.prompts.get("harmless", "val"),
        refusal_ids,
        s.selection,
        batch_size=s.evaluation.batch_size,
        cache_path=partial,
        cache_key=run.fingerprint("selection", s, inputs, upstream),
    )
    chosen = select_direction(records)
    result = {
        "format_version": ARTIFACTS["selection"].format_version,
        "created": timestamp(),
        "settings": s.to_dict()["selection"],
        "refusal_tokens": chat.tokenizer.convert_ids_to_tokens(refusal_ids),
        "chosen": chosen,
        "candidates": records,
    }
    direction = Direction(
        cands.direction(chosen["layer"], chosen["position"]),
        chosen["layer"],
        chosen["position"],
        {
            "model": ctx.model_id,
            "fallback": chosen["fallback"],
            "harmful_train_sha256": cands.metadata.get("harmful_train_sha256"),
            "harmless_train_sha256": cands.metadata.get("harmless_train_sha256"),
        },
    )
    write_json(run.file("selection"), result)
    direction.save(run.file("selection", 1))
    partial.unlink(missing_ok=True)
    run.record("selection", s, inputs, upstream)
    ctx.timed("select", start)
    log(
        f"chosen direction: layer {chosen['layer']}, position {chosen['position']} (bypass {chosen['bypass']:.3f}, induce {chosen['induce']:.3f}, "
        f"kl {chosen['kl']:.4f}){' [yellow]FALLBACK[/]' if chosen['fallback'] else ''}"
    )
    return result, direction


def export(ctx: Context, edit: Edit, out: Path, source: str, overwrite: bool = False, extra: dict | None = None, inputs: dict | None = None) -> dict:
    """Write ``edit`` applied to the model as a checkpoint at ``out`` (fidelity-checked); RUN/model is recorded
    as an artifact made from ``source`` ("selection" or "search") and ``inputs`` (the edit's description)."""
    start = time.perf_counter()
    inside = Path(out).resolve() == ctx.run.file("model").resolve()
    if inside:
        ctx.run.remove("model", quiet=True)
    metadata = {
        "created": timestamp(),
        "source_model": {k: ctx.run.info.get("model", {}).get(k) for k in ("source", "path", "sha256")},
        "upstream": {source: ctx.run.entry(source).get("fingerprint")},  # the selection or search it was made from
        "datasets": ctx.prompts.summary(),
        "environment": environment(),
        **(extra or {}),
        "run": os.path.relpath(ctx.run.path.resolve(), Path(out).resolve()),
    }
    info = export_model(ctx.chat, edit, out, metadata, overwrite=overwrite or inside)
    if inside:
        ctx.run.record("model", ctx.settings, inputs or {"edit": edit.describe()}, (source,))
    ctx.timed("export", start)
    return info


# ---- the search's artifacts, as the export reads them ---------------------------------------------
def paper_edit(ctx: Context, cands: Candidates) -> tuple[EditParams, str, tuple[str, ...]]:
    """The study's first trial: the paper's selected direction where the run has a fresh selection."""
    if ctx.run.fresh("selection", ctx.settings, selection_inputs(ctx), ("candidates",)):
        chosen = ctx.run.read("selection")["chosen"]
        return paper_params(chosen["layer"], chosen["position"]), "the paper's selection (selection.json)", ("candidates", "selection")
    layer = max(1, int(ctx.settings.search.max_layer_fraction * cands.n_layers))
    return paper_params(layer, ctx.settings.search.source_positions[0]), f"strength 1 at layer {layer} (no selection.json)", ("candidates",)


def study_inputs(ctx: Context) -> dict:
    """What the study's trials read besides the upstream artifacts: the validation prompts, and the questions
    and harmless train prompts a second direction is made of."""
    return {
        "harmful_val": ctx.prompts.hash("harmful", "val"),
        "harmless_val": ctx.prompts.hash("harmless", "val"),
        "harmless_train": ctx.prompts.hash("harmless", "train"),
        "self_questions": dataset_hash(load_self_questions()),
    }


def protected_prompts(ctx: Context) -> list[str]:
    """The prompts the search's directions are cleaned against: harmless train prompts, then the built-in code/math problems."""
    n = ctx.settings.search.protect_prompts
    return ctx.prompts.get("harmless", "train")[:n] + [item.prompt for item in load_capability("train")] if n else []


def protection(ctx: Context, reuse_only: bool = False) -> Protection | None:
    """The protected prompts' activations (reused while fresh); None when the search does not clean its directions."""
    prompts = protected_prompts(ctx)
    if not prompts:
        return None
    run, inputs = ctx.run, {"model": ctx.model_id, "protected": dataset_hash(prompts)}
    if run.fresh("protection", ctx.settings, inputs):
        return Protection.load(run.file("protection"))
    if reuse_only:
        run.ensure_fresh("protection", ctx.settings, inputs)
    start = time.perf_counter()
    meta = {"created": timestamp(), "model": ctx.model_id, "protected_sha256": inputs["protected"], "n_prompts": len(prompts)}
    result = protect(ctx.chat, prompts, ctx.settings.search.source_positions, ctx.settings.evaluation.batch_size, meta)
    result.save(run.file("protection"))
    run.record("protection", ctx.settings, inputs)
    ctx.timed("protection", start)
    return result


def study_upstream(ctx: Context, paper_upstream: tuple[str, ...]) -> tuple[str, ...]:
    """The search's upstream artifacts: the paper trial's, and the protected activations when the search cleans."""
    return paper_upstream + (("protection",) if ctx.settings.search.protect_prompts else ())


def trial_edit(ctx: Context, cands: Candidates, trial: int, result: dict | None = None) -> tuple[KernelEdit, dict]:
    """The edit of finished trial ``trial`` (from ``result`` or a fresh search.json) and its refusal.json metadata."""
    if result is None:
        _, _, upstream = paper_edit(ctx, cands)
        ctx.run.ensure_fresh("search", ctx.settings, study_inputs(ctx), study_upstream(ctx, upstream))
        result = ctx.run.read("search")
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
def run(settings: Settings, out: Path, overwrite: bool = False, export_model_dir: bool = True) -> RunResult:
    """``refusal run``: every stage, each reused while fresh, then the report (original, ablated, added, edited)."""
    from .evaluate import evaluate_run

    begin = time.perf_counter()
    ctx = start(settings, out, overwrite, export_to=Path(out) / "model" if export_model_dir else None, inherit=("search",))
    cands = candidates(ctx)
    chosen, direction = selection(ctx, cands)
    edit = Orthogonalization(direction.vector)
    if export_model_dir and not ctx.run.fresh("model", settings, {"edit": edit.describe()}, ("selection",)):
        export(
            ctx,
            edit,
            ctx.run.file("model"),
            "selection",
            extra={"direction": {"layer": direction.layer, "position": direction.position, "fallback": direction.metadata.get("fallback")}},
        )
    report = evaluate_run(ctx, cands, chosen, direction, edited=export_model_dir)
    ctx.timed("total", begin)
    return RunResult(ctx.run.path, chosen["chosen"], report, ctx.run.info.get("timings", {}))


def extract(settings: Settings, out: Path, overwrite: bool = False) -> RunResult:
    """``refusal extract``: the prompts and the candidates only."""
    ctx = start(settings, out, overwrite, inherit=("search",))
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
    cands = candidates(ctx, reuse_only=True)
    chosen, _ = selection(ctx, cands)
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
    ctx.run.ensure_fresh("selection", ctx.settings, selection_inputs(ctx), ("candidates",))
    direction = Direction.load(ctx.run.file("selection", 1))
    info = export(
        ctx,
        Orthogonalization(direction.vector),
        out,
        "selection",
        overwrite,
        {"direction": {"layer": direction.layer, "position": direction.position, "fallback": direction.metadata.get("fallback")}},
    )
    return {"out": str(out), "fidelity_max_abs_diff": info.get("fidelity_max_abs_diff"), "written": info["written"]}
