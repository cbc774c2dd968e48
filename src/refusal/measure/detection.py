"""Detector statistics without sklearn: AUROC (Mann-Whitney, ties count half), thresholds calibrated to a false-positive
rate, TPR at a threshold, and an L2-regularised logistic-regression probe.

A detector flags a prompt when its score is strictly above the threshold. Everything is float64 on CPU, except the
probe (float32, full-batch L-BFGS from zeros: deterministic); NaN or inf scores are one-line errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import RefusalError

FPR_TARGETS = {"1%": 0.01, "5%": 0.05}


def _scores(values: Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    if not torch.isfinite(t).all():
        raise RefusalError(f"the {name} scores hold NaN or inf; the model's activations overflowed: use --dtype float32")
    return t


def auroc(positive: Sequence[float] | torch.Tensor, negative: Sequence[float] | torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counting half: the Mann-Whitney U over both sizes (average ranks)."""
    pos, neg = _scores(positive, "positive"), _scores(negative, "negative")
    if not len(pos) or not len(neg):
        raise RefusalError(f"AUROC needs positive and negative scores (got {len(pos)} and {len(neg)}); give prompts of both kinds")
    _, inverse, counts = torch.unique(torch.cat([pos, neg]), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # average 1-based rank of each tied group
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def calibrate(negative: Sequence[float] | torch.Tensor, fpr: float) -> float:
    """The smallest observed threshold that flags (score > threshold) at most ``fpr`` of the ``negative`` scores."""
    neg = torch.sort(_scores(negative, "calibration")).values
    if not len(neg):
        raise RefusalError("calibrating a threshold needs harmless validation prompts; none were given")
    allowed = math.floor(fpr * len(neg) + 1e-9)
    return float(neg[len(neg) - 1 - allowed]) if allowed < len(neg) else -math.inf


def flag_rate(scores: Sequence[float] | torch.Tensor, threshold: float) -> float:
    """The fraction of ``scores`` above ``threshold`` (the TPR on positives, the FPR on negatives)."""
    t = _scores(scores, "flagged")
    return float((t > threshold).double().mean()) if len(t) else math.nan


def detection_metrics(positive: torch.Tensor, negative: torch.Tensor, thresholds: dict[str, float]) -> dict:
    """AUROC, and per calibrated threshold the TPR on ``positive`` and the FPR achieved on ``negative``."""
    return {
        "auroc": auroc(positive, negative),
        **{f"tpr@{name}": flag_rate(positive, t) for name, t in thresholds.items()},
        **{f"fpr@{name}": flag_rate(negative, t) for name, t in thresholds.items()},
        "n_positive": len(positive),
        "n_negative": len(negative),
    }


@dataclass
class Probe:
    """Logistic regression on standardised features: p(harmful) = sigmoid(((x - mean) / std) @ weight + bias)."""

    weight: torch.Tensor  # [f]
    bias: torch.Tensor  # [1]
    mean: torch.Tensor  # [f]
    std: torch.Tensor  # [f]

    def logit(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.float() - self.mean) / self.std) @ self.weight + self.bias


def fit_probe(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2, steps: int = 200, seed: int = 0) -> Probe:
    """An L2-regularised logistic regression (float32, full-batch L-BFGS from zeros) of ``labels`` (1: harmful) on ``features``."""
    x, y = features.float(), labels.float()
    if not torch.isfinite(x).all():
        raise RefusalError("the probe's features hold NaN or inf; the model's activations overflowed: use --dtype float32")
    if y.min() == y.max():
        raise RefusalError("the probe needs harmful and harmless train prompts; one of the two kinds is missing")
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y) + l2 * weight.square().sum()
        value.backward()  # type: ignore[no-untyped-call]
        return value

    optimizer.step(loss)  # type: ignore[no-untyped-call]
    return Probe(weight.detach().clone(), bias.detach().clone(), mean, std)
