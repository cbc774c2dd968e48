"""How a candidate suffix is scored: the attack's loss (``Objective``) and exact scoring of many candidates
with each prompt's prefix key/value cache reused (``CandidateScorer``).

The loss is the refusal log-odds of the first response token (floored: a prompt that already complies
adds nothing) or the mean cross-entropy of a target completion, teacher-forced. Scoring runs each
prompt's head + instruction once and then only [suffix + template tail (+ target)] per candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common.progress import log
from ..data.suffixes import SuffixedPrompt
from ..errors import RefusalError
from ..model.chat import ChatModel
from ..residual.scoring import cache_kwargs, prefix_cache, refusal_score


@dataclass
class Objective:
    """What the suffix minimises, per prompt, averaged over prompts."""

    refusal_ids: list[int] | None = None  # log-odds that the first response token is one of these (a refusal)
    target_ids: list[int] | None = None  # mean cross-entropy of these tokens teacher-forced after the prompt
    floor: float = -5.0  # refusal objective only: log-odds below this count as this (stop pushing prompts that comply)

    def __post_init__(self) -> None:
        if (self.refusal_ids is None) == (self.target_ids is None):
            raise RefusalError("an attack objective needs exactly one of refusal token ids or target token ids; give one of them")
        if not (self.refusal_ids or self.target_ids):
            raise RefusalError("the attack objective's token list is empty; give at least one refusal token or target token")

    @property
    def n_predicted(self) -> int:
        """Positions whose logits the loss reads: the last prompt token, plus one per further target token."""
        return len(self.target_ids) if self.target_ids is not None else 1

    def continuation(self) -> list[int]:
        """Tokens fed after the prompt (the target, teacher-forced, minus its last token)."""
        return list(self.target_ids[:-1]) if self.target_ids is not None else []

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """[rows] float64 loss from [rows, n_predicted, vocab] logits at the predicting positions."""
        if self.refusal_ids is not None:
            score = refusal_score(logits[:, -1], self.refusal_ids).to(logits.device)  # [rows]
            return score.clamp_min(self.floor)  # no gradient below the floor
        target = torch.tensor(self.target_ids, device=logits.device).expand(logits.shape[0], -1)  # [rows, T]
        logits = logits if logits.dtype == torch.float64 else logits.float()  # float32 at least, not a float64 copy of the vocabulary
        return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(-1).double()  # [rows]


# ---- exact scoring --------------------------------------------------------------------------------
class CandidateScorer:
    """Scores many candidate suffixes on fixed prompts, reusing each prompt's prefix (head+instruction) key/value cache.

    With ``share_prefix`` each prompt's prefix is run once, here, and its cache repeated over a batch
    of candidates, which then run only [suffix + tail (+ target[:-1])]. On the first call a few
    candidates are also scored from full sequences; if the family's cache cannot be repeated (an
    exception) or the two disagree, full sequences are used throughout, so the numbers never depend on it.
    """

    def __init__(self, chat: ChatModel, prompts: list[SuffixedPrompt], objective: Objective, batch_size: int = 64, share_prefix: bool = True):
        if not prompts:
            raise RefusalError("the attack needs at least one prompt")
        self.chat, self.objective, self.batch_size = chat, objective, max(1, batch_size)
        self.prefixes = [p.prefix for p in prompts]
        self.afters = [list(p.tail) + objective.continuation() for p in prompts]  # what follows the suffix
        self.caches = [prefix_cache(chat, prefix) for prefix in self.prefixes] if share_prefix else None
        self.checked = not share_prefix  # whether the cache was checked against full sequences (on the first call)

    @property
    def share_prefix(self) -> bool:
        return self.caches is not None

    def _losses(self, k: int, batch: torch.Tensor, shared: bool) -> torch.Tensor:
        """[B] float64 loss of prompt k with each suffix of ``batch`` [B, L]."""
        chat, n = self.chat, self.objective.n_predicted
        after = torch.tensor(self.afters[k], dtype=torch.long).expand(len(batch), -1)  # [B, A]
        rows = torch.cat([batch.cpu(), after], dim=1)  # [B, L + A]
        if not shared:
            prefix = torch.tensor(self.prefixes[k], dtype=torch.long).expand(len(batch), -1)  # [B, P]
            inputs = chat.pad(torch.cat([prefix, rows], dim=1).tolist())
            kwargs: dict = {"use_cache": False}
        else:
            skip = len(self.prefixes[k])
            assert self.caches is not None
            width = rows.shape[1]
            inputs = {
                "input_ids": rows.to(chat.device),
                "attention_mask": torch.ones(len(batch), skip + width, dtype=torch.long, device=chat.device),  # [B, P + L + A]
                "position_ids": (skip + torch.arange(width, device=chat.device)).expand(len(batch), -1),  # [B, L + A]
            }
            kwargs = cache_kwargs(chat, self.caches[k], len(batch))
        with torch.inference_mode():
            logits = chat.model(**inputs, logits_to_keep=n, **kwargs).logits[:, -n:]  # [B, n, vocab]
            return self.objective.loss(logits).cpu()

    def _check(self, candidates: torch.Tensor) -> None:
        """Score a few candidates both ways once; run full sequences from now on if the cache fails or changes the scores."""
        self.checked, sample = True, candidates[:4]
        try:
            difference = float((self._losses(0, sample, shared=True) - self._losses(0, sample, shared=False)).abs().max())
        except Exception as error:  # a family whose cache cannot be repeated over the batch
            difference, why = math.inf, type(error).__name__
        else:
            why = f"scores change by {difference:.2g}"
        if difference > (1e-3 if self.chat.dtype.itemsize >= 4 else 0.1):  # half precision: rounding alone moves scores past 1e-3
            log(f"attack: reusing the prompt prefix's cache fails for this model ({why}); scoring full sequences")
            self.caches = None

    def scores(self, candidates: torch.Tensor) -> torch.Tensor:
        """[C] float64 mean loss over prompts of each candidate suffix [C, L] (lower is better); no gradient."""
        if candidates.dim() != 2 or candidates.shape[1] == 0:
            raise RefusalError("candidate suffixes must be a [count, length] tensor of token ids with length >= 1")
        if not self.checked and len(candidates):
            self._check(candidates)
        total = torch.zeros(len(candidates), dtype=torch.float64)
        for k in range(len(self.prefixes)):
            for start in range(0, len(candidates), self.batch_size):
                batch = candidates[start : start + self.batch_size]
                total[start : start + len(batch)] += self._losses(k, batch, shared=self.share_prefix)
        return total / len(self.prefixes)
