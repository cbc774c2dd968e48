"""Scores computed from logits, without generation: refusal log-odds and KL divergence."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..common.progress import log
from ..model.chat import ChatModel
from .activations import batches
from .hooks import hooked, retuple, untuple

if TYPE_CHECKING:
    from transformers import Cache


def _refusal_mask(logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """[vocab] bool: True at the refusal tokens."""
    mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    mask[refusal_ids] = True
    return mask


def refusal_score(logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """Log-odds that the next token is one of ``refusal_ids``: log p - log(1 - p), per row, float64.

    Computed with log-sum-exp over the two token groups, so it stays finite when p is near 0 or 1.
    """
    logits = logits.double()
    mask = _refusal_mask(logits, refusal_ids)
    log_refuse = torch.logsumexp(logits[..., mask], dim=-1)
    log_other = torch.logsumexp(logits[..., ~mask], dim=-1)
    return (log_refuse - log_other).cpu()


def refusal_margin(logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """The best refusal token's logit minus the best other token's, per row, float64.

    Greedy decoding starts a refusal exactly where this is positive, which the log-odds do not tell:
    a refusal token at p = 0.3 can still be the most likely single token (docs/search.md).
    """
    logits = logits.double()
    mask = _refusal_mask(logits, refusal_ids)
    return (logits[..., mask].max(-1).values - logits[..., ~mask].max(-1).values).cpu()


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row between the next-token distributions of two logit tensors, float64."""
    log_p = torch.log_softmax(logits_p.double(), dim=-1)
    log_q = torch.log_softmax(logits_q.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).cpu()


def prepare_batches(chat: ChatModel, instructions: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Tokenize once, reuse for every candidate."""
    return [chat.batch(b) for b in batches(instructions, batch_size)]


def last_logits(chat: ChatModel, prepared: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Float32 next-token logits at the last prompt position for every prepared batch, on CPU."""
    return torch.cat([chat.logits(b).cpu() for b in prepared])


class TeacherForced:
    """Prompts followed by fixed continuations, scored at the positions that predict the first ``n``
    continuation tokens: one forward pass per batch, no generation.

    Prediction j of a row is the logit vector after prompt + continuation[:j] (j = 0 is the last
    prompt token); it is valid while continuation[j] exists (prediction 0 always is). Only the last
    ``n`` positions of each batch reach the unembedding (``logits_to_keep``). The chat template's
    common prefix (system prompt, role header) is run once per pass over the batches and its key/value cache shared
    by every batch; this is checked against full-sequence logits once, on the model as it is when
    the object is built, and switched off if it does not match (e.g. a cache the family cannot
    repeat), so the numbers never depend on it.
    """

    def __init__(
        self, chat: ChatModel, prompts: list[list[int]], continuations: list[list[int]], n: int, batch_size: int = 16, share_prefix: bool = True
    ):
        self.chat, self.n = chat, n
        rows = [p + c[: n - 1] for p, c in zip(prompts, continuations)]
        self.valid = [max(1, min(n, len(c))) for c in continuations]
        self.starts = [len(p) - 1 for p in prompts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch
        self.batches = [order[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        self.rows = rows
        self.prefix = _common_prefix(rows) if share_prefix else 0
        if self.prefix and not self._prefix_matches():
            log("scoring: sharing the prompt prefix changes the logits for this model; running full sequences")
            self.prefix = 0

    def _prefix_matches(self) -> bool:
        group = self.batches[0]
        try:
            shared = self._logits_for(self.chat, group, self._prefix_cache(self.chat))
        except Exception:  # a family whose cache cannot be repeated over the batch
            return False
        full = self._logits_for(self.chat, group, None)
        return bool(kl_divergence(full.flatten(0, 1), shared.flatten(0, 1)).abs().max() <= 1e-5)

    def _prefix_cache(self, chat: ChatModel) -> Cache:
        return prefix_cache(chat, self.rows[0][: self.prefix])

    def _logits_for(self, chat: ChatModel, group: list[int], cache: Cache | None) -> torch.Tensor:
        """[len(group), n, vocab] float32 logits of ``chat`` at the predicting positions of each row."""
        skip = self.prefix if cache is not None else 0
        batch = chat.pad([self.rows[i][skip:] for i in group])
        width = batch["input_ids"].shape[1]
        keep = min(width, max(len(self.rows[i]) - self.starts[i] for i in group))
        kwargs: dict = {"use_cache": False}
        if cache is not None:
            ones = torch.ones(len(group), skip, dtype=batch["attention_mask"].dtype, device=chat.device)
            batch["attention_mask"] = torch.cat([ones, batch["attention_mask"]], dim=1)
            batch["position_ids"] = batch["position_ids"] + skip
            kwargs = cache_kwargs(chat, cache, len(group))
        with torch.inference_mode():
            logits = chat.model(**batch, logits_to_keep=keep, **kwargs).logits.float().cpu()
        index = torch.zeros(len(group), self.n, dtype=torch.long)
        for j, i in enumerate(group):
            first = keep - (len(self.rows[i]) - self.starts[i])  # kept position of the last prompt token
            index[j] = (first + torch.arange(self.n)).clamp_max(keep - 1)
        return torch.gather(logits, 1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))

    def __len__(self) -> int:
        return len(self.batches)

    def batch(self, k: int, chat: ChatModel | None = None, cache: Cache | None = None) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Batch k for the model as it is now (``chat``, by default the one given at construction, which
        must share its tokenizer): (row indices, logits [rows, n, vocab], validity mask [rows, n])."""
        chat = chat or self.chat
        group = self.batches[k]
        if self.prefix and cache is None:
            cache = self._prefix_cache(chat)
        mask = torch.tensor([[j < self.valid[i] for j in range(self.n)] for i in group])
        return group, self._logits_for(chat, group, cache if self.prefix else None), mask

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Every batch, sharing one prefix pass."""
        cache = self._prefix_cache(self.chat) if self.prefix else None
        for k in range(len(self.batches)):
            yield self.batch(k, cache=cache)


def prefix_cache(chat: ChatModel, ids: list[int]) -> Cache:
    """The key/value cache of one token sequence (a prefix that a batch of continuations shares)."""
    with torch.inference_mode():
        out = chat.model(input_ids=torch.tensor([ids], device=chat.device), use_cache=True, logits_to_keep=1)
    return out.cache if hasattr(out, "cache") else out.past_key_values  # transformers >= 5.x calls it ``cache``


def cache_kwargs(chat: ChatModel, cache: Cache, n: int) -> dict:
    """Forward-pass arguments that continue ``cache`` (left untouched) for a batch of ``n`` rows."""
    import inspect

    repeated = copy.deepcopy(cache)
    repeated.batch_repeat_interleave(n)
    name = "cache" if "cache" in inspect.signature(chat.model.forward).parameters else "past_key_values"
    return {name: repeated, "use_cache": True}


def _common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix every row shares, leaving every row at least two tokens of its own."""
    if len(rows) < 2:
        return 0
    first, limit = rows[0], min(len(r) for r in rows) - 2
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n if n >= 4 else 0


class LastPosition:
    """Chat prompts scored at their last token, one pass per state of the model's hooks.

    Savings that leave every logit as a full pass computes it (up to float rounding):
    - the chat template's common prefix runs once per pass, under the hooks active then, and every
      batch continues its key/value cache (checked against full sequences once, when built, and
      switched off where a family's cache cannot be repeated);
    - prompts are sorted by length and cut into batches of at most ``batch_size`` rows that minimise
      padded tokens plus ``overhead`` tokens per forward pass;
    - ``record`` keeps the original model's decoder-layer outputs, so ``logits(start=l)`` replays
      layers < l instead of running them (an intervention at layer l's input leaves them unchanged).
    """

    def __init__(self, chat: ChatModel, instructions: list[str], batch_size: int = 32, share_prefix: bool = True, overhead: int | None = None):
        self.chat, self.rows, self.batch_size = chat, [chat.encode(x) for x in instructions], batch_size
        self.overhead = overhead if overhead is not None else (FORWARD_OVERHEAD_TOKENS if chat.device.type == "cpu" else 100_000)
        self.recorded: list[list] | None = None
        self.prefix = _common_prefix(self.rows) if share_prefix else 0
        self.batches = self._batches()
        if self.prefix and not self._prefix_matches():
            log("scoring: sharing the prompt prefix changes the logits for this model; running full sequences")
            self.prefix, self.batches = 0, self._batches()

    def _batches(self) -> list[list[int]]:
        return length_batches([len(r) - self.prefix for r in self.rows], self.batch_size, self.overhead)

    def _prefix_matches(self) -> bool:
        """Checked on the shortest and the longest prompt: the most padding between prefix and rows."""
        group = sorted({self.batches[0][0], self.batches[-1][-1]})
        try:
            shared = self._forward(group, self.prefix_cache())
        except Exception:  # a family whose cache cannot be repeated over the batch
            return False
        return _same(self._forward(group, None), shared)

    def prefix_cache(self) -> Cache | None:
        """The shared prefix's key/value cache for the model as it is now (None when not shared)."""
        return prefix_cache(self.chat, self.rows[0][: self.prefix]) if self.prefix else None

    def _forward(self, group: list[int], cache: Cache | None) -> torch.Tensor:
        """[len(group), vocab] float32 last-position logits, the rows continuing ``cache`` when given."""
        skip = self.prefix if cache is not None else 0
        batch = self.chat.pad([self.rows[i][skip:] for i in group])
        kwargs: dict = {"use_cache": False}
        if cache is not None:
            ones = torch.ones(len(group), skip, dtype=batch["attention_mask"].dtype, device=self.chat.device)
            batch["attention_mask"] = torch.cat([ones, batch["attention_mask"]], dim=1)
            batch["position_ids"] = batch["position_ids"] + skip
            kwargs = cache_kwargs(self.chat, cache, len(group))
        with torch.inference_mode():
            return self.chat.model(**batch, logits_to_keep=1, **kwargs).logits[:, -1].float().cpu()

    def logits(self, start: int = 0) -> torch.Tensor:
        """[prompts, vocab] float32 next-token logits in the given order, for the model with its hooks now
        (the prefix run once under them); layers below ``start`` replay their recorded outputs, if any."""
        cache = self.prefix_cache()
        replay = self.recorded if self.recorded is not None and start > 0 else None
        parts = []
        for k, group in enumerate(self.batches):
            with replaying(self.chat.layers[:start], replay[k] if replay else []):
                parts.append(self._forward(group, cache))
        return self._in_order(parts)

    def _in_order(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty(len(self.rows), parts[0].shape[-1])
        out[[i for group in self.batches for i in group]] = torch.cat(parts)
        return out

    def record(self, upto: int) -> torch.Tensor:
        """The unhooked model's logits, keeping decoder layers < ``upto``'s outputs per batch for ``logits(start=...)``.

        Replay is checked once (batch 0 from layer ``upto``) and dropped if it changes the logits.
        """
        seen: dict[int, object] = {}

        def keep(index: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                seen[index] = retuple(output, untuple(output).clone())

            return hook

        cache = self.prefix_cache()
        recorded, parts = [], []
        with hooked(post=[(self.chat.layers[i], keep(i)) for i in range(upto)]):
            for group in self.batches:
                parts.append(self._forward(group, cache))
                recorded.append([seen[i] for i in range(upto)])
        try:
            with replaying(self.chat.layers[:upto], recorded[0]):
                ok = _same(parts[0], self._forward(self.batches[0], cache))
        except Exception:  # a family whose decoder loop needs more from its layers than their output
            ok = False
        if not ok:
            log("scoring: replaying the first layers changes the logits for this model; running every layer")
        self.recorded = recorded if ok else None
        return self._in_order(parts)


FORWARD_OVERHEAD_TOKENS = 48  # a forward's fixed cost, in prompt tokens: on CPU many small forwards were slower than a few large ones


def length_batches(lengths: list[int], batch_size: int, overhead: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most ``batch_size`` that minimise the padded
    tokens (rows times the longest row) plus ``overhead`` tokens per batch (dynamic programming)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best, cut = [0] + [-1] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for begin in range(max(0, end - batch_size), end):
            cost = best[begin] + (end - begin) * lengths[order[end - 1]] + overhead
            if best[end] < 0 or cost < best[end]:
                best[end], cut[end] = cost, begin
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


@contextmanager
def replaying(layers: nn.ModuleList, outputs: list) -> Iterator[None]:
    """Within the block the first ``len(outputs)`` layers return those outputs instead of running (their
    hooks still run). The instance's ``forward`` is replaced and always restored: hooks cannot skip compute."""
    saved = [(layer, layer.__dict__.get("forward")) for layer in layers[: len(outputs)]]
    try:
        for (layer, _), output in zip(saved, outputs):
            layer.__dict__["forward"] = functools.partial(_replay, output)
        yield
    finally:
        for layer, previous in saved:
            layer.__dict__.pop("forward", None)
            if previous is not None:
                layer.__dict__["forward"] = previous


def _replay(output: object, *args: Any, **kwargs: Any) -> object:
    return retuple(output, untuple(output).clone())  # a copy: the model may write into what a layer returns


def _same(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Whether two logit tensors give the same next-token distributions (up to float rounding)."""
    return bool(kl_divergence(want, got).abs().max() <= 1e-5)
