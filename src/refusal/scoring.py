"""Scores computed from logits, without generation: refusal log-odds and KL divergence."""

from __future__ import annotations

import torch

from .activations import batches
from .model import ChatModel


def refusal_score(logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """Log-odds that the next token is one of ``refusal_ids``: log p - log(1 - p), per row, float64.

    Computed with log-sum-exp over the two token groups, so it stays finite when p is near 0 or 1.
    """
    logits = logits.double()
    mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    mask[refusal_ids] = True
    log_refuse = torch.logsumexp(logits[..., mask], dim=-1)
    log_other = torch.logsumexp(logits[..., ~mask], dim=-1)
    return (log_refuse - log_other).cpu()


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
