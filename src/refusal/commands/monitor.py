"""``refusal monitor --run RUN``: a detector of harmful requests from activations, and how well it sees through suffixes.

    reopen(RUN)                      the run's model, prompts and refusal direction (selection.json; none: one line)
    attack.json                      the run's adversarial suffix and its random baseline (without one: a random
                                     suffix of --suffix-length tokens, and the attacked row is not measured)
    measure.monitor.fit_monitor      harmfulness directions and the probe from train prompts; the harmfulness layer,
                                     the thresholds (1% and 5% FPR) and the default score from validation prompts
    measure.monitor.measure_monitor  AUROC, TPR and achieved FPR on the test split: harmful, harmful + the suffix
                                     (where the instruction ends known, and as sent: the suffix read as instruction,
                                     what the hook sees), harmful + a random suffix, each against harmless
    RUN/monitor.json, RUN/monitor.safetensors (``Monitor.load``), and the report's "Monitor" section

Reused while fresh (same model, splits, direction and suffix).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.progress import log
from ..common.provenance import timestamp
from ..data.suffixes import SuffixedPrompt, random_suffix, split_prompt
from ..edit.edits import Orthogonalization
from ..engines.factory import make_forward
from ..errors import RefusalError
from ..measure.detection import FPR_TARGETS
from ..measure.monitor import Monitor, fit_monitor, measure_monitor
from ..report.render import write_report
from ..run.artifacts import ARTIFACTS
from ..run.directory import RunDir
from ..run.files import write_json
from ..run.workspace import Context, reopen
from .attack import fresh_attack
from .evaluate import evaluate_run, fresh_report
from .run import candidates

CONDITIONS = {
    "harmful": "harmful",
    "harmful_suffix": "harmful + adversarial suffix",
    "harmful_suffix_as_sent": "harmful + adversarial suffix, as sent",  # no split: the suffix is read as instruction
    "harmful_random": "harmful + random suffix",
}
NO_ATTACK = "harmful + adversarial suffix: not measured (the run has no attack.json; run `refusal attack --out {run}`)"


@dataclass
class MonitorResult:
    path: Path
    monitor: dict  # monitor.json
    timings: dict

    def summary(self) -> dict:
        m = self.monitor
        best = {name: (entry or {}).get(m["score"]) for name, entry in m["test"].items()}
        return {"run": str(self.path), "score": m["score"], "test": best, "missing": m.get("missing"), "timings": self.timings}


def build_monitor(ctx: Context, direction: Any, suffix: list[int] | None, baseline: list[int]) -> tuple[Monitor, dict]:
    """Fit the monitor on the run's train and validation prompts and measure it on the test split (monitor.json's content)."""
    chat, seed = ctx.chat, ctx.settings.data.seed
    forward = make_forward(chat, ctx.settings)
    split = lambda kind, part, ids=(): [split_prompt(chat, x, ids) for x in ctx.prompts.get(kind, part)]  # noqa: E731
    train_random, val_random = random_suffix(chat, len(baseline), seed + 1), random_suffix(chat, len(baseline), seed + 2)
    log("monitor: fitting the harmfulness directions and the probe on the train prompts")
    train = {"harmful": split("harmful", "train"), "harmless": split("harmless", "train"), "harmful_random": split("harmful", "train", train_random)}
    val = {"harmful": split("harmful", "val"), "harmful_random": split("harmful", "val", val_random), "harmless": split("harmless", "val")}
    monitor, chosen = fit_monitor(forward, direction, train, val, seed, chat.n_layers)
    log("monitor: measuring on the test split")
    conditions = {
        "harmful": split("harmful", "test"),
        "harmful_suffix": split("harmful", "test", suffix) if suffix is not None else None,
        "harmful_suffix_as_sent": [as_sent(p) for p in split("harmful", "test", suffix)] if suffix is not None else None,
        "harmful_random": split("harmful", "test", baseline),
    }
    data = {
        "format_version": ARTIFACTS["monitor"].format_version,
        "created": timestamp(),
        "direction": {"layer": direction.layer, "position": direction.position},
        "harm_layer": monitor.harm_layer,
        "score": monitor.score,
        "thresholds": monitor.thresholds,
        "fpr_targets": FPR_TARGETS,
        "validation": chosen,
        "n_prompts": {f"{k}_{s}": len(ctx.prompts.get(k, s)) for k in ("harmful", "harmless") for s in ("train", "val", "test")},
        "suffix": {
            "ids": suffix,
            "text": chat.tokenizer.decode(suffix) if suffix is not None else None,
            "random_ids": baseline,
            "random_text": chat.tokenizer.decode(baseline),
        },
        "conditions": CONDITIONS,
        "test": measure_monitor(monitor, forward, conditions, split("harmless", "test")),
        "missing": None if suffix is not None else NO_ATTACK.format(run=ctx.run.path),
    }
    return monitor, data


def as_sent(prompt: SuffixedPrompt) -> SuffixedPrompt:
    """``prompt`` as the hook sees a request: nothing marks where the suffix starts, so the harmfulness score reads the
    last token of the whole user message (the suffix's last) instead of the instruction's."""
    return SuffixedPrompt(prompt.head, prompt.instruction + prompt.suffix, (), prompt.tail)


def monitor(path: Path, options: dict | None = None) -> MonitorResult:
    """``refusal monitor --run RUN``: fit, calibrate and measure the monitor -> RUN/monitor.json, RUN/monitor.safetensors, the report."""
    begin = time.perf_counter()
    run = RunDir.open(path)
    if options:
        raise RefusalError(f"refusal monitor takes no options ({', '.join(options)}); leave them out")
    if not run.file("selection").is_file() or not run.file("selection", 1).is_file():
        raise RefusalError(f"{path} has no refusal direction (selection.json); run `refusal run --out {path}` first")
    ctx = reopen(path)
    chosen, direction = ctx.require("selection")
    attack = fresh_attack(ctx) if run.file("attack").is_file() else None
    suffix = attack["suffix_ids"] if attack is not None else None
    baseline = attack["random_suffix_ids"] if attack is not None else random_suffix(ctx.chat, ctx.settings.attack.length, ctx.settings.data.seed)
    given: dict[str, Any] = {"suffix": suffix, "random": baseline}

    def make(*_: object) -> dict:
        fitted, data = build_monitor(ctx, direction, suffix, baseline)
        fitted.save(run.file("monitor", 1))
        write_json(run.file("monitor"), data)
        return data

    data = ctx.get("monitor", make=make, **given)
    report = fresh_report(ctx)  # a stale report is made again (with this section), not patched
    if report is not None:
        report["monitor"] = report_section(data)
        write_report(report, run.file("report"))
    else:
        exported = ctx.fresh("model", edit=Orthogonalization(direction.vector).describe(), source="selection")
        evaluate_run(ctx, candidates(ctx), chosen, direction, edited=exported)
    ctx.timed("monitor_total", begin)
    return MonitorResult(ctx.run.path, data, ctx.run.info.get("timings", {}))


def report_section(data: dict) -> dict:
    """monitor.json as the report shows it (its format version aside)."""
    return {k: v for k, v in data.items() if k != "format_version"}
