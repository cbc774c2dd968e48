"""The before/after evaluation of a run or of one edit, as a report (RUN/report or ``refusal evaluate --out``).

The conditions are data: the original model, the direction ablated or added with hooks, an exported
checkpoint. ``evaluation.evaluate`` measures them; this module chooses them, adds what the run
knows (selection, projections per layer, cosine between layers, the search's front) and writes the
report (report.json, report.md, report.html).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from .data import dataset_hash, load_capability, load_corpus
from .directions import Candidates, Direction
from .errors import RefusalError
from .evaluation import Condition, EvalSettings, cosine_matrix, evaluate, projections
from .exported import ExportSwap
from .generation import Engine, HFEngine
from .interventions import ABLATION_FORMS, ablate, add
from .judges import REFUSAL_PHRASES, load_phrases
from .model import ChatModel
from .models import load_model
from .provenance import digest, environment, timestamp
from .report import write_report
from .report_schema import FORMAT_VERSION as REPORT_FORMAT
from .run_dir import RunDir, read_json
from .settings import Settings
from .streaming import NamesDiffer
from .workspace import Context, load, model_identity, run_prompts

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
    (``exported.ExportSwap``: no second copy of the model); any other checkpoint, or a model whose writers are not
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
    """The generation engine of a checkpoint on disk: vLLM with ``--engine vllm`` (built when first used, freed after
    its condition), else None (the transformers engine of the loaded model)."""
    e = settings.evaluation
    if e.engine != "vllm":
        return None
    from .vllm_engine import VLLMEngine

    return VLLMEngine(chat, path, e.tensor_parallel, e.vllm_memory, settings.model.dtype, seed=settings.data.seed)


def build_report(
    ctx_settings: Settings,
    chat: ChatModel,
    model_record: dict,
    conditions: list[Condition],
    prompts: dict[str, list[str]],
    direction: Direction | None = None,
    safety=None,
    extra: dict | None = None,
) -> dict:
    """Evaluate ``conditions`` (the original first) on the test prompts and assemble the report dict."""
    e = ctx_settings.evaluation
    phrases = load_phrases(e.refusal_phrases) if e.refusal_phrases else REFUSAL_PHRASES
    settings = EvalSettings(
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        kl_tokens=e.kl_tokens,
        ce_max_tokens=e.ce_tokens,
        capability_items=e.capability_items,
        phrases=tuple(phrases),
        refusal_ids=chat.refusal_token_ids(e.refusal_tokens),
    )
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
    begin = time.perf_counter()
    chat, run = ctx.chat, ctx.run
    upstream = tuple(u for u in ("selection" if selection else "", "search" if search else "", "model" if edited else "") if u)
    test = [ctx.prompts.hash(k, "test") for k in ("harmful", "harmless")]
    inputs = {"test": test, "search": digest(search) if search else None}
    if run.fresh("report", ctx.settings, inputs, upstream):
        return run.read("report")
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
    report["mechanisms"] = current_mechanisms(run, test)
    run.remove("report", quiet=True)
    write_report(report, run.file("report"))
    run.record("report", ctx.settings, inputs, upstream)
    return report


def current_mechanisms(run: RunDir, test: list[str]) -> dict | None:
    """RUN/analysis.json's numbers while they were measured on the run's current direction and ``test`` split hashes
    (the report's "Mechanisms" section)."""
    entry, chosen = run.entry("analysis"), run.entry("selection")
    if not entry or not chosen or entry.get("selection") != chosen.get("fingerprint") or entry.get("test") != test:
        return None
    if not run.file("analysis").is_file():
        return None
    return run.read("analysis").get("mechanisms")


def _run_of_export(edited: Path) -> Path | None:
    """The run directory an exported checkpoint came from (refusal.json's "run", relative to the checkpoint)."""
    info_path = edited / "refusal.json"
    if not info_path.is_file():
        return None
    info = read_json(info_path, f"re-export the model with `refusal export`, or give --edited a checkpoint without {info_path.name}")
    where = info.get("run")
    if not isinstance(where, str) or not info.get("direction"):
        return None
    path = (edited / where).resolve()
    return path if (path / "run.json").is_file() else None


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
    safety_judge: str | None = None,
    safety_format: str = "llama-guard-3",
    ablation_form: str = "writers",
) -> EvaluateResult:
    """``refusal evaluate``: the original model against one edit (hooks from a run, or an exported checkpoint) -> OUT/report.*"""
    settings.validate()
    if ablation_form not in ABLATION_FORMS:
        raise RefusalError(f"unknown ablation form {ablation_form!r}; choose one of {', '.join(ABLATION_FORMS)}")
    if edited is not None and not (edited / "config.json").is_file():
        raise RefusalError(f"--edited {edited} is not a checkpoint directory (no config.json); give the directory `refusal export` wrote")
    source_run = ablate_run or add_run or (_run_of_export(edited) if edited is not None else None)
    run = RunDir.open(source_run) if source_run is not None else None
    direction = Direction.load(run.file("selection", 1)) if run is not None else None
    if out.exists() and not out.is_dir():
        raise RefusalError(f"report directory {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RefusalError(f"report directory {out} is not empty; choose another --out or pass --overwrite")
    prompts_all = run_prompts(None, settings)
    if settings.evaluation.ce_tokens > 0:
        load_corpus(settings.evaluation.corpus)
    chat = load(settings)
    _, record = model_identity(chat, None)
    if run is not None and (ablate_run or add_run):
        ran_on = run.info.get("model", {})
        if ran_on.get("sha256") != record["sha256"] or (record["sha256"] is None and ran_on.get("path") != record["path"]):
            raise RefusalError(
                f"run {source_run} was made on another model ({ran_on.get('source')}, sha256 {str(ran_on.get('sha256'))[:12]}); "
                f"pass --model {ran_on.get('path') or ran_on.get('source')} or a run of this model"
            )
    made_from = None
    if edited is not None and (edited / "refusal.json").is_file():
        made_from = read_json(edited / "refusal.json", "re-export the model with `refusal export`").get("source_model") or {}
        if made_from.get("sha256") and record["sha256"] and made_from["sha256"] != record["sha256"]:
            raise RefusalError(
                f"--edited {edited} was exported from another model ({made_from.get('source')}); "
                f"pass --model {made_from.get('path') or made_from.get('source')}"
            )
    safety = None
    if safety_judge:
        from .judges import load_safety_judge

        safety = load_safety_judge(safety_judge, safety_format, device=settings.model.device if settings.model.device != "auto" else "cpu")
    conditions = [Condition("original", LABELS["original"], chat, engine=checkpoint_engine(settings, chat, chat.path))]
    if direction is not None and (ablate_run or add_run):
        conditions += hook_conditions(chat, direction, ablated=bool(ablate_run), added=bool(add_run), form=ablation_form)
    if edited is not None:
        same_model = made_from is not None and made_from.get("sha256") is not None and made_from["sha256"] == record["sha256"]
        conditions.append(edited_condition(settings, chat, edited, same_model))
    begin = time.perf_counter()
    prompts = {k: prompts_all.get(k, "test") for k in ("harmful", "harmless")}
    report = build_report(settings, chat, record, conditions, prompts, direction, safety=safety)
    report["timings"] = {"evaluate": round(time.perf_counter() - begin, 2)}
    paths = write_report(report, out)
    return EvaluateResult(out, paths["html"], report)


def generate_completions(
    settings: Settings,
    prompts: list[str],
    max_new_tokens: int,
    ablate_run: Path | None = None,
    add_run: Path | None = None,
    coeff: float = 1.0,
    ablation_form: str = "writers",
) -> list[str]:
    """``refusal generate``: greedy completions, with a run's direction ablated (in ``ablation_form``) or added (hooks) if asked."""
    import math

    if ablation_form not in ABLATION_FORMS:
        raise RefusalError(f"unknown ablation form {ablation_form!r}; choose one of {', '.join(ABLATION_FORMS)}")
    if not 1 <= max_new_tokens <= 4096:
        raise RefusalError(f"--max-new-tokens must be between 1 and 4096 (got {max_new_tokens})")
    if not math.isfinite(coeff):
        raise RefusalError(f"--coeff must be a finite number (got {coeff})")
    direction = None
    if ablate_run or add_run:
        run = RunDir.open(ablate_run or add_run)  # type: ignore[arg-type]
        direction = Direction.load(run.file("selection", 1))
    chat = load(settings)
    if chat.max_positions is not None and max_new_tokens > chat.max_positions:
        raise RefusalError(f"--max-new-tokens {max_new_tokens} is more than the model's context of {chat.max_positions} tokens")
    if direction is not None and direction.vector.shape[-1] != chat.d_model:
        raise RefusalError(
            f"the direction of {ablate_run or add_run} has {direction.vector.shape[-1]} dimensions, the model {chat.d_model}; "
            "give a run of this model"
        )
    context: AbstractContextManager = nullcontext()
    if direction is not None:
        context = ablate(chat, direction.vector, ablation_form) if ablate_run else add(chat, direction.vector, direction.layer, coeff)
    with context:
        return HFEngine(chat, 8).generate(prompts, max_new_tokens)
