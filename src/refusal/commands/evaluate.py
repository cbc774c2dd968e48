"""The before/after evaluation of a run or of one edit, as a report (RUN/report or ``refusal evaluate --out``).

The conditions are data: the original model, the direction ablated or added with hooks, an exported
checkpoint. ``measure.evaluation.evaluate`` measures them; this module chooses them, adds what the run
knows (selection, projections per layer, cosine between layers, the search's front) and writes the
report (report.json, report.md, report.html).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.read_back import ExportSwap
from ..checkpoint.streaming import NamesDiffer
from ..common.progress import log
from ..common.provenance import environment, timestamp
from ..data.prompt_sets import dataset_hash, load_capability, load_corpus
from ..engines.factory import make_engine
from ..engines.hf import Engine
from ..errors import RefusalError
from ..measure.evaluation import Condition, EvalSettings, cosine_matrix, evaluate, projections
from ..measure.judges import SafetyJudge, refusal_phrases
from ..model.chat import ChatModel
from ..model.packaged import load_model
from ..report.render import write_report
from ..report.schema import FORMAT_VERSION as REPORT_FORMAT
from ..residual.directions import Candidates, Direction
from ..residual.interventions import ABLATION_FORMS, ablate, add
from ..run.directory import RunDir
from ..run.given import export_direction, export_info, export_model, fresh_direction, run_model
from ..run.workspace import Context, check_prompt_context, load, model_identity, run_prompts
from ..settings import Settings

LABELS = {"original": "original", "ablated": "ablated (hooks)", "added": "activation addition", "edited": "edited checkpoint"}


def hook_conditions(chat: ChatModel, direction: Direction, ablated: bool = True, added: bool = True, form: str = "writers") -> list[Condition]:
    """The hooked conditions; ``form``: where ablation projects a post-norm block's output (``interventions.ablate``)."""
    out = []
    if ablated:
        label = LABELS["ablated"] if form == "writers" else "ablated (hooks, residual form)"
        out.append(Condition("ablated", label, chat, lambda: ablate(chat, direction.vector, form)))
    if added:
        out.append(Condition("added", LABELS["added"], chat, lambda: add(chat, direction.vector, direction.layer), kinds=("harmless",), costs=False))
    return out


def load_edited(settings: Settings, path: Path) -> ChatModel:
    """An exported checkpoint, loaded like the original (same dtype and device)."""
    m = settings.model
    return load_model(str(path), dtype=m.dtype, device=m.device, device_map=m.device_map, trust_remote_code=m.trust_remote_code)


def edited_condition(settings: Settings, chat: ChatModel, path: Path, same_model: bool) -> Condition:
    """The "edited" condition of an exported checkpoint. An export of ``chat``'s own checkpoint (``same_model``:
    this tool wrote it from the same model) runs on ``chat`` with the export's writer tensors swapped in
    (``checkpoint.read_back.ExportSwap``: no second copy of the model); any other checkpoint, or a model whose writers are not
    all in memory, is loaded as a model of its own."""
    if same_model and chat.has_weights:
        try:
            swap = ExportSwap(chat, path)
        except NamesDiffer:
            pass
        else:
            return Condition("edited", LABELS["edited"], chat, swap.swapped, engine=checkpoint_engine(settings, chat, path))
    edited_chat = load_edited(settings, path)
    return Condition("edited", LABELS["edited"], edited_chat, engine=checkpoint_engine(settings, edited_chat, path))


def checkpoint_engine(settings: Settings, chat: ChatModel, path: str | Path) -> Engine | None:
    """The generation engine of a checkpoint on disk: ``make_engine``'s vLLM engine with ``--engine vllm`` (built when
    first used, freed after its condition), else None (the evaluation makes a transformers engine per prompt kind)."""
    return make_engine(chat, settings, path) if settings.evaluation.engine == "vllm" else None


def build_report(
    ctx_settings: Settings,
    chat: ChatModel,
    model_record: dict,
    conditions: list[Condition],
    prompts: dict[str, list[str]],
    direction: Direction | None = None,
    safety: SafetyJudge | None = None,
    extra: dict | None = None,
) -> dict:
    """Evaluate ``conditions`` (the original first) on the test prompts and assemble the report dict."""
    e = ctx_settings.evaluation
    phrases = refusal_phrases(e.refusal_phrases)
    settings = EvalSettings.from_settings(e, chat.refusal_token_ids(e.refusal_tokens), phrases)
    corpus = load_corpus(e.corpus) if e.ce_tokens > 0 else None
    capability = load_capability("test") if e.capability_items > 0 else None
    results = evaluate(conditions, prompts, settings, corpus=corpus, safety=safety, corpus_name=e.corpus, capability=capability)
    edited = next((c for c in conditions if c.name == "edited"), None)
    report = {
        "format_version": REPORT_FORMAT,
        "created": timestamp(),
        "refusal_version": environment()["refusal"],
        "model": model_record,
        "direction": None,
        "selection": None,
        "projections": None,
        "cosine": None,
        "settings": {
            "max_new_tokens": e.max_new_tokens,
            "judge": "substring",
            "early_stop": settings.early_stop,
            "kl_tokens": e.kl_tokens,
            "n_harmful": len(prompts["harmful"]),
            "n_harmless": len(prompts["harmless"]),
            "corpus": e.corpus if corpus else None,
            "edited": str(edited.chat.path) if edited else None,
            "refusal_tokens": chat.tokenizer.convert_ids_to_tokens(settings.refusal_ids),
        },
        "datasets": {k: {"n": len(v), "sha256": dataset_hash(v)} for k, v in prompts.items()},
        "environment": environment(),
        **results,
        "completions": {
            c: {k: [{"instruction": p, "completion": t} for p, t in zip(prompts[k], texts)] for k, texts in kinds.items()}
            for c, kinds in results["completions"].items()
        },
    }
    if direction is not None:
        report["direction"] = {"layer": direction.layer, "position": direction.position, "fallback": bool(direction.metadata.get("fallback"))}
        report["projections"] = projections(chat, direction, prompts["harmful"], prompts["harmless"], e.batch_size)
    report.update(extra or {})
    return report


def evaluate_run(
    ctx: Context, cands: Candidates, selection: dict | None, direction: Direction | None, edited: bool, search: dict | None = None
) -> dict:
    """RUN/report: original, the direction ablated and added (when the run has one), and RUN/model when ``edited``.
    Reused while fresh (same test prompts, evaluation settings, direction, export and search summary)."""
    upstream = tuple(u for u in ("selection" if selection else "", "search" if search else "", "model" if edited else "") if u)

    def make(*_: object) -> dict:
        begin = time.perf_counter()
        chat, run = ctx.chat, ctx.run
        conditions = [Condition("original", LABELS["original"], chat, engine=checkpoint_engine(ctx.settings, chat, chat.path))]
        if direction is not None:
            conditions += hook_conditions(chat, direction)
        if edited:
            conditions.append(edited_condition(ctx.settings, chat, run.file("model"), same_model=True))
        prompts = {k: ctx.prompts.get(k, "test") for k in ("harmful", "harmless")}
        extra: dict = {"search": search}
        if selection is not None:
            extra["selection"] = {"chosen": selection["chosen"], "candidates": selection["candidates"]}
        if direction is not None:
            extra["cosine"] = cosine_matrix(cands, direction.position)
        report = build_report(ctx.settings, chat, run.info.get("model", {}), conditions, prompts, direction, extra=extra)
        ctx.timed("evaluate", begin)
        report["timings"] = run.info.get("timings", {})
        test = [ctx.prompts.hash(k, "test") for k in ("harmful", "harmless")]
        report["mechanisms"], report["monitor"] = current_mechanisms(run, test), current_monitor(run, test)
        write_report(report, run.file("report"))
        return report

    return ctx.get("report", make=make, search=search, upstream=upstream)


def fresh_report(ctx: Context) -> dict | None:
    """RUN/report.json while it is fresh (made from the run's current test prompts, evaluation settings and the upstream
    artifacts it was made from, as they are recorded now), else None: `refusal analyze` attaches its section only to it."""
    run = ctx.run
    if not (run.file("report") / "report.json").is_file():
        return None
    report = run.read("report")
    upstream = tuple(run.entry("report").get("upstream", []))
    return report if ctx.fresh("report", search=report.get("search"), upstream=upstream) else None


def current_mechanisms(run: RunDir, test: list[str]) -> dict | None:
    """RUN/analysis.json's numbers while they were measured on the run's current direction and ``test`` split hashes
    (the report's "Mechanisms" section)."""
    entry, chosen = run.entry("analysis"), run.entry("selection")
    if not entry or not chosen or entry.get("selection") != chosen.get("fingerprint") or entry.get("test") != test:
        return None
    if not run.file("analysis").is_file():
        return None
    return run.read("analysis").get("mechanisms")


def current_monitor(run: RunDir, test: list[str]) -> dict | None:
    """RUN/monitor.json while it was made from the run's current direction and ``test`` split hashes (the report's
    "Monitor" section), without its format version."""
    entry, chosen = run.entry("monitor"), run.entry("selection")
    if not entry or not chosen or entry.get("selection") != chosen.get("fingerprint") or entry.get("test") != test:
        return None
    if not run.file("monitor").is_file():
        return None
    return {k: v for k, v in run.read("monitor").items() if k != "format_version"}


@dataclass
class EvaluateResult:
    out: Path
    html: Path
    report: dict

    def summary(self) -> dict:
        return {"out": str(self.out), "report": str(self.html), "refusal_rates": self.report["rates"], "kl": self.report["kl"]}


def evaluate_model(
    settings: Settings,
    out: Path,
    ablate_run: Path | None = None,
    add_run: Path | None = None,
    edited: Path | None = None,
    overwrite: bool = False,
    model_options: dict | None = None,
    ablation_form: str = "writers",
) -> EvaluateResult:
    """``refusal evaluate``: the original model against one edit (hooks from a run, or an exported checkpoint) -> OUT/report.*

    ``model_options``: the model options given on the command line; with a run or an export the model is then the
    run's (or the export's source) with these applied (``run.given``). None: ``settings.model`` as it is, checked.
    ``settings.safety.safety_judge``: also count the completions an LLM judge calls unsafe."""
    settings.validate()
    if ablation_form not in ABLATION_FORMS:
        raise RefusalError(f"unknown ablation form {ablation_form!r}; choose one of {', '.join(ABLATION_FORMS)}")
    if edited is not None and not (edited / "config.json").is_file():
        raise RefusalError(f"--edited {edited} is not a checkpoint directory (no config.json); give the directory `refusal export` wrote")
    source_run = ablate_run or add_run
    direction, note, info = None, None, {}
    if source_run is not None:  # the run's model (or the same one), and its direction while fresh: before anything is loaded
        run = RunDir.open(source_run)
        direction = fresh_direction(run, run_model(settings, run, model_options, "--ablate" if ablate_run else "--add"))
    if edited is not None:
        info = export_info(edited)
        export_model(settings, edited, info, model_options)
        direction, note = export_direction(edited, info)
        if note:
            log(f"[yellow]the report leaves out the direction's sections[/]: {note}")
    direction_run = (ablate_run or add_run) if direction is not None else None
    if edited is not None and direction is not None:
        direction_run = (edited / info["run"]).resolve()
    if out.exists() and not out.is_dir():
        raise RefusalError(f"report directory {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RefusalError(f"report directory {out} is not empty; choose another --out or pass --overwrite")
    prompts_all = run_prompts(None, settings)
    if settings.evaluation.ce_tokens > 0:
        load_corpus(settings.evaluation.corpus)
    chat = load(settings)
    check_prompt_context(chat, prompts_all, settings.evaluation, ("test",))
    _, record = model_identity(chat, None)
    made_from = info.get("source_model") or {}
    safety, judge = None, settings.safety
    if judge.safety_judge:
        from ..measure.judges import load_safety_judge

        device = settings.model.device if settings.model.device != "auto" else "cpu"
        safety = load_safety_judge(judge.safety_judge, judge.safety_format, device=device)
    conditions = [Condition("original", LABELS["original"], chat, engine=checkpoint_engine(settings, chat, chat.path))]
    if direction is not None and (ablate_run or add_run):
        conditions += hook_conditions(chat, direction, ablated=bool(ablate_run), added=bool(add_run), form=ablation_form)
    if edited is not None:
        same_model = made_from.get("sha256") is not None and made_from["sha256"] == record["sha256"]
        conditions.append(edited_condition(settings, chat, edited, same_model))
    begin = time.perf_counter()
    prompts = {k: prompts_all.get(k, "test") for k in ("harmful", "harmless")}
    extra = {}
    if direction_run is not None and direction is not None:  # the direction's plots, as RUN/report shows them
        run = RunDir.open(direction_run)  # fresh: ``run.given.fresh_direction`` checked its candidates and selection
        selection = run.read("selection")
        extra["selection"] = {"chosen": selection["chosen"], "candidates": selection["candidates"]}
        extra["cosine"] = cosine_matrix(Candidates.load(run.file("candidates")), direction.position)
    report = build_report(settings, chat, record, conditions, prompts, direction, safety=safety, extra=extra)
    report["settings"]["run_direction"] = note or (str(direction_run) if direction_run is not None else None)  # the run it came from, or why none
    report["timings"] = {"evaluate": round(time.perf_counter() - begin, 2)}
    paths = write_report(report, out)
    return EvaluateResult(out, paths["html"], report)
