import math

import pytest
import torch

from conftest import build_model
from refusal.data.prompt_sets import load_self_questions
from refusal.edit.edits import EditParams, Kernel, KernelEdit, edited
from refusal.errors import RefusalError
from refusal.model.chat import wrap_model
from refusal.search.second_direction import plan, second_base, second_params
from refusal.settings import SearchSettings

DEFAULTS = SearchSettings()
SCREEN_FRACTIONS, SCREEN_STRENGTH = DEFAULTS.second_fractions, DEFAULTS.second_screen_strength
FOLLOW_STRENGTHS, BASE_KL_FRACTION = DEFAULTS.second_strengths, DEFAULTS.second_base_kl_fraction


def trials(n: int, max_kl: float = math.inf) -> SearchSettings:
    """The default plan's settings with ``n`` second-direction trials and a KL cap (none by default)."""
    return SearchSettings(second=n, max_kl=max_kl)


def point(trial, refusal, kl, role="sampled"):
    return {"trial": trial, "refusal": refusal, "kl": kl, "role": role, "params": EditParams(layer=1.0).to_dict(), "seconds": 1.0}


def test_the_plan_screens_layers_then_follows_the_best_one():
    screen = [(f, SCREEN_STRENGTH) for f in SCREEN_FRACTIONS]
    n = len(screen)
    assert n >= 2 and plan([], trials(8)) == screen and plan([], trials(1)) == screen[:1] and plan([], trials(0)) == []
    best_index = n - 1
    done = [{**point(10 + k, -1.0 - (k == best_index), 0.1, "second"), "fraction": f, "strength": s} for k, (f, s) in enumerate(screen)]
    assert plan(done[:1], trials(8)) == screen[1:]  # the screen first
    best = SCREEN_FRACTIONS[best_index]  # the lowest refusal score
    assert plan(done, trials(8)) == [(best, s) for s in FOLLOW_STRENGTHS]
    assert plan(done, trials(n + 1)) == [(best, FOLLOW_STRENGTHS[0])] and plan(done, trials(n)) == []
    followed = {**point(20, -1.5, 0.1, "second"), "fraction": best, "strength": FOLLOW_STRENGTHS[0]}
    assert plan([*done, followed], trials(8)) == [(best, s) for s in FOLLOW_STRENGTHS[1:]]  # done ones are not repeated


def test_the_plan_counts_only_the_trials_on_its_base():
    screen = [(f, SCREEN_STRENGTH) for f in SCREEN_FRACTIONS]
    done = [{**point(10 + k, -1.0, 0.1, "second"), "fraction": f, "strength": s, "base": 3} for k, (f, s) in enumerate(screen)]
    assert plan(done, trials(8), base=3)[0][1] == FOLLOW_STRENGTHS[0]  # the screen on base 3 is done
    assert plan(done, trials(8), base=5) == screen  # a resumed study whose base changed screens again
    assert plan(done, trials(8)) == plan(done, trials(8), base=3)  # no base given: every second-direction trial counts


def test_the_plan_follows_the_best_layer_within_the_kl_cap():
    screen = [(f, SCREEN_STRENGTH) for f in SCREEN_FRACTIONS]
    kls = [0.15, 0.3]  # the deeper layer refuses less but costs more than the cap
    done = [{**point(10 + k, -1.0 - 0.1 * k, kls[k], "second"), "fraction": f, "strength": s} for k, (f, s) in enumerate(screen)]
    assert plan(done, trials(8, 0.2)) == [(SCREEN_FRACTIONS[0], s) for s in FOLLOW_STRENGTHS]
    assert plan(done, trials(8))[0][0] == SCREEN_FRACTIONS[1]  # no cap: the lowest refusal score
    assert plan(done, trials(8, 0.1))[0][0] == SCREEN_FRACTIONS[0]  # none within: the lowest KL


def test_the_base_is_the_lowest_refusal_low_kl_front_point_above_the_floor():
    config = SearchSettings(max_kl=0.3)
    cap = BASE_KL_FRACTION * config.max_kl  # 0.1
    records = [point(0, 0.5, 0.0), point(1, -1.0, 0.05), point(2, -1.5, 0.09), point(3, -1.9, cap + 0.01), point(4, -2.0, 0.095, "refine")]
    assert second_base(records, config)["trial"] == 2  # 3: KL above the base's cap; 4: at the floor
    records.append({**point(5, -1.8, 0.02, "second")})  # second-direction trials never become the base
    assert second_base(records, config)["trial"] == 2
    assert second_base([point(0, 0.5, 0.5)], config) is None


def test_a_second_direction_at_strength_one_with_flat_base_is_projection_off_both(tokenizer):
    chat = wrap_model(build_model("llama", len(tokenizer)), tokenizer, source="tiny")
    u1 = torch.nn.functional.normalize(torch.randn(chat.d_model), dim=0)
    r2 = torch.randn(chat.d_model)
    params = second_params(EditParams(layer=1.0, attn=Kernel(1.0), mlp=Kernel(1.0)), r2, 0.6, 1.0, {"refusing": 3})
    assert EditParams.from_dict(params.to_dict()) == params and params.second["refusing"] == 3
    edit = KernelEdit(u1, params)
    u2 = edit.second
    assert abs(float(u2 @ u1)) < 1e-6 and abs(float(u2.norm()) - 1) < 1e-6
    basis = torch.stack([u1, u2], 1)  # [d, 2], orthonormal
    writer = chat.writers[0]
    before = writer.weight.detach().clone()
    with edited(chat, edit):
        after = writer.weight.detach().clone()
    assert torch.allclose(after, before - basis @ (basis.T @ before), atol=1e-5)
    assert torch.equal(writer.weight, before)  # reverted


def test_second_directions_on_the_organism_separate_still_refused_from_complied(organism_dir):
    from refusal.data.prompt_sets import load_prompts
    from refusal.model.packaged import load_model
    from refusal.residual.activations import mean_activations
    from refusal.residual.directions import compute_candidates
    from refusal.search.second_direction import second_directions

    chat = load_model(str(organism_dir), device="cpu")
    harmful, harmless = load_prompts(str(organism_dir / "harmful.jsonl"))[:60], load_prompts(str(organism_dir / "harmless.jsonl"))[:60]
    cands = compute_candidates(mean_activations(chat, harmful, 32), mean_activations(chat, harmless, 32))
    ids = chat.refusal_token_ids()
    strong = KernelEdit.from_candidates(cands, EditParams(layer=chat.n_layers / 2, attn=Kernel(0.95), mlp=Kernel(0.95)))
    directions, counts = second_directions(chat, strong, harmful, ids, 32, list(SCREEN_FRACTIONS), "refused")
    assert counts["train"] == 60 and counts["refusing"] >= 2 and counts["complying"] >= 2  # a mix: directions made
    assert set(directions) == set(SCREEN_FRACTIONS) and all(v.shape == (chat.d_model,) and torch.isfinite(v).all() for v in directions.values())
    again, _ = second_directions(chat, strong, harmful, ids, 32, list(SCREEN_FRACTIONS), "refused")
    assert all(torch.equal(directions[f], again[f]) for f in directions)  # deterministic: a resumed study finds the same
    weak = KernelEdit.from_candidates(cands, EditParams(layer=chat.n_layers / 2, attn=Kernel(0.2), mlp=Kernel(0.2)))
    assert second_directions(chat, weak, harmful, ids, 32, list(SCREEN_FRACTIONS), "refused")[0] == {}  # all still refused: none
    # the default source: the built-in self questions against harmless train prompts, under the same base
    disclaimer, counts = second_directions(chat, strong, harmful, ids, 32, list(SCREEN_FRACTIONS), "disclaimer", harmless)
    assert counts["source"] == "disclaimer" and counts["questions"] == len(load_self_questions()) and counts["harmless"] == 60
    unedited = mean_activations(chat, load_self_questions(), 32)[:, -1] - mean_activations(chat, harmless, 32)[:, -1]
    with edited(chat, strong):
        expected = mean_activations(chat, load_self_questions(), 32)[:, -1] - mean_activations(chat, harmless, 32)[:, -1]
    for f, v in disclaimer.items():
        layer = round(f * chat.n_layers)
        assert torch.allclose(v, expected[layer].float(), atol=1e-5)
        assert not torch.allclose(v, directions[f])  # another direction than the refused-vs-complied one
        assert not torch.allclose(v, unedited[layer].float(), atol=1e-3)  # read under the base edit
    with pytest.raises(RefusalError, match="unknown second-direction source"):
        second_directions(chat, strong, harmful, ids, 32, list(SCREEN_FRACTIONS), "other", harmless)


def test_the_self_questions_are_distinct_questions():
    questions = load_self_questions()
    assert len(questions) == 48 and len(set(questions)) == 48 and all(q.endswith("?") for q in questions)


def test_search_runs_records_and_exports_second_direction_trials(organism_dir, tmp_path, monkeypatch):
    """The search's own path for second-direction trials (the organism's best points leave no train prompt refused,
    so the trial comes from a stub): run last, recorded with their role, exported with the fidelity check."""
    import refusal.commands.search as search_run
    from refusal.commands.run import export_run, extract, select
    from refusal.common.progress import set_quiet
    from test_search import organism_settings

    calls = []

    def stub(chat, cands, protection, records, config, *args):
        calls.append(len(records))
        if any(r["role"] == "second" for r in records):
            return []
        base = min((r for r in records if r["role"] != "second"), key=lambda r: r["refusal"])
        params = second_params(EditParams.from_dict(base["params"]), torch.randn(chat.d_model), 0.6, 0.5, {"refusing": 2})
        return [({"base": base["trial"], "fraction": 0.6, "strength": 0.5}, params)]

    monkeypatch.setattr(search_run, "second_trials", stub)
    previous = set_quiet(True)
    try:
        out = tmp_path / "run"
        settings = organism_settings(organism_dir, trials=4, time_budget=None, confirm=1, refine=0, second=1)
        settings.data.n_val = 8
        extract(settings, out)
        select(out, {})
        result = search_run.search(settings, out, export_model_dir=False).search
        seconds = [t for t in result["trials"] if t["role"] == "second"]
        assert len(seconds) == 1 and seconds[0]["trial"] == max(t["trial"] for t in result["trials"])  # run last
        assert seconds[0]["fraction"] == 0.6 and seconds[0]["params"]["second"]["strength"] == 0.5 and len(calls) == 2
        info = export_run(out, tmp_path / "edited", trial=seconds[0]["trial"])
        assert info["fidelity_max_abs_diff"] < 1e-3
        again = search_run.search(settings, out, export_model_dir=False).search  # resumed: nothing is repeated
        assert [t["trial"] for t in again["trials"]] == [t["trial"] for t in result["trials"]]
    finally:
        set_quiet(previous)


def test_second_directions_are_cleaned_like_the_base():
    from refusal.direction.cleaning import Protection
    from refusal.search.second_direction import cleaned

    acts = torch.randn(20, 5, 1, 16, generator=torch.Generator().manual_seed(0))  # [prompts, layers + 1, positions, d_model]
    protection = Protection(acts, [-1])
    directions = {0.5: torch.randn(16), 0.75: torch.randn(16)}
    assert cleaned(directions, EditParams(layer=2.0), protection, 4) is directions  # the base is not cleaned
    assert cleaned(directions, EditParams(layer=2.0, clean=1.0), None, 4) is directions
    out = cleaned(directions, EditParams(layer=2.0, clean=1.0), protection, 4)
    for f, v in directions.items():
        assert torch.allclose(out[f], protection.clean(v, f * 4, -1, 1.0)) and not torch.allclose(out[f], v)
