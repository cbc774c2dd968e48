import math

import pytest
import torch

from conftest import FAMILIES, build_model
from refusal.model.chat import wrap_model
from refusal.residual.scoring import kl_divergence, refusal_margin, refusal_score


def test_refusal_score_is_log_odds_of_the_refusal_tokens():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    p = 0.1 + 0.3
    assert math.isclose(refusal_score(logits, [0, 2]).item(), math.log(p / (1 - p)), rel_tol=1e-9)


def test_refusal_score_stays_finite_at_extremes():
    logits = torch.tensor([[100.0, -100.0, -100.0], [-100.0, 100.0, 100.0]])
    scores = refusal_score(logits, [0])
    assert torch.isfinite(scores).all() and scores[0] > 150 and scores[1] < -150


def test_refusal_margin_is_positive_exactly_where_greedy_picks_a_refusal_token():
    torch.manual_seed(0)
    logits = torch.randn(200, 30)
    refusal_ids = [3, 7, 11]
    margin = refusal_margin(logits, refusal_ids)
    greedy_refuses = torch.isin(logits.argmax(-1), torch.tensor(refusal_ids))
    assert margin.dtype == torch.float64 and greedy_refuses.any() and (~greedy_refuses).any()
    assert torch.equal(margin > 0, greedy_refuses)
    # the log-odds disagree where one refusal token is the top token yet the refusal tokens together are unlikely
    p = torch.tensor([[0.3, 0.2, 0.2, 0.15, 0.15]]).log()
    assert refusal_margin(p, [0]).item() > 0 > refusal_score(p, [0]).item()


def test_kl_is_zero_for_identical_and_positive_otherwise():
    torch.manual_seed(0)
    a = torch.randn(5, 50)
    assert kl_divergence(a, a).abs().max() < 1e-12
    kl = kl_divergence(a, a + torch.randn(5, 50))
    assert (kl > 0).all()
    p, q = torch.tensor([[0.5, 0.5]], dtype=torch.float64), torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert math.isclose(kl_divergence(p.log(), q.log()).item(), expected, rel_tol=1e-9)


def _forced(chat, share_prefix):
    from refusal.residual.scoring import TeacherForced

    prompts = [chat.encode(x) for x in ("How do I bake bread?", "Name three colors.", "What is a prime number?")]
    continuations = [chat.encode("Sure")[-3:], [], chat.encode("I cannot help")[-6:]]  # one empty: only the first prediction counts
    return TeacherForced(chat, prompts, continuations, n=4, batch_size=2, share_prefix=share_prefix), prompts, continuations


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forced_shares_the_prompt_prefix_without_changing_the_logits(family, system_tokenizer):
    chat = wrap_model(build_model(family, len(system_tokenizer)), system_tokenizer, source=f"tiny-{family}")
    shared, prompts, continuations = _forced(chat, True)
    full, _, _ = _forced(chat, False)
    assert full.prefix == 0 and shared.prefix >= 8  # the system turn and the user header
    got = {i: (l, m) for rows, logits, mask in shared for i, l, m in zip(rows, logits, mask)}
    want = {i: (l, m) for rows, logits, mask in full for i, l, m in zip(rows, logits, mask)}
    assert sorted(got) == [0, 1, 2]
    for i in got:
        assert torch.equal(got[i][1], want[i][1])
        assert torch.allclose(got[i][0], want[i][0], atol=1e-4)
    assert [m.sum().item() for _, m in (got[0], got[1], got[2])] == [min(4, len(continuations[0])), 1, 4]


def test_teacher_forced_logits_are_the_next_token_logits_of_each_prefix(system_tokenizer):
    llama_chat = wrap_model(build_model("llama", len(system_tokenizer)), system_tokenizer, source="tiny-llama")
    forced, prompts, continuations = _forced(llama_chat, True)
    assert forced.prefix > 0
    rows, logits, mask = next(iter(forced))
    i = rows[0]
    for j in range(int(mask[0].sum())):
        sequence = torch.tensor([prompts[i] + continuations[i][:j]])
        expected = llama_chat.logits({"input_ids": sequence, "attention_mask": torch.ones_like(sequence)})[0]
        assert torch.allclose(logits[0, j], expected, atol=1e-4)
