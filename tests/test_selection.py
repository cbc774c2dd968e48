import json

import pytest
import torch

from conftest import FAMILIES, build_model
from refusal.data.prompt_sets import load_builtin
from refusal.direction.selection import score_candidates, select_direction
from refusal.errors import RefusalError
from refusal.model.chat import wrap_model
from refusal.residual.activations import mean_activations
from refusal.residual.directions import compute_candidates
from refusal.residual.interventions import ablate, add
from refusal.residual.scoring import LastPosition, kl_divergence, last_logits, length_batches, prepare_batches, refusal_score
from refusal.settings import SelectionSettings


def rec(layer, position, bypass, induce, kl, filtered=()):
    return {"layer": layer, "position": position, "bypass": bypass, "induce": induce, "kl": kl, "filtered": list(filtered)}


def test_lowest_bypass_among_passing_candidates_wins():
    records = [rec(1, -1, -3.0, 1.0, 0.01), rec(2, -1, -5.0, 1.0, 0.5, ["kl 0.5 > 0.1"]), rec(3, -2, -4.0, 0.5, 0.02)]
    chosen = select_direction(records)
    assert (chosen["layer"], chosen["position"], chosen["fallback"]) == (3, -2, False)


def test_fallback_is_visible_when_nothing_passes():
    records = [rec(1, -1, -3.0, -1.0, 0.3, ["kl"]), rec(2, -1, -5.0, -2.0, 0.5, ["kl"]), rec(4, -1, None, None, None, ["pruned"])]
    chosen = select_direction(records)
    assert chosen["fallback"] and chosen["layer"] == 2 and "FALLBACK" in chosen["reason"]


def test_no_scored_candidate_is_an_error():
    with pytest.raises(RefusalError, match="no candidate"):
        select_direction([rec(4, -1, None, None, None, ["pruned"])])


@pytest.fixture
def scored(llama_chat, tmp_path):
    harmful, harmless = load_builtin("harmful", "train")[:12], load_builtin("harmless", "train")[:12]
    cands = compute_candidates(mean_activations(llama_chat, harmful), mean_activations(llama_chat, harmless), {"created": "t"})
    val_h, val_hl = load_builtin("harmful", "val")[:6], load_builtin("harmless", "val")[:6]
    ids = llama_chat.refusal_token_ids()
    return llama_chat, cands, val_h, val_hl, ids


def test_score_candidates_records_every_candidate(scored):
    chat, cands, val_h, val_hl, ids = scored
    config = SelectionSettings(prune_layer_fraction=0.34, kl_threshold=1e-9)
    records = score_candidates(chat, cands, val_h, val_hl, ids, config)
    assert len(records) == chat.n_layers * chat.n_post
    by_key = {(r["layer"], r["position"]): r for r in records}
    assert by_key[(2, -1)]["bypass"] is None and "last 34%" in by_key[(2, -1)]["filtered"][0]
    assert by_key[(0, -1)]["bypass"] is None and "zero direction" in by_key[(0, -1)]["filtered"][0]
    scored_records = [r for r in records if r["bypass"] is not None]
    assert scored_records and all(any(f.startswith("kl") for f in r["filtered"]) for r in scored_records)
    assert json.loads(json.dumps(records)) == records  # stored in selection.json as they are


def test_selection_scores_are_deterministic_and_resume_from_cache(scored, tmp_path):
    chat, cands, val_h, val_hl, ids = scored
    config = SelectionSettings(layers=[1], positions=[-1, -2])
    cache = tmp_path / "partial.jsonl"
    first = score_candidates(chat, cands, val_h, val_hl, ids, config, cache_path=cache)
    assert len(cache.read_text().splitlines()) == 2
    # a resumed run reads the cache instead of recomputing: poison the model to prove it
    with torch.no_grad():
        chat.model.get_input_embeddings().weight.add_(1.0)
    again = score_candidates(chat, cands, val_h, val_hl, ids, config, cache_path=cache)
    assert [r["bypass"] for r in again] == [r["bypass"] for r in first]


def test_selection_options_are_validated(scored):
    chat, cands, val_h, val_hl, ids = scored
    for config, message in [
        (SelectionSettings(layers=[99]), "layer 99"),
        (SelectionSettings(positions=[-9]), "position -9"),
        (SelectionSettings(kl_threshold=-1), "--kl-threshold -1 must be a positive number"),
        (SelectionSettings(prune_layer_fraction=1.5), r"--prune-layer-fraction 1.5 must be in \[0, 1\)"),
    ]:
        with pytest.raises(RefusalError, match=message):
            score_candidates(chat, cands, val_h, val_hl, ids, config)


def test_a_partial_file_of_other_inputs_is_not_reused(scored, tmp_path):
    chat, cands, val_h, val_hl, ids = scored
    config, cache = SelectionSettings(layers=[1], positions=[-1]), tmp_path / "partial.jsonl"
    first = score_candidates(chat, cands, val_h, val_hl, ids, config, cache_path=cache, cache_key="inputs-a")
    with torch.no_grad():
        chat.model.get_input_embeddings().weight.add_(1.0)
    other = score_candidates(chat, cands, val_h, val_hl, ids, config, cache_path=cache, cache_key="inputs-b")
    assert [r["bypass"] for r in other] != [r["bypass"] for r in first]


def reference_scores(chat, cands, harmful, harmless, ids, layer, position, batch_size):
    """The straightforward computation the fast path must equal: three full passes per candidate."""
    harmful_b, harmless_b = prepare_batches(chat, harmful, batch_size), prepare_batches(chat, harmless, batch_size)
    baseline = last_logits(chat, harmless_b)
    direction = cands.direction(layer, position)
    with ablate(chat, direction):
        bypass = refusal_score(last_logits(chat, harmful_b), ids)
        kl = kl_divergence(baseline, last_logits(chat, harmless_b))
    with add(chat, direction, layer):
        induce = refusal_score(last_logits(chat, harmless_b), ids)
    return {"bypass": bypass.mean().item(), "induce": induce.mean().item(), "kl": kl.mean().item()}


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_scores_equal_three_full_passes(family, system_tokenizer):
    chat = wrap_model(build_model(family, len(system_tokenizer), layers=4), system_tokenizer, source=f"tiny-{family}")
    harmful, harmless = load_builtin("harmful", "train")[:12], load_builtin("harmless", "train")[:12]
    cands = compute_candidates(mean_activations(chat, harmful), mean_activations(chat, harmless), {"created": "t"})
    val_h, val_hl = load_builtin("harmful", "val")[:10], load_builtin("harmless", "val")[:10]
    ids = chat.refusal_token_ids()
    fast = LastPosition(chat, val_hl, batch_size=4, overhead=2)
    fast.record(3)
    if family in ("llama", "qwen2", "gemma2"):  # the speed-ups are on, not fallen back
        assert fast.prefix >= 8 and fast.recorded is not None and len(fast.batches) >= 3
    config = SelectionSettings(layers=[1, 3], positions=[-1, -2], prune_layer_fraction=0.0)
    records = score_candidates(chat, cands, val_h, val_hl, ids, config, batch_size=4)
    assert not any("forward" in layer.__dict__ for layer in chat.layers)  # replay restored every layer
    for r in records:
        want = reference_scores(chat, cands, val_h, val_hl, ids, r["layer"], r["position"], batch_size=4)
        for key in ("bypass", "induce", "kl"):
            assert abs(r[key] - want[key]) <= 1e-4, (r["layer"], r["position"], key, r[key], want[key])


def test_scores_fall_back_to_full_passes_where_sharing_would_change_them(system_tokenizer, monkeypatch):
    chat = wrap_model(build_model("qwen2", len(system_tokenizer), layers=4), system_tokenizer, source="tiny-qwen2")
    harmful, harmless = load_builtin("harmful", "train")[:12], load_builtin("harmless", "train")[:12]
    cands = compute_candidates(mean_activations(chat, harmful), mean_activations(chat, harmless), {"created": "t"})
    val_h, val_hl, ids = load_builtin("harmful", "val")[:6], load_builtin("harmless", "val")[:6], chat.refusal_token_ids()
    monkeypatch.setattr("refusal.residual.scoring._same", lambda want, got: False)  # as if the family's cache or replay differed
    fast = LastPosition(chat, val_hl, batch_size=4)
    fast.record(2)
    assert fast.prefix == 0 and fast.recorded is None
    config = SelectionSettings(layers=[2], positions=[-1], prune_layer_fraction=0.0)
    (got,) = score_candidates(chat, cands, val_h, val_hl, ids, config, batch_size=4)
    want = reference_scores(chat, cands, val_h, val_hl, ids, 2, -1, batch_size=4)
    assert all(abs(got[k] - want[k]) <= 1e-4 for k in want)


def test_length_batches_cut_sorted_prompts_to_save_padding():
    assert length_batches([5, 1, 5, 1], batch_size=4, overhead=100) == [[1, 3, 0, 2]]  # one forward beats padding
    assert length_batches([5, 1, 5, 1], batch_size=4, overhead=1) == [[1, 3], [0, 2]]
    assert length_batches([3] * 5, batch_size=2, overhead=0) and all(len(g) <= 2 for g in length_batches([3] * 5, 2, 0))
