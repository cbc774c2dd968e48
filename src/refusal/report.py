"""Render an evaluation report (the dict saved as report.json) as Markdown and as one HTML page.

The HTML is self-contained (inline CSS, plots as base64 PNG, no scripts) and every number in it sits
in an element whose ``data-key`` is the number's JSON path and whose text is ``fmt(path, value)``,
so the page can be checked against report.json. Optional sections that are null or absent show
"not measured". Plots need matplotlib (``pip install 'refusal[report]'``), imported only when drawing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

from .errors import RefusalError
from .stats import wilson_interval

FORMAT_VERSION = "1"
REQUIRED = {
    "format_version": '"1"',
    "created": 'an ISO 8601 time such as "2026-11-25T19:00:00Z"',
    "refusal_version": "refusal.__version__",
    "model": 'an object such as {"source": "demo"}',
    "rates": 'an object such as {"harmful_original": {"refused": 12, "total": 32}}',
}
KINDS = ("harmful", "harmless")
CONDITIONS = {"original": "original", "ablated": "ablated (hooks)", "added": "activation addition", "edited": "edited checkpoint"}
COLORS = {"harmful": "#c0392b", "harmless": "#2e6da4"}
NOT_MEASURED = "not measured"
MPL_MISSING = "report plots need matplotlib; install it with: pip install 'refusal[report]'"
PERCENT_FIELDS = ("rate", "low", "high")
TEXTS = ("instruction", "original", "edited")


# ---- validation --------------------------------------------------------------------------------
def _validate_rates(name: str, rates: object) -> None:
    if not isinstance(rates, dict):
        raise RefusalError(f"report {name!r} must be an object of rates keyed like 'harmful_original'")
    for key, entry in rates.items():
        if name == "safety" and key == "judge":
            continue
        kind, _, condition = key.partition("_")
        if kind not in KINDS or condition not in CONDITIONS:
            raise RefusalError(
                f"report {name}.{key} is not a known rate; use <kind>_<condition> with kind in {'|'.join(KINDS)} "
                f"and condition in {'|'.join(CONDITIONS)}"
            )
        ok = isinstance(entry, dict) and all(isinstance(entry.get(k), int) for k in ("refused", "total"))
        if not ok or not 0 <= entry["refused"] <= entry["total"]:
            raise RefusalError(f"report {name}.{key} needs integer 'refused' and 'total' with 0 <= refused <= total (got {entry!r})")


def validate_report(report: dict) -> None:
    """Raise RefusalError naming the first missing or malformed key and how to fix it."""
    if not isinstance(report, dict):
        raise RefusalError(f"a report must be a dict (the content of report.json), got {type(report).__name__}")
    for key, example in REQUIRED.items():
        if key not in report:
            raise RefusalError(f"report is missing the required key {key!r}; add it ({example}) or regenerate the report")
    if report["format_version"] != FORMAT_VERSION:
        raise RefusalError(
            f"report format_version {report['format_version']!r} is not supported (expected {FORMAT_VERSION!r}); "
            "regenerate the report with this version of refusal"
        )
    if not isinstance(report["model"], dict):
        raise RefusalError('report \'model\' must be an object such as {"source": "demo"}')
    _validate_rates("rates", report["rates"])
    if report.get("safety") is not None:
        _validate_rates("safety", report["safety"])
    for key in ("direction", "settings", "kl", "ce_loss", "refusal_score", "selection", "projections", "cosine", "timings", "search"):
        if report.get(key) is not None and not isinstance(report[key], dict):
            raise RefusalError(f"report {key!r} must be an object or null (got {type(report[key]).__name__})")
    if not isinstance(report.get("samples") or [], list):
        raise RefusalError("report 'samples' must be a list of {kind, instruction, original, edited, edit} objects")
    if proj := report.get("projections"):
        n = len(proj.get("layers", []))
        for key in ("harmful_mean", "harmful_std", "harmless_mean", "harmless_std"):
            if len(proj.get(key) or []) != n:
                raise RefusalError(f"report projections.{key} must have one value per layer ({n}); regenerate the report")
    if cos := report.get("cosine"):
        n = len(cos.get("layers", []))
        if len(cos.get("matrix", [])) != n or any(len(row) != n for row in cos["matrix"]):
            raise RefusalError(f"report cosine.matrix must be {n} x {n} (one row and column per layer)")


# ---- the one formatter -------------------------------------------------------------------------
def fmt(path: str, value: object) -> str:
    """Format a report.json value for display; `path` is its JSON path (e.g. 'rates.harmful_original.rate').

    Rates and their interval bounds become percentages with one decimal, other floats 4 significant
    digits, integers stay exact, null is a dash, lists and objects are compact JSON.
    """
    parts = path.split(".")
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and parts[0] in ("rates", "safety") and parts[-1] in PERCENT_FIELDS:
        return f"{100 * value:.1f}%"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(path: str, value: object, tag: str = "span") -> str:
    """One JSON value in an element that names its path."""
    return f'<{tag} data-key="{_esc(path)}">{_esc(fmt(path, value))}</{tag}>'


def _plain(path: str, value: object) -> str:
    """The Markdown counterpart of _num: the formatted value, escaped for a table cell."""
    return _md(fmt(path, value))


def _rate_values(entry: dict) -> tuple[float, float, float]:
    """(rate, low, high), from the JSON where present, otherwise computed (Wilson 95%)."""
    refused, total = entry["refused"], entry["total"]
    low, high = wilson_interval(refused, total)
    rate = entry.get("rate")
    rate = (refused / total if total else 0.0) if rate is None else rate
    return rate, low if entry.get("low") is None else entry["low"], high if entry.get("high") is None else entry["high"]


def _rate_text(path: str, entry: dict, tag=_num) -> str:
    """'refused/total (rate, 95% CI low–high)'; values not in the JSON are computed and carry no data-key."""
    computed = dict(zip(PERCENT_FIELDS, _rate_values(entry)))

    def part(name: str) -> str:
        key = f"{path}.{name}"
        return tag(key, entry[name]) if entry.get(name) is not None else fmt(key, computed[name])

    refused, total = tag(f"{path}.refused", entry["refused"]), tag(f"{path}.total", entry["total"])
    return f"{refused}/{total} ({part('rate')}, 95% CI {part('low')}–{part('high')})"


# ---- plots -------------------------------------------------------------------------------------
def _figure(width: float = 6.0, height: float = 3.5):
    """A matplotlib Figure on an Agg canvas. No pyplot: nothing is registered globally, nothing to close."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RefusalError(MPL_MISSING) from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    fig.clear()
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'


def _index_ticks(ax, labels: list, axis: str) -> None:
    """Tick at most ~12 of the given labels along x or y of an image plot."""
    ticks = list(range(0, len(labels), max(1, math.ceil(len(labels) / 12))))
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks, [str(labels[i]) for i in ticks])


def _rates_plot(rates: dict, ylabel: str) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    conditions = [c for c in CONDITIONS if any(f"{k}_{c}" in rates for k in KINDS)]
    for i, kind in enumerate(KINDS):
        xs, ys, errs = [], [], ([], [])
        for j, condition in enumerate(conditions):
            if (entry := rates.get(f"{kind}_{condition}")) is None:
                continue
            rate, low, high = _rate_values(entry)
            xs.append(j + (i - 0.5) * 0.38)
            ys.append(100 * rate)
            errs[0].append(max(0.0, 100 * (rate - low)))
            errs[1].append(max(0.0, 100 * (high - rate)))
        ax.bar(xs, ys, 0.38, yerr=errs, capsize=3, label=kind, color=COLORS[kind])
    ax.set_xticks(range(len(conditions)), conditions)
    ax.set(ylim=(0, 100), ylabel=ylabel)
    ax.legend()
    return _png(fig)


def _selection_plot(selection: dict) -> str:
    import numpy as np

    candidates, chosen = selection.get("candidates") or [], selection.get("chosen") or {}
    layers = sorted({c["layer"] for c in candidates})
    positions = sorted({c["position"] for c in candidates})
    cell = {(c["layer"], c["position"]): (layers.index(c["layer"]), positions.index(c["position"])) for c in candidates}
    fig = _figure(8.0, 3.5)
    for i, score in enumerate(("bypass", "induce", "kl")):
        ax = fig.add_subplot(1, 3, i + 1)
        grid = np.full((len(layers), len(positions)), np.nan)
        for c in candidates:
            if c.get(score) is not None:
                grid[cell[c["layer"], c["position"]]] = c[score]
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", cmap="viridis")
        fig.colorbar(image, ax=ax)
        filtered = [cell[c["layer"], c["position"]] for c in candidates if c.get("filtered")]
        if filtered:
            ax.scatter([p for _, p in filtered], [layer for layer, _ in filtered], marker="x", s=14, color="0.35")
        if (chosen.get("layer"), chosen.get("position")) in cell:
            row, col = cell[chosen["layer"], chosen["position"]]
            ax.scatter([col], [row], marker="s", s=110, facecolors="none", edgecolors="red", linewidths=2)
        _index_ticks(ax, positions, "x")
        _index_ticks(ax, layers, "y")
        ax.set(title=score, xlabel="position", ylabel="layer" if i == 0 else None)
    return _png(fig)


def _projections_plot(proj: dict, direction: dict | None) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    layers = proj["layers"]
    if direction and direction.get("layer") is not None:
        ax.axvline(direction["layer"], color="0.5", linestyle="--", linewidth=1, label="chosen layer")
    for kind in KINDS:
        mean, std = proj[f"{kind}_mean"], proj[f"{kind}_std"]
        ax.plot(layers, mean, color=COLORS[kind], label=kind)
        ax.fill_between(layers, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=COLORS[kind], alpha=0.2)
    ax.set(xlabel="layer", ylabel="projection onto direction")
    ax.legend()
    return _png(fig)


def _cosine_plot(cosine: dict) -> str:
    fig = _figure(4.5, 3.8)
    ax = fig.add_subplot()
    matrix = [[math.nan if v is None else v for v in row] for row in cosine["matrix"]]
    image = ax.imshow(matrix, origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    _index_ticks(ax, cosine["layers"], "x")
    _index_ticks(ax, cosine["layers"], "y")
    ax.set(xlabel="layer", ylabel="layer")
    return _png(fig)


# ---- content shared by HTML and Markdown (`tag` wraps each JSON value: _num or _plain) ----------
RATE_HEADER, COST_HEADER = ["condition", *KINDS], ["measure", "value", "details"]


def _rate_rows(name: str, rates: dict, tag) -> list[list[str]]:
    return [
        [label, *(_rate_text(f"{name}.{k}_{c}", rates[f"{k}_{c}"], tag) if f"{k}_{c}" in rates else NOT_MEASURED for k in KINDS)]
        for c, label in CONDITIONS.items()
    ]


def _cost_rows(report: dict, tag) -> list[list[str]]:
    """KL per edit (first token and multi-token), cross-entropy per condition, refusal log-odds per set."""
    rows = []
    for edit, kl in (report.get("kl") or {}).items():
        first, multi = (kl or {}).get("first_token"), (kl or {}).get("multi_token")
        rows.append(
            [
                f"KL on harmless, first token ({edit})",
                tag(f"kl.{edit}.first_token.mean", first["mean"]),
                f"n = {tag(f'kl.{edit}.first_token.n', first['n'])}",
            ]
            if first
            else [f"KL, first token ({edit})", NOT_MEASURED, ""]
        )
        rows.append(
            [
                f"KL on harmless, multi-token ({edit})",
                tag(f"kl.{edit}.multi_token.mean", multi["mean"]),
                f"n = {tag(f'kl.{edit}.multi_token.n', multi['n'])}, tokens = {tag(f'kl.{edit}.multi_token.tokens', multi['tokens'])}",
            ]
            if multi
            else [f"KL, multi-token ({edit})", NOT_MEASURED, ""]
        )
    if not rows:
        rows.append(["KL on harmless", NOT_MEASURED, ""])
    ce = report.get("ce_loss")
    if ce:
        detail = f"tokens = {tag('ce_loss.tokens', ce.get('tokens'))}, corpus = {tag('ce_loss.corpus', ce.get('corpus'))}"
        rows += [[f"cross-entropy, nats/token ({k})", tag(f"ce_loss.loss.{k}", v), detail] for k, v in ce["loss"].items()]
    else:
        rows.append(["cross-entropy", NOT_MEASURED, ""])
    for key, value in (report.get("refusal_score") or {}).items():
        rows.append([f"refusal log-odds, first token ({key})", tag(f"refusal_score.{key}", value), "no generation"])
    return rows


def _direction_text(report: dict, tag) -> str:
    if not (direction := report.get("direction")):
        return NOT_MEASURED
    fallback = " (fallback: no candidate passed every filter)" if direction.get("fallback") else ""
    layer, position = tag("direction.layer", direction.get("layer")), tag("direction.position", direction.get("position"))
    return f"layer {layer}, position {position}{fallback}"


# ---- HTML --------------------------------------------------------------------------------------
CSS = """body{font:14px/1.45 system-ui,sans-serif;color:#222;max-width:1100px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;
vertical-align:top}td.text{white-space:pre-wrap;max-width:28em}.missing{color:#777;font-style:italic}
img{max-width:100%;display:block;margin:.5em 0}h2{border-bottom:1px solid #ddd;margin-top:1.8em}"""


def _missing(what: str) -> str:
    return f'<p class="missing">{_esc(what)}: {NOT_MEASURED}.</p>'


def _section(id_: str, title: str, body: str) -> str:
    return f'<section id="{id_}">\n<h2>{_esc(title)}</h2>\n{body}\n</section>\n'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    cells = lambda row: "".join(c if c.startswith(("<td", "<th")) else f"<td>{c}</td>" for c in row)
    body = "".join(f"<tr>{cells(row)}</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def _kv_table(prefix: str, data: dict) -> str:
    """Key/value rows; keys containing a dot get no data-key (their path would be ambiguous)."""
    path = lambda k: f"{prefix}.{k}" if prefix else str(k)
    rows = [[f"<th>{_esc(k)}</th>", _num(path(k), v, "td") if "." not in str(k) else f"<td>{_esc(fmt(k, v))}</td>"] for k, v in data.items()]
    return _table(["key", "value"], rows)


def _rates_html(report: dict) -> str:
    rates, safety = report["rates"], report.get("safety")
    parts = ["<h3>Refusal rate (Wilson 95% intervals)</h3>", _table(RATE_HEADER, _rate_rows("rates", rates, _num))]
    parts.append(_img(_rates_plot(rates, "refused (%)"), "refusal rates") if rates else _missing("refusal rates"))
    if safety:
        judge = f" (judge: {_esc(safety['judge'])})" if safety.get("judge") else ""
        parts += [
            f"<h3>Unsafe rate{judge}</h3>",
            _table(RATE_HEADER, _rate_rows("safety", safety, _num)),
            _img(_rates_plot(safety, "unsafe (%)"), "unsafe rates"),
        ]
    else:
        parts += ["<h3>Unsafe rate</h3>", _missing("safety judged by an LLM")]
    return "\n".join(parts)


def _selection_html(report: dict) -> str:
    selection = report.get("selection")
    if not selection:
        return _missing("candidate selection")
    fields = ("layer", "position", "bypass", "induce", "kl", "fallback")
    chosen = selection.get("chosen")
    parts = [
        _table(["", *fields], [["chosen", *(_num(f"selection.chosen.{f}", chosen.get(f), "td") for f in fields)]])
        if chosen
        else _missing("chosen candidate")
    ]
    candidates = selection.get("candidates") or []
    if candidates:
        parts.append("<p>Heatmaps over layers × positions: red square = chosen, × = filtered, blank = not scored.</p>")
        parts.append(_img(_selection_plot(selection), "candidate scores"))
        fields = ("layer", "position", "bypass", "induce", "kl", "filtered")
        rows = [[_num(f"selection.candidates.{i}.{f}", c.get(f), "td") for f in fields] for i, c in enumerate(candidates)]
        parts.append(f"<details><summary>All {len(candidates)} candidates</summary>\n{_table(list(fields), rows)}</details>")
    else:
        parts.append(_missing("candidate scores"))
    return "\n".join(parts)


def _samples_html(report: dict) -> str:
    samples = sorted(report.get("samples") or [], key=lambda s: KINDS.index(s["kind"]) if s.get("kind") in KINDS else 2)
    if not samples:
        return _missing("sample completions")
    rows = [[_esc(s.get("kind", "")), _esc(s.get("edit", "")), *(f'<td class="text">{_esc(s.get(k, ""))}</td>' for k in TEXTS)] for s in samples]
    return _table(["kind", "edit", "instruction", "original completion", "edited completion"], rows)


def _metadata_html(report: dict) -> str:
    top = {k: report[k] for k in ("created", "refusal_version", "format_version")}
    parts = [_kv_table("", top), "<h3>Model</h3>", _kv_table("model", report["model"])]
    for key, title in (("datasets", "Datasets"), ("settings", "Settings"), ("timings", "Timings (seconds)")):
        value = report.get(key)
        parts += [f"<h3>{title}</h3>", _kv_table(key, value) if value else _missing(title.lower())]
    return "\n".join(parts)


def render_html(report: dict) -> str:
    """One self-contained HTML page (inline CSS, base64 PNG plots, no scripts) for the report."""
    validate_report(report)
    source = _esc(report["model"].get("source", "model"))
    projections, cosine = report.get("projections"), report.get("cosine")
    sections = [
        _section("rates", "Refusal and safety rates", _rates_html(report)),
        _section("costs", "Costs: KL divergence and CE loss", _table(COST_HEADER, _cost_rows(report, _num))),
        _section("selection", "Direction selection", _selection_html(report)),
        _section(
            "projections",
            "Mean projection onto the direction (± std)",
            _missing("projections") if not projections else _img(_projections_plot(projections, report.get("direction")), "projections"),
        ),
        _section(
            "cosine",
            "Cosine similarity between the layers' candidate directions",
            _img(_cosine_plot(cosine), "cosine similarity") if cosine else _missing("cosine similarity"),
        ),
        _section("samples", "Sample completions", _samples_html(report)),
        _section("search", "Search: refusal score vs KL", _search_html(report)),
        _section("metadata", "Metadata", _metadata_html(report)),
    ]
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Refusal report: {source}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n<h1>Refusal report: {source}</h1>\n<p>Direction: "
        f"{_direction_text(report, _num)}. Created {_esc(report['created'])}.</p>\n{''.join(sections)}</body>\n</html>\n"
    )


def _search_plot(search: dict) -> str:
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    trials = {t["trial"]: t for t in search["trials"]}
    ax.scatter([t["kl"] for t in trials.values()], [t["refusal"] for t in trials.values()], s=12, color="0.6", label="trial")
    front = [trials[n] for n in search["front"] if n in trials]
    ax.plot([t["kl"] for t in front], [t["refusal"] for t in front], "o-", color=COLORS["harmless"], ms=4, label="Pareto front")
    for key, marker, label in (("paper_trial", "s", "paper's edit"), ("chosen", "*", "chosen")):
        number = (search.get(key) or {}).get("trial")
        if number in trials:
            ax.scatter([trials[number]["kl"]], [trials[number]["refusal"]], marker=marker, s=90, color=COLORS["harmful"], label=label, zorder=3)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set(xlabel="first-token KL on harmless prompts", ylabel="refusal score (log-odds)")
    ax.legend(fontsize=8)
    return _png(fig)


def _search_html(report: dict) -> str:
    search = report.get("search")
    if not search:
        return _missing("search (run `refusal search`)")
    fields = ("trial", "refusal", "kl", "harmful_refused", "harmful_total", "harmless_refused", "harmless_total")
    rows = [[_num(f"search.confirmed.{i}.{f}", p.get(f), "td") for f in fields] for i, p in enumerate(search.get("confirmed") or [])]
    chosen = search.get("chosen") or {}
    return (
        _img(_search_plot(search), "search trials") + f"<p>Chosen: trial {_num('search.chosen.trial', chosen.get('trial'))} "
        f"({_esc(chosen.get('rule', ''))}). Confirmed front points (generation on validation prompts):</p>" + _table(list(fields), rows)
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
        *_md_table(RATE_HEADER, _rate_rows("rates", report["rates"], _plain)),
    ]
    if safety := report.get("safety"):
        lines += ["", f"## Unsafe rates (judge: {_md(safety.get('judge', '?'))})", "", *_md_table(RATE_HEADER, _rate_rows("safety", safety, _plain))]
    lines += ["", "## Costs", "", *_md_table(COST_HEADER, _cost_rows(report, _plain))]
    if search := report.get("search"):
        fields = ("trial", "refusal", "kl", "harmful_refused", "harmful_total", "harmless_refused", "harmless_total")
        rows = [[_plain(f"search.confirmed.{i}.{f}", p.get(f)) for f in fields] for i, p in enumerate(search.get("confirmed") or [])]
        lines += [
            "",
            f"## Search (chosen: trial {_md((search.get('chosen') or {}).get('trial'))}; "
            f"paper's edit: trial {_md((search.get('paper_trial') or {}).get('trial'))})",
            "",
            *_md_table(list(fields), rows),
        ]
    if timings := report.get("timings"):
        rows = [[_md(k), _plain(f"timings.{k}", v)] for k, v in timings.items()]
        lines += ["", "## Timings", "", *_md_table(["stage", "seconds"], rows)]
    samples = report.get("samples") or []
    shown = [s for kind in KINDS for s in [x for x in samples if x.get("kind") == kind][:samples_per_kind]]
    if shown:
        rows = [[_md(s.get("kind")), _md(s.get("edit", "")), *(_md(s.get(k, ""), max_chars) for k in TEXTS)] for s in shown]
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
