"""``refusal attack``: an adversarial suffix for the run's model, and how often it stops refusal -> RUN/attack.json.

    workspace.start(...)            validate, load the model and the prompts, open or create the run directory
    suffix(ctx)                     optimise one (``attack.gcg.optimize_suffix``, resumable) or read --suffix-file
    held_out(ctx, suffix)           harmful test prompts with no suffix, the suffix, a random suffix of the same
                                    length: refusal log-odds and generation + substring judge (Wilson intervals)
    RUN/attack.json                 the suffix (text, ids, tokens), the loss curve, the settings, the results

The optimisation writes ``attack.state.json`` after every step with the fingerprint of what it depends
on (model, train prompts, the attack's settings but its step count and time budget): re-running the
command resumes it, more ``--steps`` or a longer ``--time-budget`` continue it, anything else starts it
again. ``attack.json`` is fingerprinted by the suffix it evaluates and the evaluation settings.
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attack.gcg import AttackState, optimize_suffix
from ..attack.suffix_scoring import Objective
from ..common.progress import log
from ..common.provenance import digest, timestamp
from ..data.prompt_sets import Prompts
from ..data.suffixes import SuffixedPrompt, random_suffix, read_suffix_file, split_prompt, suffix_from_text
from ..engines.factory import make_engine, make_forward
from ..engines.forward import Forward
from ..errors import RefusalError
from ..measure.evaluation import rate
from ..measure.judges import judge_refusals, refusal_phrases
from ..model.chat import ChatModel
from ..residual.scoring import refusal_score
from ..run.artifacts import ARTIFACTS
from ..run.directory import RunDir
from ..run.files import read_json, write_json
from ..run.given import check_run_model, run_model
from ..run.workspace import Context, start
from ..settings import Settings

CONDITIONS = {"none": "no suffix", "suffix": "adversarial suffix", "random": "random suffix of the same length"}
# What the optimisation's result depends on (its step count and time budget only say how far it goes).
OPTIMISATION_SETTINGS = ("candidates", "top_k", "suffix_length", "attack_prompts", "target", "attack_floor")


@dataclass
class AttackResult:
    path: Path
    attack: dict
    timings: dict

    def summary(self) -> dict:
        return {
            "run": str(self.path),
            "suffix": self.attack["suffix"],
            "steps": self.attack["optimisation"]["steps"] if self.attack["optimisation"] else None,
            "refusal": {k: v["refused"] for k, v in self.attack["refusal"].items()},
            "total": self.attack["n_test"],
            "timings": self.timings,
        }


# ---- the suffix ------------------------------------------------------------------------------------
def objective(ctx: Context) -> Objective:
    s, chat = ctx.settings, ctx.chat
    if s.attack.target is not None:
        return Objective(target_ids=chat.tokenizer(s.attack.target, add_special_tokens=False)["input_ids"])
    return Objective(refusal_ids=chat.refusal_token_ids(s.evaluation.refusal_tokens), floor=s.attack.attack_floor)


def initial_suffix(ctx: Context, length: int) -> list[int]:
    """GCG's customary start, '! ! ! ...', as ``length`` tokens (any single repeated printable token if '!' merges)."""
    for text in (" ".join(["!"] * length), " !" * length, "x " * length, " x" * length):
        ids = ctx.chat.tokenizer(text.strip() if text.startswith("x") else text, add_special_tokens=False)["input_ids"]
        if len(ids) == length:
            return [int(t) for t in ids]
    one = suffix_from_text(ctx.chat, " x")
    return one[:1] * length


def optimisation_fingerprint(ctx: Context, train: list[str]) -> str:
    a = ctx.settings.attack
    return digest(
        {
            "model": ctx.model_id,
            "train": train,
            "settings": {k: getattr(a, k) for k in OPTIMISATION_SETTINGS},
            "refusal_tokens": ctx.settings.evaluation.refusal_tokens,
            "seed": ctx.settings.data.seed,
        }
    )


def optimise(ctx: Context, train: list[str]) -> AttackState:
    """The optimised suffix, resumed from RUN/attack.state.json while it was made from the same inputs."""
    a, run = ctx.settings.attack, ctx.run
    state_path = run.file("attack", 1)
    fingerprint = optimisation_fingerprint(ctx, train)
    state = None
    if state_path.is_file():
        saved = read_json(state_path, f"delete it, or pass --overwrite to start the attack in {run.path} again")
        if saved.get("fingerprint") == fingerprint:
            state = AttackState.from_dict(saved.get("state") or {})
            log(f"attack: resuming after step {state.step} (best loss {state.best_loss:.3f})")
        else:
            log("attack: the model, prompts or attack settings changed; starting the optimisation again")

    def save(state: AttackState) -> None:
        write_json(state_path, {"format_version": ARTIFACTS["attack"].format_version, "fingerprint": fingerprint, "state": state.to_dict()})

    obj = objective(ctx)
    prompts = [split_prompt(ctx.chat, x) for x in train]
    return optimize_suffix(
        ctx.chat,
        prompts,
        obj,
        initial_suffix(ctx, a.length),
        a.steps,
        candidates=a.candidates,
        top_k=a.top_k,
        seed=ctx.settings.data.seed,
        time_budget=a.time_budget,
        state=state,
        on_step=save,
        batch_size=a.candidate_batch,
        early_stop=obj.floor if obj.refusal_ids is not None else None,
    )


# ---- held-out evaluation -------------------------------------------------------------------------------
def held_out(ctx: Context, suffixes: dict[str, list[int]]) -> dict:
    """Refusal log-odds (first response token) and judged generations on the harmful test prompts, per suffix."""
    chat, e = ctx.chat, ctx.settings.evaluation
    phrases = refusal_phrases(e.refusal_phrases)
    refusal_ids = chat.refusal_token_ids(e.refusal_tokens)
    test = ctx.prompts.get("harmful", "test")
    forward = make_forward(chat, ctx.settings)
    out: dict = {"refusal": {}, "refusal_score": {}, "completions": {}}
    with closing(make_engine(chat, ctx.settings, None, "attack: generating")) as engine:
        for name, ids in suffixes.items():
            prompts = [split_prompt(chat, x, ids) for x in test]
            judged = judge_refusals(engine, [p.ids for p in prompts], e.max_new_tokens, phrases, full=not e.early_stop)
            out["refusal"][name] = rate(*judged.count)
            out["refusal_score"][name] = float(first_token_scores(forward, prompts, refusal_ids).mean())
            out["completions"][name] = [{"instruction": x, "completion": t, "refused": r} for x, t, r in zip(test, judged.texts, judged.refused)]
            log(f"attack: {CONDITIONS[name]}: {judged.count[0]}/{len(test)} refused")
    return out


def first_token_scores(forward: Forward, prompts: list[SuffixedPrompt], refusal_ids: list[int]) -> torch.Tensor:
    """[n] refusal log-odds at the last prompt position."""
    return refusal_score(forward.logits_at([p.ids for p in prompts], [-1])[:, 0], refusal_ids)


# ---- the command ---------------------------------------------------------------------------------
def check_attack(chat: ChatModel, prompts: Prompts, s: Settings) -> None:
    """What the attack needs of the model, checked before anything is written: the suffix file and the target tokenize
    back to their text, and the prompts with the suffix (and the target or the generated tokens) fit the context."""
    a = s.attack
    if a.suffix_file is not None:
        length, name = len(read_suffix_file(chat, a.suffix_file, a.suffix_length)[1]), f"the suffix of {a.suffix_file}"
    else:
        length, name = a.length, f"the suffix (--suffix-length {a.length})"
    target = suffix_from_text(chat, a.target, where="--target") if a.target is not None else []
    chat.check_context(prompts.get("harmful", "train")[: a.attack_prompts], len(target), length, name, "--target")
    chat.check_context(prompts.get("harmful", "test"), s.evaluation.max_new_tokens, length, name)


def attack(settings: Settings, out: Path, overwrite: bool = False, inherit: tuple[str, ...] = (), model_options: dict | None = None) -> AttackResult:
    """``refusal attack``: optimise (or read) a suffix, evaluate it on held-out harmful prompts, write RUN/attack.json.
    ``model_options``: the model options given on the command line; without ``model`` among them, an existing run's
    model is kept with the others (``--dtype``...) applied over it."""
    begin = time.perf_counter()
    check = lambda chat, prompts: check_attack(chat, prompts, settings)
    existing = not overwrite and (Path(out) / "run.json").is_file()
    if existing and "model" not in inherit and model_options is not None and "model" not in model_options:
        run_model(settings, RunDir.open(out), model_options, "--out")  # --dtype etc. without --model: the run's model
    elif "model" not in inherit:  # --model given: a run of another model in --out is refused, not switched over
        check_run_model(out, settings, overwrite)
    ctx = start(settings, out, overwrite, inherit=("selection", "search", "analysis", "harden", *inherit), check=check)
    chat, a, run = ctx.chat, ctx.settings.attack, ctx.run
    train = ctx.prompts.get("harmful", "train")[: a.attack_prompts]
    state: AttackState | None = None
    if a.suffix_file is not None:
        text, ids = read_suffix_file(chat, a.suffix_file, a.suffix_length)
        source = f"file {a.suffix_file}"
    else:
        step_start = time.perf_counter()
        state = optimise(ctx, train)
        ctx.timed("attack", step_start)
        ids, source = state.best_suffix, "optimised"
        text = chat.tokenizer.decode(ids)
    baseline = random_suffix(chat, len(ids), ctx.settings.data.seed)
    given = {"suffix": ids, "random": baseline, "source": source}
    if ctx.fresh("attack", **given) and _same_optimisation(run.read("attack").get("optimisation"), _optimisation(state, train)):
        return AttackResult(run.path, run.read("attack"), run.info.get("timings", {}))

    def make(*_: object) -> dict:
        result = {
            "format_version": ARTIFACTS["attack"].format_version,
            "created": timestamp(),
            "model": run.info.get("model", {}),
            "suffix": text,
            "suffix_ids": ids,
            "suffix_tokens": chat.tokenizer.convert_ids_to_tokens(ids),
            "source": source,
            "random_suffix": chat.tokenizer.decode(baseline),
            "random_suffix_ids": baseline,
            "conditions": CONDITIONS,
            "n_test": len(ctx.prompts.get("harmful", "test")),
            "optimisation": _optimisation(state, train),
            "settings": ctx.settings.to_dict()["attack"],
            **held_out(ctx, {"none": [], "suffix": ids, "random": baseline}),
        }
        write_json(run.file("attack"), result)
        return result

    result = ctx.get("attack", make=make, remake=True, **given)  # the optimisation's state (its own fingerprint) is kept
    ctx.timed("attack_total", begin)
    return AttackResult(run.path, result, run.info.get("timings", {}))


def _optimisation(state: AttackState | None, train: list[str]) -> dict | None:
    if state is None:
        return None
    return {
        "steps": state.step,
        "loss_curve": [state.initial_loss, *state.losses],  # step 0 is the initial suffix
        "best_loss": state.best_loss,
        "seconds": round(state.elapsed, 1),
        "train_prompts": train,
    }


def _same_optimisation(saved: dict | None, now: dict | None) -> bool:
    """Whether attack.json describes the optimisation as it stands (its seconds aside: a resumed call that runs no step still spends some)."""
    keys = ("steps", "loss_curve", "best_loss", "train_prompts")
    if saved is None or now is None:
        return saved is now
    return all(saved.get(k) == now.get(k) for k in keys)


def fresh_attack(ctx: Context) -> dict:
    """RUN/attack.json for ``refusal analyze``: a one-line error if it is missing or was made from other inputs."""
    run = ctx.run
    if not run.file("attack").is_file():
        raise RefusalError(f"{run.path} has no attack.json; run `refusal attack --out {run.path}` first, or pass --suffix-file FILE")
    data = run.read("attack")
    ids, baseline = data.get("suffix_ids"), data.get("random_suffix_ids")
    if not isinstance(ids, list) or not ids or not isinstance(baseline, list) or not isinstance(data.get("source"), str):
        raise RefusalError(f"{run.file('attack')} has the wrong shape; re-run `refusal attack --out {run.path}`")
    return ctx.require("attack", suffix=ids, random=baseline, source=data["source"])
