"""Confirmation and choice: front points judged by generation, bisected over KL, and the default choice (docs/search.md).

``bisect_front`` confirms at most ``--confirm`` points of the search's front where the lowest-KL
point that ``meets_target`` can lie; ``choose`` takes that point, or the fewest confirmed refusals.
"""

from __future__ import annotations

from collections.abc import Callable

from .cleaning import Protection
from .directions import Candidates
from .edits import Editor, EditParams, KernelEdit
from .errors import RefusalError
from .generation import Engine
from .judges import judge_refusals
from .settings import SearchSettings


def confirm_point(
    editor: Editor,
    engine: Engine,
    candidates: Candidates,
    point: dict,
    prompts: dict[str, list[str]],
    max_new_tokens: int,
    phrases,
    protection: Protection | None = None,
) -> dict:
    """``point`` with its greedy generations judged (harmful and harmless validation prompts), its edit applied in place."""
    with editor.applied(KernelEdit.from_candidates(candidates, EditParams.from_dict(point["params"]), protection)):
        counts = {kind: sum(judge_refusals(engine, prompts[kind], max_new_tokens, phrases).refused) for kind in ("harmful", "harmless")}
    confirmed = {
        "harmful_refused": counts["harmful"],
        "harmful_total": len(prompts["harmful"]),
        "harmless_refused": counts["harmless"],
        "harmless_total": len(prompts["harmless"]),
    }
    return {**point, "confirmed": confirmed}


def meets_target(point: dict, config: SearchSettings, harmless_original: int) -> bool:
    """A confirmed point refuses at most ``max_refused`` of the harmful prompts and no more harmless ones than the original."""
    c = point["confirmed"]
    return c["harmful_refused"] <= config.max_refused * c["harmful_total"] and c["harmless_refused"] <= harmless_original


def bisect_front(front: list[dict], config: SearchSettings, confirm: Callable[[dict], dict], harmless_original: int) -> list[dict]:
    """Confirm at most ``config.confirm`` front points by bisection over KL, looking for the lowest-KL point that
    meets the target; returns the confirmed points in the order they were confirmed.

    Along a front sorted by KL the refusal score falls, so confirmed refusals fall too (up to noise):
    each confirmation halves the interval of front points (KL <= ``max_kl``) where the first point that
    meets the target can lie; 4 confirmations resolve a front of 16 points.
    """
    allowed = [p for p in front if p["kl"] <= config.max_kl] or front[:1]
    low, high = 0, len(allowed) - 1
    confirmed: list[dict] = []
    while low <= high and len(confirmed) < config.confirm:
        middle = (low + high) // 2
        point = confirm(allowed[middle])
        confirmed.append(point)
        if meets_target(point, config, harmless_original):
            high = middle - 1
        else:
            low = middle + 1
    return confirmed


def choose(confirmed: list[dict], config: SearchSettings, harmless_original: int) -> tuple[dict, str]:
    """The default choice: the lowest-KL confirmed point that meets the target (``meets_target``); if none
    does, the fewest confirmed harmful refusals, ties to the lower KL."""
    if not confirmed:
        raise RefusalError("the search front is empty: no trial finished; raise --trials or --time-budget")
    ok = [p for p in confirmed if meets_target(p, config, harmless_original)]
    target = f"harmful refusals <= {config.max_refused:g} of the prompts and harmless refusals <= the original's"
    if ok:
        return min(ok, key=lambda p: p["kl"]), f"lowest KL among confirmed points with {target} (KL <= {config.max_kl})"
    best = min(confirmed, key=lambda p: (p["confirmed"]["harmful_refused"], p["kl"]))
    return best, f"no confirmed point has {target}: fewest harmful refusals, then the lower KL"
