"""HTML building blocks of the report page, and its sections that only the page shows.

Every JSON value on the page goes through ``num``: an element whose ``data-key`` is the value's JSON
path and whose text is ``fmt(path, value)``, so tests can compare the page with report.json. Free
text is escaped with ``esc``; plots arrive as base64 PNG (``report.plots``) and are inlined by ``img``.
"""

from __future__ import annotations

import html

from . import plots
from .schema import fmt

NOT_MEASURED = "not measured"
SEARCH_FIELDS = (
    "trial",
    "refusal",
    "kl",
    "harmful_refused",
    "harmful_total",
    "harmless_refused",
    "harmless_total",
    "train_refused",
    "train_total",
    "train_buffer",
)


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def num(path: str, value: object, tag: str = "span") -> str:
    """One JSON value in an element that names its path."""
    return f'<{tag} data-key="{esc(path)}">{esc(fmt(path, value))}</{tag}>'


def img(b64: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">'


CSS = """body{font:14px/1.45 system-ui,sans-serif;color:#222;max-width:1100px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;
vertical-align:top}td.text{white-space:pre-wrap;max-width:28em}.missing{color:#777;font-style:italic}
img{max-width:100%;display:block;margin:.5em 0}h2{border-bottom:1px solid #ddd;margin-top:1.8em}"""


def missing(what: str) -> str:
    return f'<p class="missing">{esc(what)}: {NOT_MEASURED}.</p>'


def section(id_: str, title: str, body: str) -> str:
    return f'<section id="{id_}">\n<h2>{esc(title)}</h2>\n{body}\n</section>\n'


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    cells = lambda row: "".join(c if c.startswith(("<td", "<th")) else f"<td>{c}</td>" for c in row)
    body = "".join(f"<tr>{cells(row)}</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def kv_table(prefix: str, data: dict) -> str:
    """Key/value rows; keys containing a dot get no data-key (their path would be ambiguous)."""
    path = lambda k: f"{prefix}.{k}" if prefix else str(k)
    rows = [[f"<th>{esc(k)}</th>", num(path(k), v, "td") if "." not in str(k) else f"<td>{esc(fmt(k, v))}</td>"] for k, v in data.items()]
    return table(["key", "value"], rows)


def selection_section(report: dict) -> str:
    selection = report.get("selection")
    if not selection:
        return missing("candidate selection")
    fields = ("layer", "position", "bypass", "induce", "kl", "fallback")
    chosen = selection.get("chosen")
    parts = [
        table(["", *fields], [["chosen", *(num(f"selection.chosen.{f}", chosen.get(f), "td") for f in fields)]])
        if chosen
        else missing("chosen candidate")
    ]
    candidates = selection.get("candidates") or []
    if candidates:
        parts.append("<p>Heatmaps over layers × positions: red square = chosen, × = filtered, blank = not scored.</p>")
        parts.append(img(plots.selection_plot(selection), "candidate scores"))
        fields = ("layer", "position", "bypass", "induce", "kl", "filtered")
        rows = [[num(f"selection.candidates.{i}.{f}", c.get(f), "td") for f in fields] for i, c in enumerate(candidates)]
        parts.append(f"<details><summary>All {len(candidates)} candidates</summary>\n{table(list(fields), rows)}</details>")
    else:
        parts.append(missing("candidate scores"))
    return "\n".join(parts)


def metadata_section(report: dict) -> str:
    top = {k: report[k] for k in ("created", "refusal_version", "format_version")}
    parts = [kv_table("", top), "<h3>Model</h3>", kv_table("model", report["model"])]
    for key, title in (("datasets", "Datasets"), ("settings", "Settings"), ("timings", "Timings (seconds)")):
        value = report.get(key)
        parts += [f"<h3>{title}</h3>", kv_table(key, value) if value else missing(title.lower())]
    return "\n".join(parts)


def search_section(report: dict) -> str:
    search = report.get("search")
    if not search:
        return missing("search (run `refusal search`)")
    fields = SEARCH_FIELDS
    rows = [[num(f"search.confirmed.{i}.{f}", p.get(f), "td") for f in fields] for i, p in enumerate(search.get("confirmed") or [])]
    chosen = search.get("chosen") or {}
    return (
        img(plots.search_plot(search), "search trials") + f"<p>Chosen: trial {num('search.chosen.trial', chosen.get('trial'))} "
        f"({esc(chosen.get('rule', ''))}). Confirmed front points (the train prompts' first-token screen, then generation on "
        "validation prompts):</p>" + table(list(fields), rows)
    )
