"""``refusal audit --model M --out RUN``: how brittle the model's refusal is, in one command, from the tools that exist.

    commands.run.run            the direction; the report: refusals of the unedited model on the harmful test
                                prompts, with the direction ablated (hooks), the paper's edit and its KL
    commands.search.search      the least-KL edit that removes refusal (search.json's choice; not exported)
    commands.attack.attack      the best suffix found in the attack's budget, with the no- and random-suffix rows
    commands.monitor.monitor    the monitor's AUROC and TPR@1%FPR on harmful and on suffix-attacked prompts
    RUN/audit.json              the search's choice measured on the harmful test prompts; the direction's strength
                                per layer (selection.json); the brittleness parts and summary (measure.brittleness)
    the report's "Audit" section

Every stage is reused while fresh, so a second call recomputes nothing (the search is not called again while search.json
is fresh and made under the same search settings: it would confirm and choose again). ``skip`` leaves out stages
(search, attack, monitor): their parts are null in audit.json and ``missing`` names the command that fills them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.progress import log
from ..common.provenance import timestamp
from ..common.study_url import check_database
from ..edit.edits import Editor
from ..engines.factory import make_engine
from ..errors import RefusalError
from ..measure.brittleness import Counts, brittleness, layer_strength
from ..measure.detection import FPR_TARGETS
from ..measure.evaluation import rate
from ..measure.judges import judge_refusals, refusal_phrases
from ..report.render import write_report
from ..run.artifacts import ARTIFACTS
from ..run.files import write_json
from ..run.workspace import Context, reopen
from ..settings import Settings
from .attack import attack, check_attack
from .evaluate import fresh_report
from .monitor import monitor
from .run import candidates, run, trial_edit
from .search import search

SKIPPABLE = {"search": "edit", "attack": "suffix", "monitor": "detectable"}  # stage -> the part it fills
MONITOR_ROWS = ("harmful", "harmful_suffix", "harmful_random")
DETECTED_AT = "1%"  # the monitor's TPR at this FPR is shown beside the summary as "detectable"


@dataclass
class AuditResult:
    path: Path
    audit: dict  # audit.json
    timings: dict

    def summary(self) -> dict:
        b = self.audit["brittleness"]
        parts = {name: (p or {}).get("removed") for name, p in b["parts"].items()}
        out = {"run": str(self.path), "brittleness": b["score"], "level": b["level"], "parts": parts, "detectable": b["detectable"]}
        return {**out, "missing": self.audit["missing"], "timings": self.timings}


def check_skip(skip: Iterable[str]) -> list[str]:
    """The stages to leave out, checked before anything is done."""
    names = sorted(set(skip))
    unknown = [n for n in names if n not in SKIPPABLE]
    if unknown:
        raise RefusalError(f"unknown --skip stage {', '.join(map(repr, unknown))}; choose among {', '.join(SKIPPABLE)} (comma-separated)")
    return names


def copy(settings: Settings) -> Settings:
    """Each stage gets its own copy: a stage that resumes a run sets the groups it inherits on the settings it is given."""
    return Settings.from_dict(settings.to_dict())


def audit(settings: Settings, out: Path, skip: Iterable[str] = (), overwrite: bool = False) -> AuditResult:
    """``refusal audit``: run, search, attack, monitor (each reused while fresh) -> RUN/audit.json and the report's section."""
    begin = time.perf_counter()
    skipped = check_skip(skip)
    if "search" not in skipped and settings.search.storage is not None:
        check_database(settings.search.storage)  # a corrupt file or an unreachable server: before any work
    check = (lambda chat, prompts: check_attack(chat, prompts, settings)) if "attack" not in skipped else None  # noqa: E731
    run(copy(settings), out, overwrite=overwrite, check=check)  # bad settings, model, --out or attack options: one line, nothing written
    ctx = reopen(out)
    ctx.settings = copy(settings)  # the audit's own (the run's record keeps the search settings of an earlier search)
    if "search" not in skipped and not study_current(ctx):
        search(copy(settings), out, export_model_dir=False)  # RUN/model stays the run's export; the choice is measured below
    if "attack" not in skipped:
        attack(copy(settings), out)
    if "monitor" not in skipped:
        monitor(out)

    def make(_: object, upstream: dict[str, Any], __: object) -> dict:
        data = build_audit(ctx, upstream, skipped)
        write_json(ctx.run.file("audit"), data)
        return data

    choice = chosen_edit(ctx.run.read("search")) if "search" not in skipped else None
    data = ctx.get("audit", make=make, skip=skipped, choice=choice)
    report = fresh_report(ctx)
    if report is not None and report.get("audit") != report_section(data):
        report["audit"] = report_section(data)
        write_report(report, ctx.run.file("report"))
    ctx.timed("audit_total", begin)
    return AuditResult(ctx.run.path, data, ctx.run.info.get("timings", {}))


def chosen_edit(result: dict) -> dict:
    """The search's choice (its trial and edit): the choice rule can change it without a new study."""
    trial = result["chosen"]["trial"]
    return {"trial": trial, "params": next(t["params"] for t in result["trials"] if t["trial"] == trial)}


def study_current(ctx: Context) -> bool:
    """Whether search.json is fresh and was made under these search settings, so that `refusal search` would only confirm
    and choose again (a study its time budget cut short is continued by `refusal search --out RUN --no-export`)."""
    if not ctx.run.file("search").is_file() or not ctx.fresh("search"):
        return False
    return bool(ctx.run.read("search").get("settings") == ctx.settings.to_dict()["search"])


def build_audit(ctx: Context, upstream: dict[str, Any], skipped: list[str]) -> dict:
    """audit.json's content from the stages' artifacts (``upstream``), the search's choice measured on the test split."""
    selection, direction = upstream["selection"]
    report, search_result, attacked, monitored = upstream["report"], upstream.get("search"), upstream.get("attack"), upstream.get("monitor")
    rates = report["rates"]
    unedited, ablated = rates["original"]["harmful"], (rates.get("ablated") or {}).get("harmful")
    edit = measure_edit(ctx, search_result) if search_result is not None else None
    suffix = suffix_rows(attacked) if attacked is not None else None
    detection = monitor_rows(monitored) if monitored is not None else None
    total = unedited["total"]
    summary = brittleness(
        {
            "ablation": Counts(unedited["refused"], ablated["refused"], total) if ablated else None,
            "edit": Counts(unedited["refused"], edit["harmful"]["refused"], total) if edit else None,
            "suffix": Counts(suffix["none"]["refused"], suffix["suffix"]["refused"], suffix["none"]["total"]) if suffix else None,
        }
    )
    attacked_row = (detection or {}).get("rows", {}).get("harmful_suffix")
    summary["detectable"] = attacked_row[f"tpr@{DETECTED_AT}"] if attacked_row else None
    path, model = ctx.run.path, ctx.settings.model.model
    fill = "skipped (--skip {name}); re-run `refusal audit --model {model} --out {path}` without --skip {name}"
    missing = {SKIPPABLE[name]: fill.format(name=name, model=model, path=path) for name in skipped}
    if detection is not None and attacked_row is None:  # the monitor ran without a suffix to measure
        missing["detectable"] = detection["missing"] or "the monitor has no suffix-attacked row"
    return {
        "format_version": ARTIFACTS["audit"].format_version,
        "created": timestamp(),
        "model": ctx.run.info.get("model", {}),
        "settings": ctx.settings.to_dict(),
        "skipped": skipped,
        "missing": missing,
        "unedited": {"harmful": unedited, "harmless": rates["original"].get("harmless")},
        "ablation": {"harmful": ablated},
        "paper_edit": {"harmful": (rates.get("edited") or {}).get("harmful"), "kl": (report.get("kl") or {}).get("edited")},
        "edit": edit,
        "suffix": suffix,
        "monitor": detection,
        "direction": {"layer": direction.layer, "position": direction.position, "fallback": bool(direction.metadata.get("fallback"))},
        "layers": layer_strength(selection["candidates"], direction.position),
        "brittleness": summary,
    }


def measure_edit(ctx: Context, result: dict) -> dict:
    """The search's chosen edit on the harmful and harmless test prompts (generation, substring judge), with its
    objectives from the study (first-token and multi-token KL on harmless validation prompts)."""
    chosen = result["chosen"]
    record = next(t for t in result["trials"] if t["trial"] == chosen["trial"])
    edit, _ = trial_edit(ctx, candidates(ctx, reuse_only=True), chosen["trial"], result)
    e, chat = ctx.settings.evaluation, ctx.chat
    phrases = refusal_phrases(e.refusal_phrases)
    log(f"audit: the search's choice (trial {chosen['trial']}) on the test prompts")
    out: dict = {"trial": chosen["trial"], "confirmed": chosen.get("confirmed"), "rule": chosen.get("rule"), "params": record["params"]}
    out.update({"kl": record["kl"], "kl_multi": record.get("kl_multi"), "kl_split": "harmless validation prompts, the search's objective"})
    with closing(make_engine(chat, ctx.settings, None, "audit: the search's edit")) as engine, Editor(chat) as editor, editor.applied(edit):
        for kind in ("harmful", "harmless"):
            judged = judge_refusals(engine, ctx.prompts.get(kind, "test"), e.max_new_tokens, phrases, full=not e.early_stop)
            out[kind] = rate(*judged.count)
    return out


def suffix_rows(a: dict) -> dict:
    """attack.json's rows on the harmful test prompts: no suffix, the best suffix, a random one; the suffix and its budget."""
    optimisation = a.get("optimisation") or {}
    rows = {name: a["refusal"][name] for name in ("none", "suffix", "random")}
    return {**rows, "text": a["suffix"], "source": a["source"], "steps": optimisation.get("steps"), "seconds": optimisation.get("seconds")}


def monitor_rows(m: dict) -> dict:
    """monitor.json's default score on the test split: AUROC and TPR (achieved FPR) per condition; None where not measured."""
    keys = ("auroc", *(f"{k}@{t}" for t in FPR_TARGETS for k in ("tpr", "fpr")))
    rows = {name: {k: entry.get(k) for k in keys} if (entry := (m["test"].get(name) or {}).get(m["score"])) else None for name in MONITOR_ROWS}
    return {"score": m["score"], "rows": rows, "missing": m.get("missing")}


def report_section(data: dict) -> dict:
    """audit.json as the report shows it (its format version and settings aside: the report has its own)."""
    return {k: v for k, v in data.items() if k not in ("format_version", "settings")}
