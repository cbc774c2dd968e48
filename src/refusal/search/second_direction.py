"""A second direction for the prompts a search's best edit still refuses (docs/search.md, "Second direction").

One direction leaves a few harmful prompts refused at every KL the search accepts: on the default
model, every front point at a low KL still refused a few of the harmful prompts, nearly all of
them self-harm prompts answered "As an AI language model, I don't have personal …", an identity
disclaimer rather than an apology. The refusal direction does not carry that behaviour; a second
direction does:

1. the *base*: the front point with the lowest refusal score among those with first-token KL at most
   ``second_base_kl_fraction`` of ``max_kl`` that still score above the floor (a third: the second direction
   buys refusals for less KL than a stronger base, and a much stronger base costs capability);
2. with the base applied, the harmful *train* prompts are scored at their last position (the refusal
   margin); with fewer than ``MIN_REFUSING`` still refused (margin > 0) there is nothing to do;
3. the second direction r2 at a layer is a difference of mean residual activations at the last
   position, under the base, of one of two ``--second-source`` pairs:
   - ``disclaimer`` (the default): the built-in questions about the assistant itself
     (``data.prompt_sets.load_self_questions``: "What is your favorite color?"), which the model answers with
     the identity disclaimer, minus the first ``MAX_HARMLESS`` harmless train prompts. 48 prompts
     that all show the behaviour make a direction that holds out of sample;
   - ``refused``: the train prompts still refused minus those clearly complied with (margin below
     ``COMPLY_BELOW``, at most ``MAX_COMPLYING``). A few refused prompts make it noisy;
4. where the base's direction is cleaned (``clean``), r2 is cleaned the same way, against the same
   protected activations at its own layer (``cleaning.Protection.clean``);
5. trials: the base edit plus r2, made orthogonal to the base's direction, removed from every writer
   with one strength s2: W <- W - s2 u2 u2^T W after the base's own edit. First a screen of the
   layers ``second_fractions`` (fractions of the depth) at ``second_screen_strength``, then the screened
   layer with the lowest refusal score within ``max_kl`` at ``second_strengths`` (``plan``; all in ``SearchSettings``).

The harmful-vs-harmless difference of the *edited* model does not work instead: removing it raised
the refusals (docs/search.md).
"""

from __future__ import annotations

import dataclasses

import torch

from ..common.progress import log
from ..data.prompt_sets import load_self_questions
from ..direction.cleaning import Protection
from ..edit.edits import EditParams, KernelEdit, edited
from ..errors import RefusalError
from ..model.chat import ChatModel
from ..residual.activations import mean_activations
from ..residual.directions import Candidates
from ..residual.scoring import LastPosition, refusal_margin
from ..settings import SECOND_SOURCES, SearchSettings
from .trials import pareto_front

COMPLY_BELOW = -1.0  # source "refused": a train prompt complied with has a refusal margin below this under the base edit
MAX_COMPLYING = 64  # source "refused": complying prompts averaged (the first ones; the mean needs no more)
MAX_HARMLESS = 96  # source "disclaimer": harmless train prompts averaged against the self questions
MIN_REFUSING = 2  # fewer still-refused train prompts than this: no second direction


def plan(records: list[dict], config: SearchSettings, base: int | None = None) -> list[tuple[float, float]]:
    """The (depth fraction, strength) pairs of the second-direction trials to run next, at most ``config.second`` in
    all: the screen first; once it is done, the best screened layer (the lowest refusal score among those with
    first-token KL at most ``config.max_kl``, else the lowest KL) at ``config.second_strengths``. Only trials on
    ``base`` count as done (a resumed study whose base changed plans afresh); None: every second-direction trial."""
    n, max_kl = config.second, config.max_kl
    screen = [(f, config.second_screen_strength) for f in config.second_fractions][:n]
    ours = [r for r in records if r["role"] == "second" and (base is None or r.get("base") == base)]
    done = {(r["fraction"], r["strength"]): r for r in ours}
    todo = [pair for pair in screen if pair not in done]
    if todo or not screen:
        return todo
    screened = [done[pair] for pair in screen]
    within = [r for r in screened if r["kl"] <= max_kl]
    best = min(within, key=lambda r: r["refusal"]) if within else min(screened, key=lambda r: r["kl"])
    follow = [(best["fraction"], s) for s in config.second_strengths][: max(0, n - len(screen))]
    return [pair for pair in follow if pair not in done]


def second_directions(
    chat: ChatModel,
    base: KernelEdit,
    harmful_train: list[str],
    refusal_ids: list[int],
    batch_size: int,
    fractions: list[float],
    source: str = "disclaimer",
    harmless_train: list[str] | None = None,
) -> tuple[dict[float, torch.Tensor], dict]:
    """{depth fraction: difference of means (float32 [d_model])} of ``source``'s pair under the edit ``base``
    (module docstring), and counts for the record; no directions when too few train prompts are still refused."""
    with edited(chat, base):
        margins = refusal_margin(LastPosition(chat, harmful_train, batch_size).logits(), refusal_ids)
        refusing = [p for p, m in zip(harmful_train, margins.tolist()) if m > 0]
        counts: dict = {"source": source, "refusing": len(refusing), "train": len(harmful_train)}
        if source == "disclaimer":
            pair = (load_self_questions(), (harmless_train or [])[:MAX_HARMLESS])
            names = ("second: self questions", "second: harmless")
            counts["questions"], counts["harmless"] = len(pair[0]), len(pair[1])
        elif source == "refused":
            pair = (refusing, [p for p, m in zip(harmful_train, margins.tolist()) if m < COMPLY_BELOW][:MAX_COMPLYING])
            names = ("second: refusing", "second: complying")
            counts["complying"] = len(pair[1])
        else:
            raise RefusalError(f"unknown second-direction source {source!r}; choose one of {', '.join(SECOND_SOURCES)}")
        if len(refusing) < MIN_REFUSING or min(len(pair[0]), len(pair[1])) < MIN_REFUSING:
            sizes = f"{len(pair[0])} and {len(pair[1])} prompts to compare"
            log(f"second direction: {len(refusing)} of {len(harmful_train)} train prompts still refused under the base, {sizes}; none made")
            return {}, counts
        means = [mean_activations(chat, prompts, batch_size, name) for prompts, name in zip(pair, names)]
    diff = means[0][:, -1] - means[1][:, -1]  # [n_layers + 1, d_model], the last position
    log(f"second direction ({source}): {len(refusing)} of {len(harmful_train)} train prompts still refused under the base")
    return {f: diff[round(f * chat.n_layers)].float() for f in fractions}, counts


def second_params(base: EditParams, direction: torch.Tensor, fraction: float, strength: float, counts: dict) -> EditParams:
    """``base`` with ``direction`` as its second direction at ``strength`` (the vector is stored: exports need no model run)."""
    second = {"vector": [round(x, 6) for x in direction.tolist()], "strength": strength, "fraction": fraction, **counts}
    return dataclasses.replace(base, second=second)


def cleaned(directions: dict[float, torch.Tensor], base: EditParams, protection: Protection | None, n_layers: int) -> dict[float, torch.Tensor]:
    """The directions cleaned like the base's own (its ``clean``, at each direction's layer); as they are where the
    base is not cleaned. Cleaned, r2 costs less first-token KL at the same strength (docs/search.md)."""
    if protection is None or base.clean is None:
        return directions
    return {f: protection.clean(v, f * n_layers, base.position, base.clean) for f, v in directions.items()}


def second_base(records: list[dict], config: SearchSettings) -> dict | None:
    """The front point (sampled and refinement trials) with the lowest refusal score among those with
    first-token KL at most ``second_base_kl_fraction * max_kl`` still scoring above the floor, or None."""
    front = pareto_front([r for r in records if r["role"] != "second"])
    low = [p for p in front if p["kl"] <= config.second_base_kl_fraction * config.max_kl and p["refusal"] > config.floor]
    return min(low, key=lambda p: p["refusal"]) if low else None


def second_trials(
    chat: ChatModel,
    candidates: Candidates,
    protection: Protection | None,
    records: list[dict],
    config: SearchSettings,
    harmful_train: list[str],
    refusal_ids: list[int],
    batch_size: int,
    cache: dict | None = None,
    harmless_train: list[str] | None = None,
) -> list[tuple[dict, EditParams]]:
    """The second-direction trials to run next (``plan``), as (user attributes, params); none once all ran or
    where no base or no still-refused train prompts exist. ``cache`` keeps the directions between calls.
    A resumed study finds the same base and directions."""
    base = second_base(records, config)
    if base is None:
        return []
    todo = plan(records, config, base["trial"])
    if not todo:
        return []
    params = EditParams.from_dict(base["params"])
    cache = {} if cache is None else cache
    if cache.get("base") != base["trial"]:
        edit = KernelEdit.from_candidates(candidates, params, protection)
        cache["base"] = base["trial"]
        cache["directions"], cache["counts"] = second_directions(
            chat, edit, harmful_train, refusal_ids, batch_size, list(config.second_fractions), config.second_source, harmless_train
        )
    directions = cleaned(cache["directions"], params, protection, chat.n_layers)
    return [
        ({"base": base["trial"], "fraction": f, "strength": s}, second_params(params, directions[f], f, s, cache["counts"]))
        for f, s in todo
        if f in directions
    ]
