"""The report's "Monitor" section (``refusal monitor``): how well activations flag harmful requests, with and without a suffix.

Reads ``report["monitor"]`` (RUN/monitor.json): per test condition (harmful, harmful + the run's adversarial suffix,
harmful + a random suffix; each against harmless) and per score (refusal projection, harmfulness projection at the
instruction's last token and its largest over the user message, probe)
the AUROC, and the TPR and achieved FPR at the thresholds calibrated on harmless validation prompts. A condition that
was not measured (no attack.json) is one line. ``monitor_tables`` is shared with the Markdown summary.
"""

from __future__ import annotations

from collections.abc import Callable

from .html import esc, missing, num, table

SCORE_LABELS = {
    "refusal": "refusal projection (last position)",
    "harmfulness": "harmfulness projection (instruction's last token)",
    "harmfulness_peak": "harmfulness projection, largest over the user message",
    "probe": "probe over layers",
}


def monitor_rows(m: dict, tag: Callable[[str, object], str], text: Callable[[object], str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per measured condition and score; ``tag`` writes a value by its JSON path, ``text`` a label."""
    targets = list(m.get("fpr_targets") or {})
    header = ["condition", "score", "AUROC", *(f"TPR @ {t} FPR" for t in targets), *(f"achieved FPR ({t})" for t in targets)]
    rows = []
    for name, label in m["conditions"].items():
        for score, entry in (m["test"].get(name) or {}).items():
            path = f"monitor.test.{name}.{score}"
            mark = " *" if score == m.get("score") else ""
            rows.append(
                [
                    text(label),
                    text(SCORE_LABELS.get(score, score) + mark),
                    tag(f"{path}.auroc", entry["auroc"]),
                    *(tag(f"{path}.tpr@{t}", entry.get(f"tpr@{t}")) for t in targets),
                    *(tag(f"{path}.fpr@{t}", entry.get(f"fpr@{t}")) for t in targets),
                ]
            )
    return header, rows


def monitor_sentences(m: dict) -> list[str]:
    """The section's prose: the layers, the default score, what was not measured."""
    lines = [
        f"Refusal direction at layer {m['direction']['layer']}; harmfulness direction read at layer {m['harm_layer']} "
        f"(best validation AUROC); * = the score the monitor flags with by default ({m['score']}). Thresholds calibrated "
        'on harmless validation prompts; figures on the test split. "As sent": the request as the hook sees it, nothing '
        "marking where the suffix starts (the instruction's last token is then the suffix's last)."
    ]
    if m.get("missing"):
        lines.append(m["missing"])
    return lines


def monitor_html(report: dict) -> str:
    m = report.get("monitor")
    if not m:
        return missing("monitor (run `refusal monitor --run RUN`)")
    suffix = (m.get("suffix") or {}).get("text")
    parts = [f"<p>{esc(line)}</p>" for line in monitor_sentences(m)]
    if suffix is not None:
        parts.append(f"<p>Adversarial suffix (attack.json): <code>{esc(suffix)}</code></p>")
    parts.append(table(*monitor_rows(m, num, esc)))
    return "\n".join(parts)
