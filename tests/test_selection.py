import json

import pytest
import torch

from refusal.activations import mean_activations
from refusal.data import load_builtin
from refusal.directions import compute_candidates
from refusal.errors import RefusalError
from refusal.selection import score_candidates, select_direction
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
