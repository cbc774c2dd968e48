import math

import torch

from refusal.scoring import kl_divergence, refusal_score


def test_refusal_score_is_log_odds_of_the_refusal_tokens():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    p = 0.1 + 0.3
    assert math.isclose(refusal_score(logits, [0, 2]).item(), math.log(p / (1 - p)), rel_tol=1e-9)


def test_refusal_score_stays_finite_at_extremes():
    logits = torch.tensor([[100.0, -100.0, -100.0], [-100.0, 100.0, 100.0]])
    scores = refusal_score(logits, [0])
    assert torch.isfinite(scores).all() and scores[0] > 150 and scores[1] < -150


def test_kl_is_zero_for_identical_and_positive_otherwise():
    torch.manual_seed(0)
    a = torch.randn(5, 50)
    assert kl_divergence(a, a).abs().max() < 1e-12
    kl = kl_divergence(a, a + torch.randn(5, 50))
    assert (kl > 0).all()
    p, q = torch.tensor([[0.5, 0.5]], dtype=torch.float64), torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert math.isclose(kl_divergence(p.log(), q.log()).item(), expected, rel_tol=1e-9)
