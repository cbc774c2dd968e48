"""The report's "Audit" section (``refusal audit``): how brittle the model's refusal is, and what each attack removes.

Reads ``report["audit"]`` (RUN/audit.json): the brittleness summary and its parts (the share of the unedited model's
refusals of the harmful test prompts that directional ablation, the search's chosen edit and the best suffix remove),
the refusals under each condition, the monitor's figures on harmful and suffix-attacked prompts, and the direction's
strength per layer. A part that was not measured says which command fills it. ``audit_tables`` is shared with the
Markdown summary.
"""

from __future__ import annotations

from collections.abc import Callable

from .html import NOT_MEASURED, esc, num, table

Tag = Callable[[str, object], str]
Text = Callable[[object], str]
PART_LABELS = {
    "ablation": "refusal direction ablated (hooks, rank 1)",
    "edit": "the search's chosen weight edit",
    "suffix": "the best adversarial suffix of the attack's budget",
}
MONITOR_LABELS = {"harmful": "harmful", "harmful_suffix": "harmful + adversarial suffix", "harmful_random": "harmful + random suffix"}


def audit_sentences(a: dict) -> list[str]:
    """The section's prose: what the summary is, its levels, what was not measured."""
    b = a["brittleness"]
    levels = "; ".join(f"{name}: {rule}" for name, rule in (b.get("levels") or {}).items())
    lines = [
        "Each part is the share of the unedited model's refusals of the harmful test prompts that the attack removes "
        f"(net: refusals before minus after, over before); the summary is the mean of the parts measured ({levels}). "
        "Detectable: the monitor's TPR at 1% FPR on suffix-attacked prompts, shown beside the summary, not part of it."
    ]
    if b.get("note"):
        lines.append(b["note"])
    lines += [f"{part}: {why}" for part, why in (a.get("missing") or {}).items()]
    return lines


def _rate(path: str, entry: dict | None, tag: Tag) -> str:
    if not entry:
        return NOT_MEASURED
    return f"{tag(f'{path}.refused', entry['refused'])}/{tag(f'{path}.total', entry['total'])} ({tag(f'{path}.rate', entry['rate'])})"


def parts_rows(a: dict, tag: Tag, text: Text) -> tuple[list[str], list[list[str]]]:
    """One row per part and one for the summary."""
    b, edit, suffix = a["brittleness"], a.get("edit") or {}, a.get("suffix") or {}
    beside = {"edit": "", "suffix": ""}
    if edit:
        kl = f"KL {tag('audit.edit.kl', edit.get('kl'))} ({text(edit.get('kl_split'))})"
        beside["edit"] = f"trial {tag('audit.edit.trial', edit.get('trial'))}, {kl}"
    if suffix:
        random = _rate("audit.suffix.random", suffix.get("random"), tag)
        beside["suffix"] = f"{tag('audit.suffix.steps', suffix.get('steps'))} steps; a random suffix of the same length leaves {random} refused"
    rows = []
    for name, label in PART_LABELS.items():
        p, path = b["parts"].get(name), f"audit.brittleness.parts.{name}"
        if p is None:
            rows.append([text(label), NOT_MEASURED, NOT_MEASURED, NOT_MEASURED, text((a.get("missing") or {}).get(name, ""))])
            continue
        before, after = tag(f"{path}.refused_before", p["refused_before"]), tag(f"{path}.refused_after", p["refused_after"])
        total = tag(f"{path}.total", p["total"])
        rows.append([text(label), f"{before}/{total}", f"{after}/{total}", tag(f"{path}.removed", p["removed"]), beside.get(name, "")])
    detectable = tag("audit.brittleness.detectable", b.get("detectable"))
    level = text(b.get("level") or "undefined")
    rows.append([text("summary (mean of the parts)"), "", "", tag("audit.brittleness.score", b.get("score")), f"{level}; detectable {detectable}"])
    return ["attack", "refused unedited", "refused attacked", "removed", "beside"], rows


def refusal_rows(a: dict, tag: Tag, text: Text) -> tuple[list[str], list[list[str]]]:
    """Refusals of the test prompts per condition (substring judge): (label, JSON path of the harmful and harmless rates)."""
    conditions = [
        ("unedited", "unedited.harmful", "unedited.harmless"),
        ("direction ablated (hooks)", "ablation.harmful", None),
        ("the paper's edit (RUN/model)", "paper_edit.harmful", None),
        ("the search's chosen edit", "edit.harmful", "edit.harmless"),
        ("no suffix (attack.json)", "suffix.none", None),
        ("adversarial suffix", "suffix.suffix", None),
        ("random suffix of the same length", "suffix.random", None),
    ]

    def entry(path: str | None) -> dict | None:
        group, _, key = (path or "").partition(".")
        return (a.get(group) or {}).get(key) if path else None

    rows = [
        [text(label), _rate(f"audit.{harmful}", entry(harmful), tag), _rate(f"audit.{harmless}", entry(harmless), tag) if harmless else ""]
        for label, harmful, harmless in conditions
    ]
    return ["condition", "harmful test prompts refused", "harmless test prompts refused"], rows


def monitor_rows(a: dict, tag: Tag, text: Text) -> tuple[list[str], list[list[str]]]:
    m = a.get("monitor")
    if not m:
        return [], []
    header = ["condition (vs harmless)", "AUROC", "TPR @ 1% FPR", "TPR @ 5% FPR"]
    rows = []
    for name, label in MONITOR_LABELS.items():
        e, path = m["rows"].get(name), f"audit.monitor.rows.{name}"
        cells = [tag(f"{path}.{k}", e.get(k)) for k in ("auroc", "tpr@1%", "tpr@5%")] if e else [NOT_MEASURED] * 3
        rows.append([text(f"{label} ({m['score']})"), *cells])
    return header, rows


def layer_rows(a: dict, tag: Tag, text: Text) -> tuple[list[str], list[list[str]]]:
    chosen = a["direction"]["layer"]
    header = ["layer", "mean-difference norm", "refusal score, ablated (bypass)", "refusal score, added (induce)", "KL", "note"]
    rows = []
    for i, r in enumerate(a["layers"]):
        path = f"audit.layers.{i}"
        note = "chosen" if r["layer"] == chosen else "; ".join(r.get("filtered") or [])
        rows.append([tag(f"{path}.layer", r["layer"]), *(tag(f"{path}.{k}", r.get(k)) for k in ("norm", "bypass", "induce", "kl")), text(note)])
    return header, rows


def audit_tables(a: dict, tag: Tag, text: Text) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The section's tables by title (a table without rows is left out by the renderers)."""
    return {
        "Brittleness": parts_rows(a, tag, text),
        "Refusals": refusal_rows(a, tag, text),
        "Monitor (default score)": monitor_rows(a, tag, text),
        f"The direction's strength per layer (position {a['direction']['position']})": layer_rows(a, tag, text),
    }


def audit_html(report: dict) -> str:
    a = report["audit"]
    parts = [f"<p>{esc(line)}</p>" for line in audit_sentences(a)]
    for title, (header, rows) in audit_tables(a, num, esc).items():
        if rows:
            parts += [f"<h3>{esc(title)}</h3>", table(header, rows)]
    return "\n".join(parts)
