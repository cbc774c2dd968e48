"""GCG: optimise one adversarial suffix that stops a chat model refusing many prompts (Zou et al., 2023).

Per step: the gradient of the loss w.r.t. the suffix as one-hot rows over the vocabulary
(``suffix_gradient``) names, per position, the tokens most likely to lower the loss; candidates
swap one position for one of them (``sample_candidates``), those that do not survive being written
out as text are dropped (``roundtrip_ok``), and the rest are scored exactly (``CandidateScorer``,
which runs each prompt's head + instruction once and reuses its key/value cache). The best candidate
is kept even if worse than the current suffix, as in GCG. The loss (``suffix_scoring.Objective``) is the
refusal log-odds of the first response token or the cross-entropy of a target such as "Sure, here is".
``AttackState`` is all a resumed run needs; sampling is seeded by seed and step, so resuming
continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from ..common.progress import log
from ..data.suffixes import SuffixedPrompt, allowed_tokens
from ..errors import RefusalError, UnsupportedModelError
from ..model.chat import ChatModel
from .suffix_scoring import CandidateScorer, Objective


# ---- gradient -------------------------------------------------------------------------------------
def _suffix_of(prompts: list[SuffixedPrompt]) -> list[int]:
    """The suffix all prompts share (the one the gradient is taken at)."""
    if not prompts:
        raise RefusalError("the attack needs at least one prompt")
    suffix = list(prompts[0].suffix)
    if not suffix:
        raise RefusalError("the suffix is empty; the attack needs a suffix of at least one token (e.g. --suffix-length 20)")
    if any(list(p.suffix) != suffix for p in prompts):
        raise RefusalError("the prompts carry different suffixes; the attack optimises one suffix shared by all prompts")
    return suffix


def relaxed_loss(chat: ChatModel, prompts: list[SuffixedPrompt], objective: Objective, one_hot: torch.Tensor) -> torch.Tensor:
    """Mean loss with the suffix tokens given as (relaxed) one-hot rows ``one_hot`` [L, vocab] (differentiable)."""
    length = len(_suffix_of(prompts))
    embed = chat.model.get_input_embeddings()
    weight = embed.weight  # [vocab, d]
    rows = [p.ids + objective.continuation() for p in prompts]
    batch = chat.pad(rows)
    plain = embed(batch["input_ids"])  # [B, S, d], scaled as the model scales its embeddings
    suffix_ids = torch.tensor(prompts[0].suffix, device=chat.device)
    unscaled = weight[suffix_ids].detach().double()  # [L, d]
    with torch.no_grad():  # the factor the embedding module applies (Gemma: sqrt(d)), read off the suffix's own rows
        looked_up = embed(suffix_ids).double()  # [L, d]
        scale = float((looked_up * unscaled).sum() / (unscaled * unscaled).sum().clamp_min(1e-30))
        if not torch.allclose(looked_up, unscaled * scale, rtol=1e-2, atol=1e-6):
            raise UnsupportedModelError(f"{type(embed).__name__} is not a scaled lookup of its weight, so the attack cannot take its gradient")
    suffix = (one_hot.to(weight.dtype) @ weight) * scale  # [L, d]
    width = batch["input_ids"].shape[1]
    embeds = []
    for i, p in enumerate(prompts):
        start = width - len(rows[i]) + len(p.prefix)  # left padding, then head + instruction
        embeds.append(torch.cat([plain[i, :start], suffix, plain[i, start + length :]]))
    inputs = torch.stack(embeds)  # [B, S, d]
    n = objective.n_predicted
    out = chat.model(
        inputs_embeds=inputs, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=n
    )
    return objective.loss(out.logits[:, -n:]).mean()


def suffix_gradient(chat: ChatModel, prompts: list[SuffixedPrompt], objective: Objective) -> torch.Tensor:
    """[suffix_len, vocab] float32 gradient of the mean loss w.r.t. the one-hot suffix tokens (all prompts share one suffix).

    ``vocab`` is the number of embedding rows. Only the one-hot tensor is differentiated: the
    model's parameters accumulate no gradients.
    """
    suffix = _suffix_of(prompts)
    vocab = chat.model.get_input_embeddings().weight.shape[0]
    one_hot = F.one_hot(torch.tensor(suffix, device=chat.device), vocab).to(chat.dtype).requires_grad_(True)  # [L, vocab]
    with torch.enable_grad():
        loss = relaxed_loss(chat, prompts, objective, one_hot)
        (grad,) = torch.autograd.grad(loss, [one_hot])
    return grad.float()


# ---- candidates -----------------------------------------------------------------------------------
def sample_candidates(
    grad: torch.Tensor, current: torch.Tensor, allowed: torch.Tensor, n: int, top_k: int, generator: torch.Generator
) -> torch.Tensor:
    """[n, L] candidates: each is ``current`` ([L] long) with one position (uniform) replaced by a token drawn
    uniformly from the ``top_k`` tokens of -grad at that position among ``allowed`` ([vocab] bool mask).

    Deterministic given the generator (a CPU generator; the result is on CPU).
    """
    grad, current, allowed = grad.detach().float().cpu(), current.cpu().long(), allowed.cpu()
    k = min(top_k, int(allowed.sum()))
    if k < 1:
        raise RefusalError("no token is allowed in the suffix; check the tokenizer's vocabulary")
    promise = (-grad).masked_fill(~allowed, -math.inf)  # [L, vocab]
    top = promise.topk(k, dim=-1).indices  # [L, k]
    length = current.shape[0]
    positions = torch.randint(0, length, (n,), generator=generator)  # [n]
    picks = torch.randint(0, k, (n,), generator=generator)  # [n]
    out = current.repeat(n, 1)  # [n, L]
    out[torch.arange(n), positions] = top[positions, picks]
    return out


def roundtrip_ok(chat: ChatModel, candidates: torch.Tensor) -> torch.Tensor:
    """[C] bool: the candidate's decoded text re-encodes (add_special_tokens=False) to exactly its ids (so a suffix can be written out as text)."""
    rows = candidates.tolist()
    texts = chat.tokenizer.batch_decode(rows)
    encoded = chat.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([list(e) == r for e, r in zip(encoded, rows)], dtype=torch.bool)


# ---- the loop -------------------------------------------------------------------------------------
@dataclass
class AttackState:
    """Everything needed to resume: JSON-serialisable via to_dict/from_dict."""

    step: int  # finished steps
    suffix: list[int]  # the current suffix (ids)
    best_suffix: list[int]
    best_loss: float
    losses: list[float]  # loss of the kept suffix after each step
    elapsed: float  # seconds spent so far (over all resumed sessions)
    initial_loss: float  # the loss of the initial suffix (the curve's step 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AttackState:
        """The state ``to_dict`` saved; RefusalError (one line) if ``data`` is not one."""
        ids = lambda x: isinstance(x, list) and len(x) > 0 and all(type(t) is int and t >= 0 for t in x)
        number = lambda x: type(x) in (int, float)
        expected = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or sorted(data) != sorted(expected):
            raise RefusalError(f"the saved attack state does not have exactly the fields {expected}; delete it to start the attack afresh")
        step, losses = data["step"], data["losses"]
        ok = (
            type(step) is int
            and ids(data["suffix"])
            and ids(data["best_suffix"])
            and all(number(data[k]) for k in ("best_loss", "elapsed", "initial_loss"))
        )
        if not (ok and isinstance(losses, list) and len(losses) == step and all(map(number, losses))):
            raise RefusalError("the saved attack state has a field of the wrong type, or not one loss per step; delete it to start the attack afresh")
        return cls(
            step,
            list(data["suffix"]),
            list(data["best_suffix"]),
            float(data["best_loss"]),
            list(map(float, losses)),
            float(data["elapsed"]),
            float(data["initial_loss"]),
        )


def optimize_suffix(
    chat: ChatModel,
    prompts: list[SuffixedPrompt],
    objective: Objective,
    init: list[int],
    steps: int,
    candidates: int = 128,
    top_k: int = 256,
    seed: int = 0,
    time_budget: float | None = None,
    state: AttackState | None = None,
    on_step: Callable[[AttackState], None] | None = None,
    batch_size: int = 64,
    early_stop: float | None = None,
) -> AttackState:
    """GCG on one suffix shared by ``prompts`` (their own ``.suffix`` is ignored), from ``init`` or a resumed ``state``.

    Per step: the gradient w.r.t. the one-hot suffix, ``candidates`` single-token substitutions from
    the ``top_k`` most promising allowed tokens per position, those that do not round-trip through
    text dropped, all scored exactly with the prefix cache, the best kept (even if worse than the
    current suffix, as GCG does; ``best_*`` tracks the best seen). Runs until ``steps`` steps are done
    (a resumed state counts its earlier ones), ``time_budget`` seconds (with ``state.elapsed``) have
    passed, or the kept loss is at or below ``early_stop``. ``on_step`` sees the state after each step.
    """
    if not init:
        raise RefusalError("the initial suffix is empty; the attack needs a suffix of at least one token (e.g. --suffix-length 20)")
    if candidates < 1 or top_k < 1:
        raise RefusalError(f"the attack needs candidates >= 1 and top_k >= 1 (got {candidates} and {top_k})")
    if state is not None and len(state.suffix) != len(init):
        raise RefusalError(
            f"the saved attack state's suffix has {len(state.suffix)} tokens, not {len(init)}; resume with the same suffix length or start afresh"
        )
    began = time.perf_counter()
    vocab = chat.model.get_input_embeddings().weight.shape[0]
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[allowed_tokens(chat)] = True
    scorer = CandidateScorer(chat, prompts, objective, batch_size=batch_size)
    if state is None:
        start_loss = float(scorer.scores(torch.tensor([init]))[0])
        state = AttackState(step=0, suffix=list(init), best_suffix=list(init), best_loss=start_loss, losses=[], elapsed=0.0, initial_loss=start_loss)
        log(f"attack: {len(prompts)} prompts, suffix of {len(init)} tokens, start loss {start_loss:.4f}")
    else:
        state = AttackState.from_dict(state.to_dict())  # checked, and a copy: the caller's object is left alone
    spent = state.elapsed
    while state.step < steps:
        loss = state.losses[-1] if state.losses else state.best_loss  # a fresh start: best_loss is the initial suffix's
        if early_stop is not None and loss <= early_stop:
            log(f"attack: loss {loss:.4f} is at or below {early_stop}; stopping after {state.step} steps")
            break
        if time_budget is not None and spent + time.perf_counter() - began >= time_budget:
            log(f"attack: time budget of {time_budget:.0f}s spent; stopping after {state.step} steps")
            break
        t0 = time.perf_counter()
        current = torch.tensor(state.suffix)  # [L]
        grad = suffix_gradient(chat, [p.with_suffix(state.suffix) for p in prompts], objective)  # [L, vocab]
        t1 = time.perf_counter()
        generator = torch.Generator().manual_seed((seed * 1_000_003 + state.step) % 2**63)
        pool = sample_candidates(grad, current, allowed, candidates, top_k, generator)  # [n, L]
        writable = [tuple(row) for row in pool[roundtrip_ok(chat, pool)].tolist()]
        pool = torch.tensor(list(dict.fromkeys(writable)) or [state.suffix])  # [n', L] distinct (or the suffix kept, if none is writable)
        losses = scorer.scores(pool)  # [n']
        best = int(losses.argmin())
        state.suffix, loss = pool[best].tolist(), float(losses[best])
        state.step += 1
        state.losses.append(loss)
        if loss < state.best_loss:
            state.best_suffix, state.best_loss = list(state.suffix), loss
        state.elapsed = spent + time.perf_counter() - began
        t2 = time.perf_counter()
        timing = f"{len(pool)} candidates; {t1 - t0:.1f}s gradient, {t2 - t1:.1f}s scoring"
        log(f"attack step {state.step}/{steps}  loss {loss:.4f}  best {state.best_loss:.4f}  ({timing})")
        if on_step is not None:
            on_step(state)
    state.elapsed = spent + time.perf_counter() - began
    return state
