"""What an edit does and what it costs, measured against the original model.

A *condition* is data: a name (the result key), a label (what reports show), a model, the context
it runs in (``ablate`` or ``add`` hooks, an in-place edit applied and reverted, or nothing for the
original or an exported checkpoint), the prompt kinds it is judged on, whether its costs are
measured, and optionally its generation ``Engine``. A search trial or a suffix attack is one more
condition; nothing downstream knows condition names. For each condition this module measures

- refusal on the harmful and harmless test prompts: greedy completions judged by substring match
  (generation stops as soon as a refusal phrase appears, which cannot change the verdict), and the
  refusal log-odds of the first response token (no generation);
- optionally, how many completions an LLM safety judge calls unsafe (full completions);
- damage on harmless prompts: KL(original || edited) of the next-token distribution at the last
  prompt position, and averaged over the first ``kl_tokens`` tokens of the original model's greedy
  completion, teacher-forced (one forward pass per batch);
- cross-entropy of a plain-text corpus, and a capability proxy: the teacher-forced loss of reference
  solutions to built-in code and math problems.

Every rate carries its count and a 95% Wilson interval. ``evaluate`` returns results keyed
condition -> kind, which ``refusal.report`` renders.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, cast

import torch

from ..common.progress import track
from ..engines.factory import make_engine
from ..engines.hf import Engine
from ..errors import RefusalError, check_finite
from ..model.chat import ChatModel
from ..residual.activations import batches, collect_activations
from ..residual.directions import Candidates, Direction, unit_vector
from ..residual.scoring import TeacherForced, kl_divergence, refusal_score
from ..settings import EvaluationSettings, tree_field
from .judges import REFUSAL_PHRASES, Judged, SafetyJudge, judge_refusals
from .stats import wilson_interval


@dataclass
class Condition:
    """One way of running the model: ``chat`` inside ``context()``, judged on ``kinds``, shown as ``label``."""

    name: str  # result key: "original", "ablated", "added", "edited", "trial_30", "suffix", ...
    label: str  # shown in reports, e.g. "ablated (hooks)"
    chat: ChatModel  # the model its forward passes run on
    context: Callable[[], AbstractContextManager] = nullcontext  # hooks, or an in-place edit applied and reverted
    kinds: tuple[str, ...] = ("harmful", "harmless")  # which prompt sets to judge
    costs: bool = True  # measure KL and cross-entropy against the original (False for activation addition)
    engine: Engine | None = None  # generation backend (closed once judged); None -> make_engine: HFEngine(chat, settings.batch_size)


@dataclass
class EvalSettings:
    """What ``evaluate`` needs: the tree's evaluation settings (defaults and help in ``settings.EvaluationSettings``)
    plus what is resolved from them for a model: the refusal phrases read and the refusal tokens' ids."""

    max_new_tokens: int = tree_field("evaluation.max_new_tokens")
    batch_size: int = tree_field("evaluation.batch_size")
    kl_tokens: int = tree_field("evaluation.kl_tokens")
    early_stop: bool = tree_field("evaluation.early_stop")
    ce_tokens: int = tree_field("evaluation.ce_tokens")  # corpus tokens scored per condition (0: skip cross-entropy)
    ce_max_length: int = tree_field("evaluation.ce_max_length")
    capability_items: int = tree_field("evaluation.capability_items")  # built-in code/math problems (0: skip the proxy)
    samples_per_kind: int = tree_field("evaluation.samples_per_kind")
    phrases: tuple[str, ...] = REFUSAL_PHRASES  # the substring judge's phrases (the tree names a file of them)
    refusal_ids: list[int] = field(default_factory=list)  # token ids of the tree's refusal_tokens for one tokenizer (none: no logit scores)

    @classmethod
    def from_settings(cls, evaluation: EvaluationSettings, refusal_ids: list[int], phrases: Sequence[str] = REFUSAL_PHRASES) -> EvalSettings:
        """The tree's evaluation group with the phrases and refusal token ids resolved for a model."""
        taken = {f.name: getattr(evaluation, f.metadata["tree"].partition(".")[2]) for f in fields(cls) if "tree" in f.metadata}
        return cls(**taken, phrases=tuple(phrases), refusal_ids=list(refusal_ids))


def rate(refused: int, total: int) -> dict:
    """A rate with its count and 95% Wilson interval."""
    low, high = wilson_interval(refused, total)
    return {"refused": refused, "total": total, "rate": refused / total if total else 0.0, "low": low, "high": high}


# ---- costs --------------------------------------------------------------------------------------
def kl_costs(original: Condition, edited: Condition, instructions: list[str], completions: list[list[int]], batch_size: int = 16) -> dict:
    """KL(original || edited) on harmless prompts: first response token, and the mean over the
    original model's greedy completion tokens (teacher-forced; tokens after EOS are not counted)."""
    first, multi = [], []
    prompts = [original.chat.encode(x) for x in instructions]
    forced = TeacherForced(original.chat, prompts, completions, max(1, max(len(c) for c in completions)), batch_size)
    for k in track(range(len(forced)), f"KL ({edited.name})"):
        with original.context():
            _, reference, mask = forced.batch(k, original.chat)
        with edited.context():
            _, logits, _ = forced.batch(k, edited.chat)
        kl = kl_divergence(reference, logits)
        check_finite(kl, f"KL divergence ({edited.name})")
        first.extend(kl[:, 0].tolist())
        multi.extend(((kl * mask).sum(1) / mask.sum(1)).tolist())
    mean = lambda xs: sum(xs) / len(xs)
    tokens = max(len(c) for c in completions)
    return {"first_token": {"mean": mean(first), "n": len(first)}, "multi_token": {"mean": mean(multi), "n": len(multi), "tokens": tokens}}


def corpus_chunks(chat: ChatModel, texts: list[str], max_tokens: int, max_length: int = 256) -> list[list[int]]:
    """Token chunks of at most ``max_length`` (and the model's context) from ``texts``, ``max_tokens`` in all."""
    limit = chat.max_positions
    max_length = min(max_length, limit) if limit else max_length
    chunks, used, tokenizer = [], 0, cast(Any, chat.tokenizer)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for i in range(0, len(ids), max_length):
            piece = ids[i : i + max_length][: max_tokens - used]
            if len(piece) >= 2:
                chunks.append(piece)
                used += len(piece)
            if used >= max_tokens:
                return chunks
    return chunks


def cross_entropy(condition: Condition, chunks: list[list[int]], batch_size: int = 4) -> dict:
    """Mean next-token cross-entropy (nats per predicted token) of the corpus chunks."""
    if not chunks:
        raise RefusalError("the cross-entropy corpus has no text; give a corpus file with some sentences in it")
    total, count = 0.0, 0
    for group in track(batches(chunks, batch_size), f"cross-entropy ({condition.name})"):
        batch = condition.chat.pad(group)
        with condition.context():
            logits = condition.chat.logits(batch, last_only=False).cpu()
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        valid = mask[:, 1:] & mask[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid], reduction="none")  # float32 per token
        total += float(nll.double().sum())
        count += int(valid.sum())
    loss = total / count
    if loss != loss or loss == float("inf"):
        raise RefusalError(f"cross-entropy of {condition.name} is not finite; the edited model is broken (check the direction for NaN)")
    return {"loss": loss, "tokens": count}


def capability_loss(condition: Condition, items: Sequence[Any], batch_size: int = 8) -> dict:
    """Mean next-token cross-entropy (nats/token) of each reference solution given its chat-formatted prompt,
    overall and per kind: a proxy for the skills (code, math) an edit could damage. ``items`` have ``kind``,
    ``prompt`` and ``solution`` (``data.prompt_sets.load_capability``); only solution tokens count, padding changes nothing."""
    if not items:
        raise RefusalError("the capability proxy has no problems; raise --capability-items, or set it to 0 to skip the proxy")
    chat, tokenizer = condition.chat, cast(Any, condition.chat.tokenizer)
    solutions = [tokenizer(x.solution, add_special_tokens=False)["input_ids"] for x in items]
    n, sums = max(map(len, solutions)), {x.kind: [0.0, 0] for x in items}
    with condition.context():
        forced = TeacherForced(chat, [chat.encode(x.prompt) for x in items], solutions, n, batch_size)
        for group, logits, mask in track(forced, f"capability ({condition.name})", total=len(forced)):
            targets = torch.tensor([solutions[i] + [0] * (n - len(solutions[i])) for i in group])
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double() * mask  # float32 per token
            for row, i in enumerate(group):
                sums[items[i].kind][0] += float(nll[row].sum())
                sums[items[i].kind][1] += int(mask[row].sum())
    total, count = sum(s for s, _ in sums.values()), sum(c for _, c in sums.values())
    check_finite(torch.tensor(total), f"capability loss ({condition.name})")
    return {"loss": total / count, "tokens": count, "items": len(items), "by_kind": {k: s / c for k, (s, c) in sums.items()}}


def refusal_logodds(condition: Condition, instructions: list[str], refusal_ids: list[int], batch_size: int = 16) -> float:
    """Mean log-odds that the first response token is a refusal token (no generation)."""
    scores = []
    for group in batches(instructions, batch_size):
        with condition.context():
            scores.append(refusal_score(condition.chat.logits(condition.chat.batch(group)), refusal_ids))
    return float(torch.cat(scores).mean())


# ---- where the direction lives -----------------------------------------------------------------
def projections(chat: ChatModel, direction: Direction, harmful: list[str], harmless: list[str], batch_size: int = 16) -> dict:
    """Projection of harmful vs harmless activations onto the unit direction, layer by layer, at its position."""
    unit = unit_vector(direction.vector)
    out: dict = {"position": direction.position}
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        acts = collect_activations(chat, prompts, batch_size)[:, :, chat.n_post + direction.position]  # [n, layers+1, d]
        proj = acts.float() @ unit
        out[f"{kind}_mean"] = proj.mean(0).tolist()
        out[f"{kind}_std"] = proj.std(0, unbiased=False).tolist()
    out["layers"] = list(range(len(out["harmful_mean"])))
    return out


def cosine_matrix(candidates: Candidates, position: int) -> dict:
    """Cosine similarity between the candidate directions of every pair of layers at ``position``
    (null where a layer's direction is zero, e.g. the embedding of a fixed template token)."""
    rows = torch.stack([candidates.direction(l, position).double() for l in range(candidates.n_layers + 1)])
    norms = rows.norm(dim=-1)
    zero = norms <= 1e-12 * norms.max().clamp_min(1e-30)
    cos = ((rows / norms.clamp_min(1e-30).unsqueeze(-1)) @ (rows / norms.clamp_min(1e-30).unsqueeze(-1)).T).clamp(-1, 1)
    matrix = [[None if zero[i] or zero[j] else float(cos[i, j]) for j in range(len(rows))] for i in range(len(rows))]
    return {"position": position, "layers": list(range(len(rows))), "matrix": matrix}


# ---- the whole evaluation ----------------------------------------------------------------------
def judged(condition: Condition, kind: str, prompts: list[str], settings: EvalSettings, full: bool = False) -> Judged:
    """``condition``'s completions of ``prompts`` (its engine, inside its context), judged by substring."""
    engine = condition.engine or make_engine(condition.chat, EvaluationSettings(batch_size=settings.batch_size), None, f"{kind} ({condition.name})")
    try:
        with condition.context():
            return judge_refusals(engine, prompts, settings.max_new_tokens, settings.phrases, full=full or not settings.early_stop)
    finally:
        if condition.engine is None:  # made here; the condition's own engine is closed once all its kinds are judged
            engine.close()


def evaluate(
    conditions: list[Condition],
    prompts: dict[str, list[str]],
    settings: EvalSettings,
    corpus: list[str] | None = None,
    safety: SafetyJudge | None = None,
    corpus_name: str = "builtin",
    capability: Sequence[Any] | None = None,
) -> dict:
    """Rates, costs and samples for every condition, keyed condition -> kind; the first condition must be
    the original model (named "original"); KL, cross-entropy and the capability proxy (on ``capability``, the
    built-in code/math problems) are measured for conditions with ``costs``."""
    if not conditions or conditions[0].name != "original":
        raise RefusalError("evaluate needs the original model as its first condition")
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise RefusalError(f"condition names {names} repeat; give each condition its own name")
    for name in names:  # a name is one part of a JSON path in the report; "judge" names the safety judge there
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name == "judge":
            raise RefusalError(f"condition name {name!r} is not allowed; use letters, digits, '_' or '-' (and not 'judge')")
    original = conditions[0]
    result: dict = {
        "conditions": [{"name": c.name, "label": c.label} for c in conditions],
        "rates": {},
        "refusal_score": {},
        "safety": None,
        "kl": {},
        "ce_loss": None,
        "capability": None,
        "completions": {},
    }
    original_ids: list[list[int]] = []
    for condition in conditions:
        try:
            for kind in condition.kinds:
                reference = condition is original and kind == "harmless"  # its full completions are the KL continuations
                out = judged(condition, kind, prompts[kind], settings, full=safety is not None or reference)
                if reference:
                    original_ids = [x[: settings.kl_tokens] for x in out.ids]
                result["rates"].setdefault(condition.name, {})[kind] = rate(*out.count)
                result["completions"].setdefault(condition.name, {})[kind] = out.texts
                if settings.refusal_ids:
                    score = refusal_logodds(condition, prompts[kind], settings.refusal_ids, settings.batch_size)
                    result["refusal_score"].setdefault(condition.name, {})[kind] = score
                if safety is not None:
                    unsafe = safety.unsafe(prompts[kind], out.texts)
                    result["safety"] = result["safety"] or {"judge": safety.name}
                    result["safety"].setdefault(condition.name, {})[kind] = rate(sum(unsafe), len(unsafe))
        finally:
            if condition.engine is not None:  # a vLLM engine frees its GPU memory before the next condition's starts
                condition.engine.close()
    edits = [c for c in conditions[1:] if c.costs]
    if original_ids and edits:
        for condition in edits:
            result["kl"][condition.name] = kl_costs(original, condition, prompts["harmless"], original_ids, settings.batch_size)
    if corpus and settings.ce_tokens > 0:
        chunks = corpus_chunks(original.chat, corpus, settings.ce_tokens, settings.ce_max_length)
        losses = {c.name: cross_entropy(c, chunks) for c in [original, *edits]}
        result["ce_loss"] = {"loss": {k: v["loss"] for k, v in losses.items()}, "tokens": losses[original.name]["tokens"], "corpus": corpus_name}
    if capability and settings.capability_items > 0:
        items = list(capability)[: settings.capability_items]
        scored = {c.name: capability_loss(c, items, min(8, settings.batch_size)) for c in [original, *edits]}
        first = scored[original.name]
        result["capability"] = {
            "loss": {k: v["loss"] for k, v in scored.items()},
            "by_kind": {k: v["by_kind"] for k, v in scored.items()},
            **{k: first[k] for k in ("tokens", "items")},
            "set": "builtin",
        }
    result["samples"] = samples(result["completions"], prompts, settings.samples_per_kind)
    return result


def samples(completions: dict[str, dict[str, list[str]]], prompts: dict[str, list[str]], per_kind: int) -> list[dict]:
    """Original vs edited completions side by side, per kind: the first other condition judged on that kind."""
    out = []
    original = completions.get("original", {})
    for kind in prompts:
        edit = next((name for name, by_kind in completions.items() if name != "original" and kind in by_kind), None)
        if kind not in original or edit is None:
            continue
        for i in range(min(per_kind, len(prompts[kind]))):
            out.append(
                {"kind": kind, "instruction": prompts[kind][i], "original": original[kind][i], "edited": completions[edit][kind][i], "edit": edit}
            )
    return out
