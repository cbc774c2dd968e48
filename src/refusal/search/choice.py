"""Confirmation and choice: front points judged by generation, bisected over KL, and the default choice (docs/search.md).

``bisect_front`` confirms at most ``--confirm`` points of the search's front where the lowest-KL
point that ``meets_target`` can lie; ``choose`` takes that point, or the fewest confirmed refusals.
"""

from __future__ import annotations

from collections.abc import Callable

from ..direction.cleaning import Protection
from ..edit.edits import Editor, EditParams, KernelEdit
from ..engines.hf import Engine
from ..errors import RefusalError
from ..measure.judges import judge_refusals
from ..model.chat import ChatModel
from ..residual.directions import Candidates
from ..residual.scoring import LastPosition, refusal_margin
from ..settings import AUTO, SearchSettings


def confirm_point(
    editor: Editor,
    engine: Engine,
    candidates: Candidates,
    point: dict,
    prompts: dict[str, list[str]],
    max_new_tokens: int,
    phrases: tuple[str, ...] | list[str],
    protection: Protection | None = None,
    screen: Callable[[], tuple] | None = None,
    max_refused: float = 0.0,
) -> dict:
    """``point`` with its edit applied in place: first ``screen()`` (refused, total[, buffer]), the harmful *train* prompts
    whose first response position still starts a refusal, or nearly (``held_out_refusals``); where that is at most
    ``max_refused`` of them (or there is no screen), its greedy generations on the harmful and harmless validation
    prompts, judged. A point the screen fails is not generated on (its generation counts are None): it cannot meet
    the target."""
    counts: dict = {}
    with editor.applied(KernelEdit.from_candidates(candidates, EditParams.from_dict(point["params"]), protection)):
        if screen is not None:
            counts["train_refused"], counts["train_total"], *buffer = screen()
            if buffer:
                counts["train_buffer"] = buffer[0]
        generate = screen is None or counts["train_refused"] <= max_refused * counts["train_total"]
        for kind in ("harmful", "harmless"):
            refused = sum(judge_refusals(engine, prompts[kind], max_new_tokens, phrases).refused) if generate else None
            counts[f"{kind}_refused"], counts[f"{kind}_total"] = refused, len(prompts[kind])
    order = ("harmful_refused", "harmful_total", "harmless_refused", "harmless_total", "train_refused", "train_total", "train_buffer")
    return {**point, "confirmed": {k: counts[k] for k in order if k in counts}}


def held_out_refusals(
    chat: ChatModel, harmful: list[str], refusal_ids: list[int], batch_size: int, margin: float | str = 0.0
) -> Callable[[], tuple[int, int, float]]:
    """A confirmation screen: under the model's current edit, how many of ``harmful`` have a refusal margin above
    ``-buffer`` at their first response position, of how many, and the buffer. Above 0 greedy decoding starts a
    refusal: on the default model the harmful train prompts' count under a front point matched its refusals by
    generation (docs/search.md) for a fraction of generation's time.
    The buffer (``--screen-margin``) is for the prompts the screen did not see: the point the bisection picks is the
    cheapest whose highest train margin is below the line, and a new set of 64 prompts holds a prompt above all 192
    train prompts about one time in four (64 / 256), by about the train margins' top spacing (docs/search.md).
    ``margin`` "auto" takes that spacing from the margins themselves (``tail_scale``), so the buffer follows the
    model's scale; a number is used as it is."""
    scorer = LastPosition(chat, harmful, batch_size)

    def screen() -> tuple[int, int, float]:
        margins = refusal_margin(scorer.logits(), refusal_ids)
        buffer = tail_scale(margins.tolist()) if margin == AUTO else float(margin)
        return int((margins > -buffer).sum()), len(harmful), round(buffer, 4)

    return screen


def tail_scale(values: list[float], spacings: int = 4) -> float:
    """The scale of the upper tail of ``values``: the mean of i·(x₍ᵢ₎ − x₍ᵢ₊₁₎) over the top ``spacings`` spacings
    (x₍₁₎ the largest), an exponential tail's estimate of how far above the largest a new draw tends to land."""
    top = sorted(values, reverse=True)[: spacings + 1]
    terms = [(i + 1) * (top[i] - top[i + 1]) for i in range(len(top) - 1)]
    return sum(terms) / len(terms) if terms else 0.0


def meets_target(point: dict, config: SearchSettings, harmless_original: int) -> bool:
    """A confirmed point refuses at most ``max_refused`` of the harmful validation prompts (and of the harmful train
    prompts its screen read) and no more harmless ones than the original."""
    c = point["confirmed"]
    if c.get("train_refused") is not None and c["train_refused"] > config.max_refused * c["train_total"]:
        return False
    if c["harmful_refused"] is None or c["harmless_refused"] is None:
        return False
    return c["harmful_refused"] <= config.max_refused * c["harmful_total"] and c["harmless_refused"] <= harmless_original


def generated(point: dict) -> bool:
    """Whether a confirmed point was generated on (its train screen, if any, passed)."""
    return point["confirmed"].get("harmful_refused") is not None


def bisect_front(front: list[dict], config: SearchSettings, confirm: Callable[[dict], dict], harmless_original: int) -> list[dict]:
    """Confirm front points by bisection over KL, looking for the lowest-KL point that meets the target, until
    ``config.confirm`` of them were generated on; returns the confirmed points in the order they were confirmed.

    Along a front sorted by KL the refusal score falls, so confirmed refusals fall too (up to noise):
    each confirmation halves the interval of front points (KL <= ``max_kl``) where the first point that
    meets the target can lie; 4 confirmations resolve a front of 16 points. A point the train screen fails
    costs no generation, so it does not count against ``--confirm``: the bisection goes on (it ends anyway
    once the interval is empty), and a front longer than the budget still reaches its generated points.
    """
    allowed = [p for p in front if p["kl"] <= config.max_kl] or front[:1]
    low, high = 0, len(allowed) - 1
    confirmed: list[dict] = []
    while low <= high and sum(map(generated, confirmed)) < config.confirm:
        middle = (low + high) // 2
        point = confirm(allowed[middle])
        confirmed.append(point)
        if meets_target(point, config, harmless_original):
            high = middle - 1
        else:
            low = middle + 1
    return confirmed


def confirmation(confirmed: list[dict], config: SearchSettings, harmless_original: int) -> dict:
    """What the confirmation did, by trial: the points the train screen read, those generated on, those that met the target."""
    return {
        "screened": [p["trial"] for p in confirmed if p["confirmed"].get("train_refused") is not None],
        "generated": [p["trial"] for p in confirmed if generated(p)],
        "met_target": [p["trial"] for p in confirmed if meets_target(p, config, harmless_original)],
    }


def choose(confirmed: list[dict], config: SearchSettings, harmless_original: int) -> tuple[dict, str]:
    """The default choice: the lowest-KL confirmed point that meets the target (``meets_target``); if none
    does, a fallback: the fewest harmful refusals (the train screen's, then the validation prompts'), ties to the
    lower KL. The rule says which, and what the confirmation did."""
    if not confirmed:
        raise RefusalError("the search front is empty: no trial finished; raise --trials or --time-budget")
    did = confirmation(confirmed, config, harmless_original)
    target = f"harmful refusals <= {config.max_refused:g} of the prompts and harmless refusals <= the original's"
    listed = lambda trials: ", ".join(map(str, trials)) or "none"
    screened = f"screened on the harmful train prompts: {listed(did['screened'])}; " if did["screened"] else ""
    how = f"{screened}generated on: {listed(did['generated'])}; met the target: {listed(did['met_target'])}"
    if did["met_target"]:
        best = min((p for p in confirmed if p["trial"] in did["met_target"]), key=lambda p: p["kl"])
        return best, f"confirmed: the lowest KL among confirmed points with {target} (KL <= {config.max_kl}); {how}"
    best = min(confirmed, key=lambda p: (p["confirmed"].get("train_refused") or 0, p["confirmed"]["harmful_refused"] or 0, p["kl"]))
    why = "it was generated on but missed the target" if generated(best) else "the train screen failed it, so it was not generated on"
    return best, (
        f"fallback, not confirmed: none of the {len(confirmed)} confirmed points met the target ({target}); {how}; "
        f"chose the fewest harmful refusals (train screen, then validation), then the lower KL: {why}"
    )
