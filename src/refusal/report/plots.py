"""The report's figures, drawn with matplotlib and returned as base64 PNG for the HTML page.

matplotlib is optional (``pip install 'refusal[report]'``) and imported only when drawing. No
pyplot: each figure lives on its own Agg canvas, so nothing is registered globally.
"""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING

from ..errors import RefusalError
from ..measure.stats import rate_values

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COLORS = {"harmful": "#c0392b", "harmless": "#2e6da4"}
OTHER_COLORS = ("#7d3c98", "#1e8449", "#b9770e", "#566573")  # kinds beyond harmful/harmless
MPL_MISSING = "report plots need matplotlib; install it with: pip install 'refusal[report]'"


def _figure(width: float = 6.0, height: float = 3.5) -> Figure:
    """A matplotlib Figure on an Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RefusalError(MPL_MISSING) from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    fig.clear()
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _index_ticks(ax: Axes, labels: list, axis: str) -> None:
    """Tick at most ~12 of the given labels along x or y of an image plot."""
    ticks = list(range(0, len(labels), max(1, math.ceil(len(labels) / 12))))
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks, [str(labels[i]) for i in ticks])


def kind_color(kind: str, kinds: list[str]) -> str:
    return COLORS.get(kind) or OTHER_COLORS[kinds.index(kind) % len(OTHER_COLORS)]


def rates_plot(rates: dict, conditions: list[tuple[str, str]], kinds: list[str], ylabel: str) -> str:
    """Grouped bars with Wilson intervals: one group per (name, label) condition that has a rate, one bar per kind."""
    fig = _figure()
    ax = fig.add_subplot()
    shown = [(name, label) for name, label in conditions if rates.get(name)]
    width = 0.76 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        xs: list[float] = []
        ys: list[float] = []
        errs: tuple[list[float], list[float]] = ([], [])
        for j, (name, _) in enumerate(shown):
            if (entry := rates[name].get(kind)) is None:
                continue
            rate, low, high = rate_values(entry)
            xs.append(j + (i - (len(kinds) - 1) / 2) * width)
            ys.append(100 * rate)
            errs[0].append(max(0.0, 100 * (rate - low)))
            errs[1].append(max(0.0, 100 * (high - rate)))
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=kind, color=kind_color(kind, kinds))
    ax.set_xticks(range(len(shown)), [label for _, label in shown])
    ax.set(ylim=(0, 100), ylabel=ylabel)
    ax.legend()
    return _png(fig)


def selection_plot(selection: dict) -> str:
    """Heatmaps of bypass, induce and KL over layers x positions; chosen candidate boxed, filtered ones crossed."""
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


def projections_plot(proj: dict, direction: dict | None) -> str:
    """Mean (± std) projection of harmful and harmless activations onto the direction, per layer."""
    fig = _figure()
    ax = fig.add_subplot()
    layers = proj["layers"]
    if direction and direction.get("layer") is not None:
        ax.axvline(direction["layer"], color="0.5", linestyle="--", linewidth=1, label="chosen layer")
    for kind in ("harmful", "harmless"):
        mean, std = proj[f"{kind}_mean"], proj[f"{kind}_std"]
        ax.plot(layers, mean, color=COLORS[kind], label=kind)
        ax.fill_between(layers, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=COLORS[kind], alpha=0.2)
    ax.set(xlabel="layer", ylabel="projection onto direction")
    ax.legend()
    return _png(fig)


def cosine_plot(cosine: dict) -> str:
    """Cosine similarity between the layers' candidate directions (blank where a direction is zero)."""
    fig = _figure(4.5, 3.8)
    ax = fig.add_subplot()
    matrix = [[math.nan if v is None else v for v in row] for row in cosine["matrix"]]
    image = ax.imshow(matrix, origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    _index_ticks(ax, cosine["layers"], "x")
    _index_ticks(ax, cosine["layers"], "y")
    ax.set(xlabel="layer", ylabel="layer")
    return _png(fig)


def search_plot(search: dict) -> str:
    """Every search trial's refusal score against its KL, the Pareto front, the paper's edit and the choice."""
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


# ---- mechanisms (refusal analyze) -----------------------------------------------------------------
GROUP_COLORS = {"harmful": COLORS["harmful"], "harmful_suffix": "#b9770e", "harmful_random": "#7d3c98", "harmless": COLORS["harmless"]}


def layer_cosine_plot(mechanisms: dict) -> str:
    """The paper's Fig. 5: cosine of the last position with the direction per layer, mean ± std, per prompt group."""
    fig = _figure()
    ax = fig.add_subplot()
    layers = mechanisms["layers"]
    for group, label in mechanisms["groups"].items():
        mean, std = mechanisms["cosine"][group]["mean"], mechanisms["cosine"][group]["std"]
        ax.plot(layers, mean, color=GROUP_COLORS.get(group, "0.4"), label=label)
        ax.fill_between(
            layers, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=GROUP_COLORS.get(group, "0.4"), alpha=0.15
        )
    ax.axvline(mechanisms["direction"]["layer"], color="0.5", linestyle="--", linewidth=1)
    ax.set(xlabel="layer (last: final residual)", ylabel="cosine with the direction")
    ax.legend(fontsize=8)
    return _png(fig)


def heads_plot(mechanisms: dict) -> str:
    """The paper's Fig. 6: the top heads' direct attribution (left) and their attention on the prompt's regions (right)."""
    heads, groups = mechanisms["heads"], [g for g in mechanisms["groups"] if g != "harmless"]
    names = [f"L{h['layer']}H{h['head']}" for h in heads]
    fig = _figure(9.0, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(heads))]
        ax.bar(xs, [h["attribution"][group] for h in heads], width, color=GROUP_COLORS[group], label=mechanisms["groups"][group])
    ax.set_xticks(range(len(heads)), names, rotation=45, fontsize=7)
    ax.set(ylabel="projection on the direction", title="direct attribution")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    regions = list(heads[0]["attention"][groups[0]]) if heads else []
    shades = dict(zip(regions, ("#2e6da4", "#b9770e", "#aab7b8")))
    for i, group in enumerate(groups):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(heads))]
        bottom = [0.0] * len(heads)
        for region in regions:
            values = [h["attention"][group][region] for h in heads]
            ax.bar(xs, values, width * 0.95, bottom=bottom, color=shades[region], edgecolor="white", label=region if i == 0 else None)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(heads)), names, rotation=45, fontsize=7)
    ax.set(
        ylim=(0, 1.15),
        ylabel="attention of the last position",
        title="per head, left to right: harmful | + suffix | + random suffix",
    )
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7, ncols=3, loc="upper center")
    return _png(fig)


def across_layers_plot(mechanisms: dict) -> str:
    """Cosine of each layer's candidate direction with the chosen one (and with a second model's, when given)."""
    fig = _figure(6.0, 3.0)
    ax = fig.add_subplot()
    across = mechanisms["direction_across_layers"]
    ax.plot(range(len(across)), across, color=COLORS["harmful"], label="layer's direction vs the chosen direction")
    if base := mechanisms.get("base"):
        ax.plot(range(len(base["cosine"])), base["cosine"], color=COLORS["harmless"], label=f"vs {base['model']} at the same layer")
    ax.set(xlabel="layer", ylabel="cosine", ylim=(-1.05, 1.05))
    ax.legend(fontsize=8)
    return _png(fig)
