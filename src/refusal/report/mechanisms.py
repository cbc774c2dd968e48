"""The report's "Mechanisms" section (``refusal analyze``): how a suffix suppresses the refusal direction.

Reads ``report["mechanisms"]`` (written by ``analyze``): the per-layer cosine of four prompt groups
(the paper's Fig. 5), the top heads' direct attribution and attention (Fig. 6), the decomposition
check and the direction across layers. HTML figures come from ``report.plots``; every number sits
in a ``num`` element with its JSON path, as everywhere in the report. ``mechanisms_tables`` is shared
with the Markdown summary (``report.render.render_markdown``).
"""

from __future__ import annotations

from collections.abc import Callable

from . import plots
from .html import esc, img, missing, num, table

DECOMPOSITION_FIELDS = ("total", "embed", "heads", "top_heads", "attn_bias", "mlp", "max_abs_error")


def mechanisms_tables(m: dict, tag: Callable[[str, object], str], text: Callable[[object], str]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The section's tables as (header, rows): ``tag`` writes a value by its JSON path, ``text`` escapes a label (HTML or Markdown)."""
    gap = [
        [text(m["groups"][g]), tag(f"mechanisms.gap_closed.{g}.mean_from_direction_layer", entry["mean_from_direction_layer"])]
        for g, entry in m["gap_closed"].items()
    ]
    heads = [
        [
            tag(f"mechanisms.heads.{i}.layer", h["layer"]),
            tag(f"mechanisms.heads.{i}.head", h["head"]),
            text(m["groups"][g]),
            tag(f"mechanisms.heads.{i}.attribution.{g}", h["attribution"][g]),
            *(tag(f"mechanisms.heads.{i}.attention.{g}.{r}", v) for r, v in h["attention"][g].items()),
        ]
        for i, h in enumerate(m["heads"])
        for g in h["attribution"]
    ]
    parts = [
        [text(m["groups"][g]), *(tag(f"mechanisms.decomposition.{g}.{f}", d.get(f)) for f in DECOMPOSITION_FIELDS)]
        for g, d in m["decomposition"].items()
    ]
    attack = m.get("attack") or {}
    rates = [
        [
            text(label),
            *(tag(f"mechanisms.attack.refusal.{name}.{k}", attack["refusal"][name].get(k)) for k in ("refused", "total", "rate", "low", "high")),
            tag(f"mechanisms.attack.refusal_score.{name}", attack["refusal_score"].get(name)),
        ]
        for name, label in attack.get("conditions", {}).items()
        if name in attack.get("refusal", {})
    ]
    return {
        "attack": (["harmful test prompts", "refused", "of", "rate", "95% low", "95% high", "first-token refusal log-odds"], rates),
        "gap": (["prompts", "gap closed"], gap),
        "heads": (["layer", "head", "prompts", "attribution", *(f"attention on {r}" for r in _regions(m))], heads),
        "decomposition": (["prompts", *DECOMPOSITION_FIELDS], parts),
    }


def refused_sentence(m: dict) -> str:
    """Which harmful prompts were analysed, in words (analysis.json from before issue 27 used them all)."""
    r = m.get("refused")
    if not r:
        return "Harmful prompts: every harmful test prompt (an analysis from before the refused-only rule; run `refusal analyze` again)."
    return (
        f"Harmful prompts: the {r['used']} the model refuses without a suffix ({r['refused']} of {r['of']} harmful test prompts "
        f"refused; {r['judge']}), as in the paper."
    )


def _regions(m: dict) -> list[str]:
    first = m["heads"][0]["attention"] if m["heads"] else {}
    return list(next(iter(first.values()), {}))


def mechanisms_html(report: dict) -> str:
    m = report.get("mechanisms")
    if not m:
        return missing("mechanisms (run `refusal attack` and `refusal analyze`)")
    suffix, tables = m.get("suffix") or {}, mechanisms_tables(m, num, esc)
    return "\n".join(
        [
            f"<p>Suffix ({esc(suffix.get('source', ''))}): <code>{esc(suffix.get('text', ''))}</code>; "
            f"{num('mechanisms.n_prompts.harmful', m['n_prompts']['harmful'])} harmful and "
            f"{num('mechanisms.n_prompts.harmless', m['n_prompts']['harmless'])} harmless test prompts; direction from layer "
            f"{num('mechanisms.direction.layer', m['direction']['layer'])}.</p>",
            f"<p>{esc(refused_sentence(m))}</p>",
            "<h3>The attack on the held-out harmful prompts (attack.json; substring judge, 95% Wilson intervals)</h3>",
            table(*tables["attack"]) if tables["attack"][1] else missing("the attack's rates (the suffix came from a file: run `refusal attack`)"),
            "<h3>Cosine with the direction at the last position, per layer (mean ± std)</h3>",
            img(plots.layer_cosine_plot(m), "cosine per layer"),
            "<p>Share of the harmful − harmless gap the suffix closes (mean over layers from the direction's on):</p>",
            table(*tables["gap"]),
            "<h3>Top heads by direct attribution, and where they attend</h3>",
            img(plots.heads_plot(m), "top heads"),
            table(*tables["heads"]),
            "<h3>Decomposition of the final projection (means; max_abs_error: the largest |sum of parts − total| over prompts)</h3>",
            table(*tables["decomposition"]),
            "<h3>The direction across layers</h3>",
            img(plots.across_layers_plot(m), "direction across layers"),
        ]
    )
