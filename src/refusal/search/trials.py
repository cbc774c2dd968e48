"""Search for the best refusals-vs-damage trade-off without generating text (docs/search.md).

Each trial is an ``EditParams`` (source layer, strength kernels, variant) applied to the loaded
model by ``WeightEditor`` and reverted afterwards. Two objectives, both from one teacher-forced
forward pass per batch, with the original model's outputs cached once:

- refusal: for each harmful validation prompt, the refusal margin (the best refusal token's logit
  minus the best other token's: greedy decoding refuses where it is positive; or the refusal
  log-odds, ``refusal_measure``) at each of the first ``refusal_positions`` response positions,
  teacher-forced on the original model's greedy prefix; the prompt's score is the largest of them,
  floored (``SearchSettings.floor``: a prompt that no longer refuses stops counting); mean over prompts.
- damage: KL(original || edited) on harmless validation prompts at the last prompt position
  (first-token KL, the objective) and averaged over the first ``kl_tokens`` tokens of the original
  model's greedy completion (multi-token KL, recorded).

Optuna (multi-objective TPE, the ``search`` extra) proposes trials; its journal lives in the run
directory so the same command resumes the study. The paper's edit (the selected direction, strength
1 everywhere) is always the first trial, so the front can be compared with it; flat-strength
"anchor" trials from a few source depths follow, then the sampler's own proposals; the last trials
*refine* the front's best low-KL points by scaling their strengths up (``refinements``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from ..common.progress import is_quiet, log
from ..direction.cleaning import CLEAN_RANGE, Protection
from ..edit.edits import Editor, EditParams, Kernel, KernelEdit
from ..engines.hf import Engine
from ..errors import RefusalError, check_finite
from ..model.chat import ChatModel
from ..residual.directions import Candidates
from ..residual.scoring import TeacherForced, kl_divergence, refusal_margin, refusal_score
from ..settings import SearchSettings, variant_parts
from .storage import StudyLock, fail_stale, heartbeat, is_shared, open_storage, quiet_optuna, surplus, wait_for_running

if TYPE_CHECKING:
    import optuna


# ---- objectives --------------------------------------------------------------------------------
class Objectives:
    """The original model's prefixes and logits, cached once; ``measure`` scores the current weights."""

    def __init__(self, chat: ChatModel, engine: Engine, harmful: list[str], harmless: list[str], refusal_ids: list[int], config: SearchSettings):
        self.refusal_ids, self.floor = refusal_ids, config.floor
        self.score = refusal_margin if config.refusal_measure == "margin" else refusal_score
        prefixes = engine.generate_ids(harmful + harmless, max(config.refusal_positions, config.search_kl_tokens))
        enc = [chat.encode(x) for x in harmful + harmless]
        n = len(harmful)
        self.harmful = TeacherForced(chat, enc[:n], prefixes[:n], config.refusal_positions, config.score_batch_size)
        self.harmless = TeacherForced(chat, enc[n:], prefixes[n:], config.search_kl_tokens, config.score_batch_size)
        self.reference = [torch.log_softmax(logits.double(), -1).float() for _, logits, _ in self.harmless]

    def measure(self) -> dict:
        """Refusal score on harmful prompts and KL on harmless ones, for the model as it is now."""
        scores = []
        for _, logits, mask in self.harmful:
            per_prompt = self.score(logits, self.refusal_ids).masked_fill(~mask, -math.inf).max(1).values
            scores.append(per_prompt.clamp_min(self.floor))
        first, multi = [], []
        for (_, logits, mask), reference in zip(self.harmless, self.reference):
            kl = kl_divergence(reference, logits)
            first.extend(kl[:, 0].tolist())
            multi.extend(((kl * mask).sum(1) / mask.sum(1)).tolist())
        values = torch.tensor([torch.cat(scores).mean().item(), sum(first) / len(first), sum(multi) / len(multi)])
        check_finite(values, "search objectives")
        return {"refusal": float(values[0]), "kl": float(values[1]), "kl_multi": float(values[2])}


# ---- the search space --------------------------------------------------------------------------
ANCHOR_CLEAN = 1.0  # log10 α of the anchors' cleaning: the middle of the front on the default model (docs/search.md)


def suggest(trial: optuna.Trial, n_layers: int, config: SearchSettings) -> EditParams:
    """One point of the search space (docs/search.md)."""
    low, high = config.min_layer_fraction * n_layers, config.max_layer_fraction * n_layers
    kernels = {}
    for part in ("attn", "mlp"):
        peak = trial.suggest_float(f"{part}_peak", 0.0, 1.5)
        kernels[part] = Kernel(
            peak=peak,
            centre=trial.suggest_float(f"{part}_centre", 0.0, n_layers - 1),
            width=trial.suggest_float(f"{part}_width", 1.0, float(n_layers)),
            floor=trial.suggest_float(f"{part}_floor_fraction", 0.0, 1.0) * peak,
        )
    positions = config.source_positions
    position = trial.suggest_categorical("position", list(positions)) if len(positions) > 1 else positions[0]
    variant = trial.suggest_categorical("variant", list(config.variants)) if len(config.variants) > 1 else config.variants[0]
    clean = trial.suggest_float("clean", *CLEAN_RANGE) if config.protect_prompts > 0 else None
    layer = trial.suggest_float("layer", low, high)
    return EditParams(layer=layer, position=position, attn=kernels["attn"], mlp=kernels["mlp"], variant=variant, clean=clean)


def paper_params(layer: int, position: int) -> EditParams:
    """The paper's edit in this space: one direction, strength 1 for every writer."""
    return EditParams(layer=float(layer), position=position, attn=Kernel(1.0), mlp=Kernel(1.0), variant="projection")


def anchor_params(n_layers: int, config: SearchSettings) -> list[EditParams]:
    """Flat-strength edits from a few source depths (``projected`` when searched, cleaned with α = 10 when
    cleaning is on): cheap first points that cover the direction axis before the sampler's model takes over."""
    low, high = config.min_layer_fraction * n_layers, config.max_layer_fraction * n_layers
    variant = next((v for v in config.variants if variant_parts(v) == ("projected", "none")), config.variants[0])
    clean = ANCHOR_CLEAN if config.protect_prompts > 0 else None
    layers = sorted({round(f * n_layers, 2) for f in config.anchors if low <= f * n_layers <= high})
    return [EditParams(layer=layer, position=config.source_positions[0], variant=variant, clean=clean) for layer in layers]


def _as_optuna(params: EditParams, n_layers: int) -> dict:
    """Optuna's parameter names for ``params``; a flat kernel is width n_layers with floor = peak."""
    out = {
        "layer": params.layer,
        "position": params.position,
        "variant": params.variant,
        "clean": CLEAN_RANGE[1] if params.clean is None else params.clean,
    }
    for part in ("attn", "mlp"):
        kernel = getattr(params, part)
        flat = kernel.width is None
        out.update(
            {
                f"{part}_peak": kernel.peak,
                f"{part}_centre": 0.0 if flat else kernel.centre,
                f"{part}_width": float(n_layers) if flat else kernel.width,
                f"{part}_floor_fraction": 1.0 if flat else (kernel.floor / kernel.peak if kernel.peak else 0.0),
            }
        )
    return out


SECOND_OVERHEAD_TRIALS = 5  # trial times kept for finding the second direction (scoring and reading the train prompts)


def scaled(params: EditParams, factor: float) -> EditParams:
    """``params`` with both strength kernels (peak and floor) multiplied by ``factor``: the same edit, stronger."""

    def stronger(kernel: Kernel) -> Kernel:
        return dataclasses.replace(kernel, peak=kernel.peak * factor, floor=kernel.floor * factor)

    return dataclasses.replace(params, attn=stronger(params.attn), mlp=stronger(params.mlp))


def refinements(records: list[dict], config: SearchSettings) -> list[tuple[int, float, EditParams]]:
    """The refinement trials still to run, as (base trial, factor, params).

    The bases are the ``config.refine`` points of the sampled trials' front with the lowest refusal
    scores among those with first-token KL at most ``max_kl / 2`` that still score above the floor;
    each is scaled by each of ``config.refine_scales``.
    The sampler rarely lands on the steep part of the front just above them, where a slightly
    stronger copy of a low-KL point removes its last refusals for less KL than the sampler's points
    there cost (docs/search.md, "Refinement").
    """
    done = {(r["base"], r["scale"]) for r in records if r["role"] == "refine"}
    sampled = [r for r in records if r["role"] not in ("refine", "second")]  # the bases depend on these only: a rerun finds the same ones
    low = [p for p in pareto_front(sampled) if p["kl"] <= config.max_kl / 2 and p["refusal"] > config.floor]
    bases = sorted(low, key=lambda p: p["refusal"])[: config.refine]
    return [
        (b["trial"], factor, scaled(EditParams.from_dict(b["params"]), factor))
        for b in bases
        for factor in config.refine_scales
        if (b["trial"], factor) not in done
    ]


def pareto_front(records: list[dict]) -> list[dict]:
    """Records not dominated on (refusal, kl), sorted by kl."""
    front = [
        r
        for r in records
        if not any(o["refusal"] <= r["refusal"] and o["kl"] <= r["kl"] and (o["refusal"] < r["refusal"] or o["kl"] < r["kl"]) for o in records)
    ]
    return sorted(front, key=lambda r: (r["kl"], r["refusal"]))


WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process ran a trial (a shared study has several)
SAMPLED_ROLES = ("paper", "anchor", "sampled")  # the trials --trials counts (not the refinement and second-direction ones)


def reserve_seconds(done: list[dict], trials: int) -> float:
    """Seconds the budget keeps for ``trials`` more trials (refinement and second-direction): the median finished
    trial's time, once three give one (a mean would follow a process's slow first trial, which clones writers)."""
    return trials * statistics.median(r["seconds"] for r in done) if len(done) >= 3 else 0.0


@quiet_optuna()
def run_trials(
    chat: ChatModel,
    candidates: Candidates,
    objectives: Objectives,
    config: SearchSettings,
    seed: int,
    storage: str,
    paper: EditParams,
    on_trial: Callable[[int, dict], object] | None = None,
    protection: Protection | None = None,
    second: Callable[[list[dict]], list[tuple[dict, EditParams]]] | None = None,
    study_name: str = "refusal-search",
) -> list[dict]:
    """Run (or resume) the study in ``storage`` (a journal file, or a database URL that several workers share:
    ``search.storage``) until ``config.trials`` trials exist or the budget ends, then the refinement trials
    (``refinements``) and the second-direction trials that ``second(records)`` returns
    (``second_direction.second_trials``); the budget keeps time for both.

    The enqueued trials (the paper's edit, then the anchors) carry their role in a user attribute, so a
    trial left RUNNING by a killed process is failed and enqueued again with its role on resume (with a
    journal; a shared study fails it by heartbeat).
    """
    try:
        import optuna
    except ImportError:
        raise RefusalError("the search needs optuna; install it with: pip install 'refusal[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR if is_quiet() else optuna.logging.WARNING)
    state = optuna.trial.TrialState
    shared = is_shared(storage)
    sampler_seed = (seed * 1_000_003 + os.getpid()) % 2**31 if shared else seed  # workers with one seed would propose the same points
    with StudyLock(storage):  # workers starting together: one creates the tables, the study and its first trials
        study = optuna.create_study(
            study_name=study_name,
            storage=open_storage(storage),
            load_if_exists=True,
            directions=["minimize", "minimize"],
            sampler=optuna.samplers.TPESampler(seed=sampler_seed, multivariate=True, n_startup_trials=10),
        )
        if not study.trials:
            study.enqueue_trial(_as_optuna(paper, candidates.n_layers), user_attrs={"role": "paper"})
            for params in anchor_params(candidates.n_layers, config):
                study.enqueue_trial(_as_optuna(params, candidates.n_layers), user_attrs={"role": "anchor"})
    if shared:
        fail_stale(study)
    else:
        for stale in [t for t in study.trials if t.state == state.RUNNING]:  # left by an interrupted process
            study.tell(stale.number, state=state.FAIL)
            if stale.user_attrs.get("role") in ("paper", "anchor"):
                study.enqueue_trial(stale.params, user_attrs={"role": stale.user_attrs["role"]})
    start = time.perf_counter()
    with Editor(chat) as editor:

        def measure(trial: optuna.Trial, params: EditParams) -> None:
            t0 = time.perf_counter()
            with heartbeat(study, trial) if shared else nullcontext(), editor.applied(KernelEdit.from_candidates(candidates, params, protection)):
                values = objectives.measure()
            trial.set_user_attr("params", params.to_dict())
            trial.set_user_attr("kl_multi", values["kl_multi"])
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
            trial.set_user_attr("worker", WORKER)
            study.tell(trial, [values["refusal"], values["kl"]])
            if on_trial:
                on_trial(trial.number, values)  # Optuna's number: the one search.json, the front and `export --trial` use

        later = config.refine * len(config.refine_scales) + (config.second + SECOND_OVERHEAD_TRIALS if second is not None and config.second else 0)
        while True:
            done = records(study)
            live = (state.COMPLETE, state.RUNNING) if shared else (state.COMPLETE,)  # other workers' running trials count
            started = [t for t in study.get_trials(deepcopy=False, states=live) if t.user_attrs.get("role", "sampled") in SAMPLED_ROLES]
            if len(started) >= config.trials:
                break
            reserve = reserve_seconds(done, later)
            if config.time_budget is not None and time.perf_counter() - start > config.time_budget - reserve:
                log(f"time budget reached after {len(done)} trials; keeping the best points so far")
                break
            trial = study.ask()
            if shared and surplus(study, trial, config.trials, SAMPLED_ROLES):  # another worker took the last one first
                study.tell(trial, state=state.FAIL)
                break
            params = suggest(trial, candidates.n_layers, config)  # records the enqueued values too, which the sampler learns from
            if trial.user_attrs.get("role") == "paper":
                params = paper  # exactly the paper's edit (the kernel above is flat at 1 anyway)
            measure(trial, params)

        def run_enqueued(params: EditParams, attrs: dict) -> None:
            study.enqueue_trial(_as_optuna(params, candidates.n_layers), user_attrs=attrs)
            while (trial := study.ask()).user_attrs != attrs:  # an anchor left waiting when the budget ended first
                study.tell(trial, state=state.FAIL)
            with warnings.catch_warnings():  # a scaled peak may lie above the sampler's range; Optuna keeps the value
                warnings.simplefilter("ignore")
                suggest(trial, candidates.n_layers, config)
            measure(trial, params)

        with StudyLock(storage):  # one worker of a shared study runs them, once the sampled trials are all in
            if shared:
                wait_for_running(study, SAMPLED_ROLES)
            for base, factor, params in refinements(records(study), config):
                run_enqueued(params, {"role": "refine", "base": base, "scale": factor})
            while second is not None and config.second and (todo := second(records(study))):
                for attrs, params in todo:
                    run_enqueued(params, {"role": "second", **attrs})
    return records(study)


def records(study: optuna.Study) -> list[dict]:
    """The study's finished trials as plain records."""
    import optuna

    return [
        {
            "trial": t.number,
            "refusal": t.values[0],
            "kl": t.values[1],
            "kl_multi": t.user_attrs["kl_multi"],
            "seconds": t.user_attrs["seconds"],
            "params": t.user_attrs["params"],
            "role": t.user_attrs.get("role", "sampled"),
            **{k: t.user_attrs[k] for k in ("base", "scale", "fraction", "strength") if k in t.user_attrs},
        }
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE
    ]
