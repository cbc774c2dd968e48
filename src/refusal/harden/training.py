"""Refusal-feature adversarial training (ReFAT): a LoRA that learns to refuse with its refusal direction erased.

Each step (``batch_size`` examples of each kind):

    harmful   prompt + the model's own refusal; with probability ``ablate_probability`` the current refusal direction
              is projected out of the residual stream between layers; loss = cross-entropy of the refusal tokens
    harmless  prompt + the model's own completion; loss = KL(original || adapted) over the completion's tokens
    loss      = harmful + kl_weight · harmless

The direction is the adapted model's own difference in means at the run's layer and position, recomputed every
``refresh_every`` steps, so the adapter cannot hide refusal in a direction that stops being "the" direction.
Every ``eval_every`` steps the validation prompts are scored (``Checkpoint``) without generation: the refusal
margin of harmful prompts with the refreshed direction ablated, and the first-token KL on harmless ones. The
adapter kept is the best checkpoint within the KL budget; step 0 (the original) always is.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch

from ..common.progress import log
from ..engines.forward import Forward
from ..errors import RefusalError, check_finite
from ..model.chat import ChatModel
from ..residual.directions import unit_vector
from ..residual.interventions import ablate_between_layers
from ..residual.scoring import kl_divergence, refusal_margin, refusal_score
from .lora import Adapter


@dataclass
class Example:
    prompt: list[int]  # chat-formatted prompt ids
    target: list[int]  # the response ids learnt (a refusal) or kept (a harmless completion)


@dataclass
class TrainingData:
    harmful: list[Example]  # harmful train prompts and the original model's refusals
    harmless: list[Example]  # harmless train prompts and the original model's completions
    val_harmful: list[list[int]]  # validation prompts, scored at every checkpoint
    val_harmless: list[list[int]]


@dataclass
class Plan:
    """The hardening's settings as the loop reads them (``settings.HardenSettings``)."""

    steps: int
    batch_size: int
    learning_rate: float
    ablate_probability: float
    kl_weight: float
    max_kl: float
    refresh_every: int
    eval_every: int
    layer: int  # the run's direction: residual index and position it is read at
    position: int
    seed: int
    time_budget: float | None


@dataclass
class Checkpoint:
    step: int
    refused_ablated: float  # fraction of harmful validation prompts whose refusal margin stays > 0 with the direction ablated
    logodds_ablated: float  # their mean refusal log-odds
    refused: float  # the same without ablation
    harmless_refused: float  # fraction of harmless validation prompts with margin > 0 (over-refusal)
    kl: float  # mean first-token KL(original || adapted) on harmless validation prompts

    def better_than(self, other: Checkpoint | None) -> bool:
        return other is None or (self.refused_ablated, self.logodds_ablated) > (other.refused_ablated, other.logodds_ablated)


def response_logits(chat: ChatModel, examples: list[Example], keep_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced logits of each example's target: [n, T, vocab] (float32), targets [n, T], mask [n, T]."""
    length = max(len(x.target) for x in examples)
    pad = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else 0
    rows = [x.prompt + x.target + [pad] * (length - len(x.target)) for x in examples]  # left-padded below: targets end every row
    targets = torch.tensor([x.target + [pad] * (length - len(x.target)) for x in examples])
    mask = torch.tensor([[1.0] * len(x.target) + [0.0] * (length - len(x.target)) for x in examples])
    with nullcontext() if keep_grad else torch.no_grad():
        out = chat.model(**chat.pad(rows), use_cache=False, logits_to_keep=length + 1)
    return out.logits[:, :-1].float(), targets.to(out.logits.device), mask.to(out.logits.device)


def refusal_loss(chat: ChatModel, examples: list[Example]) -> torch.Tensor:
    logits, targets, mask = response_logits(chat, examples, keep_grad=True)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum() / mask.sum()


def kept_loss(chat: ChatModel, adapter: Adapter, examples: list[Example]) -> torch.Tensor:
    """Mean KL(original || adapted) per completion token: the original's distributions with the adapter disabled."""
    with adapter.disabled():
        reference, _, mask = response_logits(chat, examples, keep_grad=False)
    logits, _, _ = response_logits(chat, examples, keep_grad=True)
    log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(logits, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (kl * mask).sum() / mask.sum()


@torch.no_grad()
def own_direction(forward: Forward, harmful: list[list[int]], harmless: list[list[int]], layer: int, position: int) -> torch.Tensor:
    """Unit difference in means (harmful - harmless) of the residual at ``layer`` and ``position``, float32: the model's own
    refusal direction where the run found the original's."""
    mean = lambda prompts: forward.residuals_at(prompts, [layer], [position])[:, 0, 0].double().mean(0)  # noqa: E731
    direction = (mean(harmful) - mean(harmless)).float()
    check_finite(direction, "a refusal direction")
    return unit_vector(direction)


def first_token(forward: Forward, prompts: list[list[int]], context: AbstractContextManager | None = None) -> torch.Tensor:
    """[n, vocab] logits of each prompt's first response token, inside ``context`` (hooks) where given."""
    with context if context is not None else nullcontext():
        return forward.logits_at(prompts, [-1])[:, 0]


def scores(logits: torch.Tensor, refusal_ids: list[int]) -> dict:
    """The share of prompts whose refusal margin is > 0 (greedy decoding starts a refusal) and their mean log-odds."""
    return {"refused": float((refusal_margin(logits, refusal_ids) > 0).double().mean()), "logodds": float(refusal_score(logits, refusal_ids).mean())}


@torch.no_grad()
def checkpoint(
    chat: ChatModel, adapter: Adapter, forward: Forward, data: TrainingData, unit: torch.Tensor, refusal_ids: list[int], step: int
) -> Checkpoint:
    """The validation scores at ``step`` (first response token only: no generation)."""
    ablated = scores(first_token(forward, data.val_harmful, ablate_between_layers(chat, unit)), refusal_ids)
    harmless = first_token(forward, data.val_harmless)
    kl = kl_divergence(first_token(forward, data.val_harmless, adapter.disabled()), harmless)
    check_finite(kl, "the harmless validation KL")
    return Checkpoint(
        step,
        refused_ablated=ablated["refused"],
        logodds_ablated=ablated["logodds"],
        refused=scores(first_token(forward, data.val_harmful), refusal_ids)["refused"],
        harmless_refused=scores(harmless, refusal_ids)["refused"],
        kl=float(kl.mean()),
    )


def train(
    chat: ChatModel,
    adapter: Adapter,
    data: TrainingData,
    plan: Plan,
    refusal_ids: list[int],
    forward: Forward,
    state: dict,
    save: Callable[[dict], None],
) -> dict:
    """Train ``adapter`` from ``state`` (a resumed one, or {} to start) to ``plan.steps`` or the time budget; ``save``
    is called with the state (the adapter's tensors included) after every checkpoint. Returns the final state:
    ``best`` (the kept checkpoint and its adapter tensors), ``history``, ``step``, ``elapsed``."""
    if not data.harmful or not data.harmless:
        raise RefusalError("hardening needs harmful prompts the model refuses and harmless prompts; the run's train split gives none of one kind")
    params = adapter.parameters()
    optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=0.0)
    if state.get("step", 0) > plan.steps:
        log(f"harden: the saved training is at step {state['step']}, past --harden-steps {plan.steps}; starting again")
        state = {}
    step, elapsed, history = state.get("step", 0), state.get("elapsed", 0.0), list(state.get("history", []))
    if step:
        adapter.load_state(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
    best = state.get("best")

    def snapshot() -> dict:
        at = {"step": step, "elapsed": elapsed + time.perf_counter() - begin, "history": history, "best": best}
        return {**at, "adapter": adapter.state(), "optimizer": optimizer.state_dict()}

    begin = time.perf_counter()
    unit = own_direction(forward, [x.prompt for x in data.harmful], [x.prompt for x in data.harmless], plan.layer, plan.position)
    if not history:
        first = checkpoint(chat, adapter, forward, data, unit, refusal_ids, 0)
        history.append(asdict(first))
        best = {"checkpoint": asdict(first), "adapter": adapter.state()}
        log(f"harden: step 0  refused with the direction ablated {first.refused_ablated:.2f}  (validation)")
    saved = step
    chat.model.train(False)  # no dropout: the adapter is trained deterministically
    while step < plan.steps:
        if plan.time_budget is not None and elapsed + time.perf_counter() - begin > plan.time_budget:
            log(f"harden: time budget reached after {step} steps")
            break
        rng = random.Random(plan.seed * 1_000_003 + step)  # a step's batches depend on the step alone: resumes repeat them
        if step % plan.refresh_every == 0 and step:
            unit = own_direction(forward, [x.prompt for x in data.harmful], [x.prompt for x in data.harmless], plan.layer, plan.position)
        harmful = [data.harmful[rng.randrange(len(data.harmful))] for _ in range(plan.batch_size)]
        harmless = [data.harmless[rng.randrange(len(data.harmless))] for _ in range(plan.batch_size)]
        with ablate_between_layers(chat, unit) if rng.random() < plan.ablate_probability else nullcontext():
            loss_refuse = refusal_loss(chat, harmful)
        loss_keep = kept_loss(chat, adapter, harmless)
        loss = loss_refuse + plan.kl_weight * loss_keep
        check_finite(loss.detach(), f"the hardening loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % plan.eval_every == 0 or step == plan.steps:
            unit = own_direction(forward, [x.prompt for x in data.harmful], [x.prompt for x in data.harmless], plan.layer, plan.position)
            point = checkpoint(chat, adapter, forward, data, unit, refusal_ids, step)
            history.append(asdict(point))
            kept = point.kl <= plan.max_kl and point.better_than(Checkpoint(**best["checkpoint"]) if best else None)
            if kept:
                best = {"checkpoint": asdict(point), "adapter": adapter.state()}
            log(
                f"harden: step {step}/{plan.steps}  loss {loss_refuse.item():.3f} + {loss_keep.item():.4f}  refused ablated "
                f"{point.refused_ablated:.2f}  harmless KL {point.kl:.4f}{'  (kept)' if kept else ''}"
            )
            save(snapshot())
            saved = step
    final = snapshot()
    if step > saved:  # steps after the last checkpoint (a time budget reached) are kept too
        save(final)
    return final
