"""Render an evaluation report (the dict saved as report.json) as Markdown and as one HTML page.

The HTML is self-contained (inline CSS, plots as base64 PNG, no scripts) and every number in it sits
in an element whose ``data-key`` is the number's JSON path and whose text is ``fmt(path, value)``,
so the page can be checked against report.json. The sections of what only some reports measure
(selection, projections, cosine, search, mechanisms, monitor, audit) are left out where the report has none; a value
missing inside a shown section says "not measured". Conditions, their labels and the prompt kinds come
from the report itself (``report.schema``), so a new condition renders without a change here.
Figures: ``report.plots``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import RefusalError
from ..measure.stats import rate_values
from . import plots
from .audit import audit_html, audit_sentences, audit_tables
from .html import (
    CSS,
    NOT_MEASURED,
    SEARCH_FIELDS,
    esc,
    img,
    metadata_section,
    missing,
    num,
    search_section,
    section,
    selection_section,
    table,
)
from .mechanisms import mechanisms_html, mechanisms_tables, refused_sentence
from .monitor import monitor_html, monitor_rows, monitor_sentences
from .schema import FORMAT_VERSION, REQUIRED, fmt, kinds, labels, validate_report

__all__ = ["FORMAT_VERSION", "REQUIRED", "fmt", "render_html", "render_markdown", "validate_report", "write_report"]

PERCENT_FIELDS = ("rate", "low", "high")
TEXTS = ("instruction", "original", "edited")


def _plain(path: str, value: object) -> str:
    """The Markdown counterpart of num: the formatted value, escaped for a table cell."""
    return _md(fmt(path, value))


def _text(tag: Callable) -> Callable[[object], str]:
    """How free text from the report (a label) is escaped where ``tag`` writes numbers: HTML or Markdown."""
    return esc if tag is num else _md


def _rate_text(path: str, entry: dict, tag: Callable[[str, object], str] = num) -> str:
    """'refused/total (rate, 95% CI low–high)'; values not in the JSON are computed and carry no data-key."""
    computed = dict(zip(PERCENT_FIELDS, rate_values(entry)))

    def part(name: str) -> str:
        key = f"{path}.{name}"
        return tag(key, entry[name]) if entry.get(name) is not None else fmt(key, computed[name])

    refused, total = tag(f"{path}.refused", entry["refused"]), tag(f"{path}.total", entry["total"])
    return f"{refused}/{total} ({part('rate')}, 95% CI {part('low')}–{part('high')})"


# ---- content shared by HTML and Markdown (`tag` wraps each JSON value: num or _plain) ----------
COST_HEADER = ["measure", "condition", "value", "details"]


def _rate_header(report: dict) -> list[str]:
    return ["condition", *kinds(report)]


def _rate_rows(name: str, report: dict, tag: Callable[[str, object], str]) -> list[list[str]]:
    """One row per listed condition, one column per kind: ``report[name][condition][kind]`` or "not measured"."""
    measured, text = report[name], _text(tag)
    return [
        [text(label), *(_rate_text(f"{name}.{c}.{k}", measured[c][k], tag) if k in measured.get(c, {}) else NOT_MEASURED for k in kinds(report))]
        for c, label in labels(report).items()
    ]


def _cost_rows(report: dict, tag: Callable[[str, object], str]) -> list[list[str]]:
    """KL per edit (first token and multi-token), cross-entropy and capability proxy per condition, refusal log-odds per condition and kind."""
    rows, names, text = [], labels(report), _text(tag)
    for edit, kl in (report.get("kl") or {}).items():
        for part, what in (("first_token", "first token"), ("multi_token", "multi-token")):
            entry, measure = (kl or {}).get(part), f"KL on harmless, {what}"
            if not entry:
                rows.append([measure, text(names[edit]), NOT_MEASURED, ""])
                continue
            details = ", ".join(f"{k} = {tag(f'kl.{edit}.{part}.{k}', entry[k])}" for k in ("n", "tokens") if k in entry)
            rows.append([measure, text(names[edit]), tag(f"kl.{edit}.{part}.mean", entry["mean"]), details])
    if not rows:
        rows.append(["KL on harmless", "", NOT_MEASURED, ""])
    ce = report.get("ce_loss")
    if ce:
        detail = f"tokens = {tag('ce_loss.tokens', ce.get('tokens'))}, corpus = {tag('ce_loss.corpus', ce.get('corpus'))}"
        rows += [["cross-entropy, nats/token", text(names[k]), tag(f"ce_loss.loss.{k}", v), detail] for k, v in ce["loss"].items()]
    else:
        rows.append(["cross-entropy", "", NOT_MEASURED, ""])
    if cap := report.get("capability"):
        detail = f"items = {tag('capability.items', cap.get('items'))}, tokens = {tag('capability.tokens', cap.get('tokens'))}"
        measure = "capability proxy (code/math loss), nats/token"
        rows += [[measure, text(names[k]), tag(f"capability.loss.{k}", v), detail] for k, v in cap["loss"].items()]
    for name, by_kind in (report.get("refusal_score") or {}).items():
        for kind, value in by_kind.items():
            rows.append(
                [f"refusal log-odds, first token ({text(kind)})", text(names[name]), tag(f"refusal_score.{name}.{kind}", value), "no generation"]
            )
    return rows


def _direction_text(report: dict, tag: Callable[[str, object], str]) -> str:
    if not (direction := report.get("direction")):
        return NOT_MEASURED
    fallback = " (fallback: no candidate passed every filter)" if direction.get("fallback") else ""
    layer, position = tag("direction.layer", direction.get("layer")), tag("direction.position", direction.get("position"))
    return f"layer {layer}, position {position}{fallback}"


# ---- HTML (building blocks and the page-only sections: report.html) ---------------------------
def _rates_html(report: dict) -> str:
    rates, safety, conditions, found = report["rates"], report.get("safety"), list(labels(report).items()), kinds(report)
    header = _rate_header(report)
    parts = ["<h3>Refusal rate (Wilson 95% intervals)</h3>", table(header, _rate_rows("rates", report, num))]
    parts.append(img(plots.rates_plot(rates, conditions, found, "refused (%)"), "refusal rates") if rates else missing("refusal rates"))
    if safety:
        judge = f" (judge: {esc(safety['judge'])})" if safety.get("judge") else ""
        parts += [
            f"<h3>Unsafe rate{judge}</h3>",
            table(header, _rate_rows("safety", report, num)),
            img(plots.rates_plot(safety, conditions, found, "unsafe (%)"), "unsafe rates"),
        ]
    else:
        parts += ["<h3>Unsafe rate</h3>", missing("safety judged by an LLM")]
    return "\n".join(parts)


def _samples_html(report: dict) -> str:
    samples, names = _samples(report), labels(report)
    if not samples:
        return missing("sample completions")
    rows = [
        [
            esc(s.get("kind", "")),
            esc(names.get(s.get("edit", ""), s.get("edit", ""))),
            *(f'<td class="text">{esc(s.get(k, ""))}</td>' for k in TEXTS),
        ]
        for s in samples
    ]
    return table(["kind", "edit", "instruction", "original completion", "edited completion"], rows)


def _samples(report: dict) -> list[dict]:
    """The report's samples, ordered by kind (harmful, harmless, then any other), stable within a kind."""
    order = kinds(report)
    return sorted(report.get("samples") or [], key=lambda s: order.index(s["kind"]) if s.get("kind") in order else len(order))


def render_html(report: dict) -> str:
    """One self-contained HTML page (inline CSS, base64 PNG plots, no scripts) for the report."""
    validate_report(report)
    source = esc(report["model"].get("source", "model"))
    projections, cosine = report.get("projections"), report.get("cosine")
    # the sections of what only some reports measure are left out where this one did not
    sections = [
        section("rates", "Refusal and safety rates", _rates_html(report)),
        section("costs", "Costs: KL divergence and CE loss", table(COST_HEADER, _cost_rows(report, num))),
    ]
    if report.get("selection"):
        sections.append(section("selection", "Direction selection", selection_section(report)))
    if projections:
        plot = img(plots.projections_plot(projections, report.get("direction")), "projections")
        sections.append(section("projections", "Mean projection onto the direction (± std)", plot))
    if cosine:
        plot = img(plots.cosine_plot(cosine), "cosine similarity")
        sections.append(section("cosine", "Cosine similarity between the layers' candidate directions", plot))
    sections.append(section("samples", "Sample completions", _samples_html(report)))
    if report.get("search"):
        sections.append(section("search", "Search: refusal score vs KL", search_section(report)))
    if report.get("mechanisms"):
        sections.append(section("mechanisms", "Mechanisms: how a suffix suppresses the direction", mechanisms_html(report)))
    if report.get("monitor"):
        sections.append(section("monitor", "Monitor: flagging harmful requests from activations", monitor_html(report)))
    if report.get("audit"):
        sections.append(section("audit", "Audit: how brittle the refusal is", audit_html(report)))
    sections.append(section("metadata", "Metadata", metadata_section(report)))
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Refusal report: {source}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n<h1>Refusal report: {source}</h1>\n<p>Direction: "
        f"{_direction_text(report, num)}. Created {esc(report['created'])}.</p>\n{''.join(sections)}</body>\n</html>\n"
    )


# ---- Markdown ----------------------------------------------------------------------------------
def _md(text: object, limit: int | None = None) -> str:
    """Text for a Markdown table cell: one line, truncated, HTML-escaped, pipes escaped."""
    text = " ".join(str(text).split())
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text, quote=False).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(row)} |" for row in rows)]


def render_markdown(report: dict, samples_per_kind: int = 2, max_chars: int = 160) -> str:
    """A Markdown summary for an issue or a paper: model, direction, rates with intervals, costs, timings, samples."""
    validate_report(report)
    model = report["model"]
    described = ", ".join(f"{k} {_plain(f'model.{k}', model[k])}" for k in ("class", "n_layers", "d_model") if k in model)
    lines = [
        f"# Refusal report: {_md(model.get('source', 'model'))}",
        "",
        f"- model: {_md(model.get('source', '?'))}" + (f" ({described})" if described else ""),
        f"- direction: {_direction_text(report, _plain)}",
    ]
    if settings := report.get("settings"):
        lines.append("- settings: " + ", ".join(f"{_md(k)} {_md(fmt(f'settings.{k}', v), 40)}" for k, v in settings.items()))
    lines += [
        f"- created {_md(report['created'])} with refusal {_md(report['refusal_version'])}",
        "",
        "## Refusal rates (95% Wilson intervals)",
        "",
        *_md_table(_rate_header(report), _rate_rows("rates", report, _plain)),
    ]
    if safety := report.get("safety"):
        lines += [
            "",
            f"## Unsafe rates (judge: {_md(safety.get('judge', '?'))})",
            "",
            *_md_table(_rate_header(report), _rate_rows("safety", report, _plain)),
        ]
    lines += ["", "## Costs", "", *_md_table(COST_HEADER, _cost_rows(report, _plain))]
    if search := report.get("search"):
        fields = SEARCH_FIELDS
        rows = [[_plain(f"search.confirmed.{i}.{f}", p.get(f)) for f in fields] for i, p in enumerate(search.get("confirmed") or [])]
        lines += [
            "",
            f"## Search (chosen: trial {_md((search.get('chosen') or {}).get('trial'))}; "
            f"paper's edit: trial {_md((search.get('paper_trial') or {}).get('trial'))})",
            "",
            *_md_table(list(fields), rows),
        ]
    if m := report.get("mechanisms"):
        suffix = (m.get("suffix") or {}).get("text", "").replace("`", "'")
        lines += ["", "## Mechanisms (refusal analyze)", "", f"Suffix: `{suffix}`", "", _md(refused_sentence(m))]
        for header, rows in mechanisms_tables(m, _plain, _md).values():
            if rows:  # a table with no rows (e.g. no attack rates for a suffix from a file) is left out
                lines += ["", *_md_table(header, rows)]
    if mon := report.get("monitor"):
        lines += ["", "## Monitor (refusal monitor)", "", *(_md(line) for line in monitor_sentences(mon))]
        lines += ["", *_md_table(*monitor_rows(mon, _plain, _md))]
    if audit := report.get("audit"):
        lines += ["", "## Audit (refusal audit)", "", *(_md(line) for line in audit_sentences(audit))]
        for title, (header, rows) in audit_tables(audit, _plain, _md).items():
            lines += ["", f"### {_md(title)}", "", *_md_table(header, rows)] if rows else []
    if timings := report.get("timings"):
        rows = [[_md(k), _plain(f"timings.{k}", v)] for k, v in timings.items()]
        lines += ["", "## Timings", "", *_md_table(["stage", "seconds"], rows)]
    samples, names = _samples(report), labels(report)
    shown = [s for kind in dict.fromkeys(s.get("kind") for s in samples) for s in [x for x in samples if x.get("kind") == kind][:samples_per_kind]]
    if shown:
        rows = [
            [_md(s.get("kind")), _md(names.get(s.get("edit", ""), s.get("edit", ""))), *(_md(s.get(k, ""), max_chars) for k in TEXTS)] for s in shown
        ]
        lines += ["", "## Sample completions", "", *_md_table(["kind", "edit", "instruction", "original", "edited"], rows)]
    return "\n".join(lines) + "\n"


# ---- files -------------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8", newline="\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """Validate, render and write report.json, report.md and report.html into out_dir (created if needed).

    Everything is rendered before anything is written, and each file is renamed into place, so a
    failure leaves no half-written file. Returns {"json": ..., "md": ..., "html": ...}.
    """
    validate_report(report)
    try:
        as_json = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise RefusalError(f"report cannot be saved as JSON ({e}); use null for values that were not measured") from None
    texts = {"json": as_json, "md": render_markdown(report), "html": render_html(report)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"report.{ext}" for ext in texts}
    for ext, text in texts.items():
        _write_atomic(paths[ext], text)
    return paths
