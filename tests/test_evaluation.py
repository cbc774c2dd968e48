"""Costs and generation on tiny random-init models: KL, cross-entropy, the engine, and evaluate()."""

import pytest
import torch

from refusal.data.prompt_sets import load_capability
from refusal.engines.hf import HFEngine
from refusal.errors import RefusalError
from refusal.measure.evaluation import Condition, EvalSettings, capability_loss, corpus_chunks, cosine_matrix, cross_entropy, evaluate, kl_costs, rate
from refusal.residual.directions import Candidates
from refusal.residual.interventions import ablate

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Explain how rain forms.", "Name three colors."]


def completions_of(chat, prompts, n):
    return HFEngine(chat, batch_size=2).generate_ids(prompts, n)


def test_kl_is_zero_for_the_same_model_and_positive_for_an_edited_one(llama_chat):
    original = Condition("original", "original", llama_chat)
    completions = completions_of(llama_chat, PROMPTS, 6)
    same = kl_costs(original, Condition("same", "same", llama_chat), PROMPTS, completions, batch_size=3)
    assert same["first_token"]["mean"] == 0 and same["multi_token"]["mean"] == 0
    assert same["first_token"]["n"] == len(PROMPTS) and same["multi_token"]["tokens"] == max(map(len, completions))
    direction = torch.randn(llama_chat.d_model, generator=torch.Generator().manual_seed(1))
    edited = kl_costs(original, Condition("ablated", "ablated (hooks)", llama_chat, lambda: ablate(llama_chat, direction)), PROMPTS, completions)
    assert edited["first_token"]["mean"] > 1e-6 and edited["multi_token"]["mean"] > 1e-6


def test_kl_against_another_model_object_uses_that_model(llama_chat, tokenizer):
    """An exported checkpoint is a second model: its own weights must run, not the original's."""
    from conftest import build_model
    from refusal.edit.weights import orthogonalize_weights
    from refusal.model.chat import wrap_model

    direction = torch.randn(llama_chat.d_model, generator=torch.Generator().manual_seed(3))
    exported = wrap_model(build_model("llama", len(tokenizer)), tokenizer, source="tiny-llama-edited")
    orthogonalize_weights(exported, direction)
    completions = completions_of(llama_chat, PROMPTS, 6)
    original = Condition("original", "original", llama_chat)
    other = kl_costs(original, Condition("edited", "edited checkpoint", exported), PROMPTS, completions, batch_size=3)
    hooked = kl_costs(
        original, Condition("ablated", "ablated (hooks)", llama_chat, lambda: ablate(llama_chat, direction)), PROMPTS, completions, batch_size=3
    )
    assert other["first_token"]["mean"] > 1e-6
    for key in ("first_token", "multi_token"):
        assert abs(other[key]["mean"] - hooked[key]["mean"]) <= 1e-4 * max(1.0, hooked[key]["mean"])


def test_multi_token_kl_averages_teacher_forced_positions_and_skips_padding(llama_chat):
    """Per prompt: the mean over its own completion tokens of KL at the positions predicting them."""
    from refusal.residual.scoring import kl_divergence

    direction = torch.randn(llama_chat.d_model, generator=torch.Generator().manual_seed(2))
    completions = [[5, 6, 7], [8], [9, 10]]  # ragged on purpose
    prompts = PROMPTS[:3]
    got = kl_costs(
        Condition("original", "original", llama_chat),
        Condition("ablated", "ablated (hooks)", llama_chat, lambda: ablate(llama_chat, direction)),
        prompts,
        completions,
        batch_size=3,
    )
    expected_first, expected_multi = [], []
    for prompt, comp in zip(prompts, completions):
        ids = llama_chat.encode(prompt) + comp
        batch = llama_chat.pad([ids])
        p_len = len(ids) - len(comp)
        a = llama_chat.logits(batch, last_only=False)[0, p_len - 1 : p_len - 1 + len(comp)]
        with ablate(llama_chat, direction):
            b = llama_chat.logits(batch, last_only=False)[0, p_len - 1 : p_len - 1 + len(comp)]
        kl = kl_divergence(a, b)
        expected_first.append(float(kl[0]))
        expected_multi.append(float(kl.mean()))
    assert got["first_token"]["mean"] == pytest.approx(sum(expected_first) / 3, rel=1e-4)
    assert got["multi_token"]["mean"] == pytest.approx(sum(expected_multi) / 3, rel=1e-4)


def test_cross_entropy_matches_a_hand_computed_value(llama_chat):
    chunks = [[5, 9, 12, 7, 30], [40, 41, 42]]  # different lengths: padding must not count
    got = cross_entropy(Condition("original", "original", llama_chat), chunks, batch_size=2)
    total, count = 0.0, 0
    for ids in chunks:
        with torch.no_grad():
            logits = llama_chat.model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        total += -sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        count += len(ids) - 1
    assert got["tokens"] == count == 6
    assert got["loss"] == pytest.approx(total / count, rel=1e-6)


def test_capability_loss_equals_one_unpadded_item_at_a_time_and_moves_with_an_edit(llama_chat):
    items = load_capability("test")[::6]  # two code, two math; ragged lengths: batches of 3 pad
    sums: dict[str, list[float]] = {}
    for item in items:
        prompt = llama_chat.encode(item.prompt)
        solution = llama_chat.tokenizer(item.solution, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = llama_chat.model(torch.tensor([prompt + solution])).logits[0].double()
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
        entry = sums.setdefault(item.kind, [0.0, 0])
        entry[0] -= float(logp.gather(1, torch.tensor(solution)[:, None]).sum())
        entry[1] += len(solution)
    original = Condition("original", "original", llama_chat)
    got = capability_loss(original, items, batch_size=3)
    total, count = sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())
    assert (got["tokens"], got["items"]) == (count, 4) and got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["by_kind"] == pytest.approx({k: v[0] / v[1] for k, v in sums.items()}, rel=1e-5) and set(got["by_kind"]) == {"code", "math"}
    direction = torch.randn(llama_chat.d_model, generator=torch.Generator().manual_seed(5))
    edited = capability_loss(Condition("ablated", "ablated", llama_chat, lambda: ablate(llama_chat, direction)), items, batch_size=3)
    assert abs(edited["loss"] - got["loss"]) > 1e-4 and got["loss"] < float("inf")


def test_corpus_chunks_respect_the_token_budget_and_the_model_context(llama_chat):
    texts = ["Bake bread with flour and water. " * 40, "Name three colors."]
    chunks = corpus_chunks(llama_chat, texts, max_tokens=100, max_length=32)
    assert sum(map(len, chunks)) == 100 and max(map(len, chunks)) <= 32
    with pytest.raises(RefusalError, match="corpus has no text"):
        cross_entropy(Condition("original", "original", llama_chat), [])


def test_engine_batches_by_length_yet_matches_one_by_one_generation_in_input_order(llama_chat):
    prompts = PROMPTS + ["Hi.", "Tell me a long story about a dragon who bakes bread by the sea."]
    batched = HFEngine(llama_chat, batch_size=3).generate(prompts, 5)
    single = [HFEngine(llama_chat, batch_size=1).generate([p], 5)[0] for p in prompts]
    assert batched == single


def test_stop_when_ends_a_sequence_early_and_keeps_the_others_unchanged(llama_chat):
    full = HFEngine(llama_chat, batch_size=4).generate_ids(PROMPTS, 12)
    prefix = lambda i, n: llama_chat.tokenizer.decode(full[i][:n], skip_special_tokens=True)
    after4 = [prefix(i, 4) for i in range(len(PROMPTS))]
    k = next(i for i, text in enumerate(after4) if text and after4.count(text) == 1 and len(full[i]) > 4)
    stop = lambda text: text == after4[k]  # the criterion runs every 4 new tokens: decided after 4 tokens for prompt k only
    assert [i for i in range(len(PROMPTS)) if any(stop(prefix(i, n)) for n in (4, 8))] == [k]
    stopped = HFEngine(llama_chat, batch_size=4).generate_ids(PROMPTS, 12, stop_when=stop)
    assert stopped[k] == full[k][:4]
    assert [ids for i, ids in enumerate(stopped) if i != k] == [ids for i, ids in enumerate(full) if i != k]


def test_cosine_matrix_is_symmetric_with_unit_diagonal_and_null_for_zero_directions():
    torch.manual_seed(0)
    harmful, harmless = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    harmless[0] = harmful[0]  # layer 0: both classes equal (a fixed template token's embedding)
    cos = cosine_matrix(Candidates(harmful, harmless), -1)
    m = cos["matrix"]
    assert m[0][0] is None and m[0][2] is None and m[2][0] is None
    for i in range(1, 4):
        assert m[i][i] == pytest.approx(1.0)
        for j in range(1, 4):
            assert m[i][j] == pytest.approx(m[j][i])


def test_evaluate_needs_the_original_first_and_reports_rates_with_intervals(llama_chat):
    with pytest.raises(RefusalError, match="original model as its first condition"):
        evaluate([Condition("ablated", "ablated", llama_chat)], {"harmful": PROMPTS, "harmless": PROMPTS}, EvalSettings())
    direction = torch.randn(llama_chat.d_model, generator=torch.Generator().manual_seed(3))
    conditions = [
        Condition("original", "original", llama_chat),
        Condition("ablated", "ablated (hooks)", llama_chat, lambda: ablate(llama_chat, direction)),
    ]
    result = evaluate(
        conditions,
        {"harmful": PROMPTS[:2], "harmless": PROMPTS[2:]},
        EvalSettings(max_new_tokens=4, batch_size=2, kl_tokens=3, refusal_ids=[5], capability_items=2),
        corpus=["How do I bake bread? Explain how rain forms."],
        capability=load_capability("test")[11:14],  # capped to 2: one code, one math
    )
    assert result["conditions"] == [{"name": "original", "label": "original"}, {"name": "ablated", "label": "ablated (hooks)"}]
    assert {c: set(by_kind) for c, by_kind in result["rates"].items()} == {"original": {"harmful", "harmless"}, "ablated": {"harmful", "harmless"}}
    assert result["rates"]["original"]["harmful"]["total"] == 2
    assert set(result["kl"]) == {"ablated"} and result["kl"]["ablated"]["multi_token"]["tokens"] <= 3
    assert set(result["ce_loss"]["loss"]) == {"original", "ablated"}
    assert set(result["capability"]["loss"]) == {"original", "ablated"} and result["capability"]["items"] == 2
    assert result["capability"]["by_kind"]["ablated"].keys() == {"code", "math"} and result["capability"]["set"] == "builtin"
    assert {c: set(v) for c, v in result["refusal_score"].items()} == {c: set(v) for c, v in result["rates"].items()}
    assert {c: {k: len(t) for k, t in v.items()} for c, v in result["completions"].items()} == {
        c: {"harmful": 2, "harmless": 2} for c in result["rates"]
    }
    assert [(s["kind"], s["edit"]) for s in result["samples"]] == [("harmful", "ablated")] * 2 + [("harmless", "ablated")] * 2


def test_costs_come_from_the_condition_not_its_name_and_any_name_is_a_key(llama_chat):
    """A condition without costs (activation addition) gets no KL or cross-entropy, whatever it is called; a
    search trial or other new condition is just another key, and its own engine generates its completions."""
    direction = torch.randn(llama_chat.d_model, generator=torch.Generator().manual_seed(4))
    calls = []

    class Recording(HFEngine):
        def generate_ids(self, instructions, max_new_tokens, stop_when=None):
            calls.append(list(instructions))
            return super().generate_ids(instructions, max_new_tokens, stop_when)

    conditions = [
        Condition("original", "original", llama_chat),
        Condition("steered", "steered (no costs)", llama_chat, lambda: ablate(llama_chat, direction), kinds=("harmless",), costs=False),
        Condition("trial_30", "search trial 30", llama_chat, lambda: ablate(llama_chat, direction), engine=Recording(llama_chat, 2)),
    ]
    prompts = {"harmful": PROMPTS[:2], "harmless": PROMPTS[2:]}
    result = evaluate(conditions, prompts, EvalSettings(max_new_tokens=3, batch_size=2, kl_tokens=2), corpus=["Name three colors. " * 4])
    assert set(result["kl"]) == {"trial_30"} and set(result["ce_loss"]["loss"]) == {"original", "trial_30"}
    assert result["capability"] is None  # no problems given: skipped
    assert set(result["rates"]["steered"]) == {"harmless"} and set(result["rates"]["trial_30"]) == {"harmful", "harmless"}
    assert calls == [prompts["harmful"], prompts["harmless"]]
    with pytest.raises(RefusalError, match="repeat"):
        evaluate([conditions[0], conditions[2], conditions[2]], prompts, EvalSettings(max_new_tokens=2))
    for bad in ("trial.30", "judge"):
        with pytest.raises(RefusalError, match=f"condition name '{bad}' is not allowed"):
            evaluate([conditions[0], Condition(bad, "x", llama_chat)], prompts, EvalSettings(max_new_tokens=2))


def test_rate_carries_count_and_wilson_interval():
    r = rate(12, 32)
    assert (r["refused"], r["total"], r["rate"]) == (12, 32, 0.375)
    assert r["low"] == pytest.approx(0.2293, abs=1e-4) and r["high"] == pytest.approx(0.5475, abs=1e-4)
