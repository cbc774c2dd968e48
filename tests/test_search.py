"""The search on the model organism: better than the paper's point, resumable, bounded, exportable."""

import json

import pytest

from conftest import organism_args
from refusal.cli.main import main
from refusal.commands.run import extract, select
from refusal.commands.search import search
from refusal.common.parsing import duration
from refusal.edit.edits import EditParams, Kernel
from refusal.errors import RefusalError
from refusal.search.choice import bisect_front, choose
from refusal.search.trials import anchor_params, refinements, scaled
from refusal.settings import SearchSettings, Settings

SCALES = SearchSettings().refine_scales  # the refinement trials' strength factors


def organism_settings(organism_dir, **search) -> Settings:
    settings = Settings()
    settings.model.model = str(organism_dir)
    settings.data.harmful, settings.data.harmless = str(organism_dir / "harmful.jsonl"), str(organism_dir / "harmless.jsonl")
    settings.data.n_val, settings.data.n_test = 32, 54
    settings.evaluation.max_new_tokens = 16
    for name, value in search.items():
        setattr(settings.search, name, value)
    return settings


@pytest.fixture(scope="module")
def organism_search_run(organism_dir, tmp_path_factory):
    """extract + the paper's selection + a 24-trial search, on the organism (about 30 s)."""
    from refusal.common.progress import set_quiet
    from refusal.model.packaged import load_model

    previous = set_quiet(True)
    try:
        out = tmp_path_factory.mktemp("search") / "run"
        settings = organism_settings(organism_dir, trials=24, time_budget=None, confirm=4)
        extract(settings, out)
        select(out, {})
        result = search(settings, out, export_model_dir=False).search
    finally:
        set_quiet(previous)
    return out, load_model(str(organism_dir), device="cpu"), result, settings


def test_search_beats_the_papers_point(organism_search_run):
    out, chat, result, settings = organism_search_run
    trials = {t["trial"]: t for t in result["trials"]}
    paper = trials[result["paper_trial"]["trial"]]
    assert result["paper_trial"]["what"].startswith("the paper's selection")
    chosen = next(p for p in result["confirmed"] if p["trial"] == result["chosen"]["trial"])
    c = chosen["confirmed"]
    print(
        f"\norganism search: paper point KL {paper['kl']:.4f}; chosen trial {chosen['trial']}: KL {chosen['kl']:.4f}, "
        f"harmful refused {c['harmful_refused']}/{c['harmful_total']}, harmless {c['harmless_refused']}/{c['harmless_total']}"
    )
    assert c["harmful_refused"] <= 0.1 * c["harmful_total"]  # >= 90% of the organism's refusals removed
    assert chosen["kl"] < paper["kl"]
    assert c["harmless_refused"] <= result["harmless_original_refused"]
    saved = json.loads((out / "search.json").read_text())
    assert len(sampled(saved)) == 24 and set(saved["front"]) <= set(trials)


def sampled(result: dict) -> list[dict]:
    """The study's trials before the refinement and second-direction trials (what --trials counts)."""
    return [t for t in result["trials"] if t["role"] not in ("refine", "second")]


def test_refinement_trials_are_stronger_copies_of_low_kl_front_points(organism_search_run):
    out, chat, result, settings = organism_search_run
    trials = {t["trial"]: t for t in result["trials"]}
    refined = [t for t in result["trials"] if t["role"] == "refine"]
    assert refined and len(refined) <= settings.search.refine * len(SCALES)
    assert min(t["trial"] for t in refined) > max(t["trial"] for t in sampled(result))  # they come last
    for t in refined:
        base = trials[t["base"]]
        assert base["role"] != "refine" and base["kl"] <= settings.search.max_kl / 2 and base["refusal"] > settings.search.floor
        assert t["params"] == scaled(EditParams.from_dict(base["params"]), t["scale"]).to_dict()
    assert not refinements(result["trials"], settings.search)  # all done: a resumed study does not repeat them


def test_refinements_pick_the_lowest_refusal_low_kl_front_points_and_skip_done_ones():
    config = SearchSettings(refine=1, max_kl=0.2)  # bases: KL <= 0.1, above the floor -2
    params = EditParams(layer=3.0, attn=Kernel(0.8, 2.0, 3.0, 0.2)).to_dict()
    point = lambda n, refusal, kl, role="sampled": {"trial": n, "refusal": refusal, "kl": kl, "params": params, "role": role}
    records = [point(0, -2.0, 0.5), point(1, -0.2, 0.01), point(2, -0.6, 0.08), point(3, -0.9, 0.15)]
    todo = refinements(records, config)
    assert [(base, factor) for base, factor, _ in todo] == [(2, f) for f in SCALES]
    assert todo[-1][2].attn.peak == pytest.approx(0.8 * SCALES[-1]) and todo[-1][2].attn.floor == pytest.approx(0.2 * SCALES[-1])
    assert todo[-1][2].attn.centre == 2.0 and todo[-1][2].layer == 3.0 and todo[-1][2].mlp.peak == pytest.approx(SCALES[-1])
    done = {**point(4, -0.7, 0.09, "refine"), "base": 2, "scale": SCALES[0]}
    assert [(b, f) for b, f, _ in refinements(records + [done], config)] == [(2, f) for f in SCALES[1:]]
    better = {**point(5, -1.5, 0.05, "refine"), "base": 2, "scale": SCALES[1]}  # dominates its base: the base stays
    assert [(b, f) for b, f, _ in refinements(records + [done, better], config)] == [(2, f) for f in SCALES[2:]]
    assert refinements(records, SearchSettings(refine=0)) == []


def test_cleaned_directions_dominate_the_kernel_search(organism_search_run, organism_dir, tmp_path):
    """Issue 13's search (no cleaning, the log-odds objective, no refinement): the default choice refuses no more at a lower KL."""
    from refusal.common.progress import set_quiet

    cleaned = organism_search_run[2]
    previous = set_quiet(True)
    try:
        kernel_settings = organism_settings(
            organism_dir, trials=24, time_budget=None, confirm=4, protect_prompts=0, refusal_measure="log-odds", refine=0, second=0
        )
        extract(kernel_settings, tmp_path / "run")
        select(tmp_path / "run", {})
        kernel = search(kernel_settings, tmp_path / "run", export_model_dir=False).search
    finally:
        set_quiet(previous)
    assert not (tmp_path / "run" / "protection.safetensors").exists()
    assert all(t["params"]["clean"] is None for t in kernel["trials"])
    assert any(t["params"]["clean"] is not None for t in cleaned["trials"])
    pick = lambda result: next(p for p in result["confirmed"] if p["trial"] == result["chosen"]["trial"])
    new, old = pick(cleaned), pick(kernel)
    print(f"\norganism: kernel search's choice KL {old['kl']:.4f} {old['confirmed']}; cleaned choice KL {new['kl']:.4f} {new['confirmed']}")
    assert new["confirmed"]["harmful_refused"] <= old["confirmed"]["harmful_refused"]
    assert new["kl"] < old["kl"]


def test_the_study_starts_with_the_papers_edit_then_flat_anchors(organism_search_run):
    out, chat, result, settings = organism_search_run
    trials = {t["trial"]: t for t in result["trials"]}
    assert result["paper_trial"]["trial"] == 0 and trials[0]["role"] == "paper"
    anchors = anchor_params(chat.n_layers, SearchSettings())
    assert len(anchors) == 4
    for number, anchor in enumerate(anchors, start=1):
        got = EditParams.from_dict(trials[number]["params"])
        assert got.variant == "projected" and got.layer == anchor.layer and got.clean == 1.0
        assert set(got.attn.strengths(chat.n_layers) + got.mlp.strengths(chat.n_layers)) == {1.0}
    assert all(t["refusal"] >= SearchSettings().floor for t in trials.values())  # per-prompt floor


def test_resumed_search_continues_the_same_study(organism_search_run):
    out, chat, first, settings = organism_search_run
    settings.search.trials, settings.search.confirm = 27, 2  # stopping rule and confirmation: the same study goes on
    more = search(settings, out, export_model_dir=False).search
    numbers = [t["trial"] for t in more["trials"]]
    assert len(sampled(more)) == 27 and len(set(numbers)) == len(numbers)
    before = {t["trial"]: (t["refusal"], t["kl"], t["params"]) for t in first["trials"]}
    after = {t["trial"]: (t["refusal"], t["kl"], t["params"]) for t in more["trials"]}
    assert all(after[n] == before[n] for n in before)  # earlier trials kept, none repeated


def test_time_budget_stops_cleanly_with_the_best_point_so_far(organism_dir, tmp_path):
    out = tmp_path / "run"
    argv = [
        "search",
        *organism_args(organism_dir),
        "--out",
        str(out),
        "--n-val",
        "16",
        "--n-test",
        "16",
        "--max-new-tokens",
        "12",
        "--trials",
        "50",
        "--time-budget",
        "0.5s",
        "--confirm",
        "2",
        "--quiet",
    ]
    assert main(argv) == 0
    result = json.loads((out / "search.json").read_text())
    assert 1 <= len(result["trials"]) < 50 and result["chosen"]["trial"] in result["front"]
    info = json.loads((out / "model" / "refusal.json").read_text())
    assert info["search_trial"]["trial"] == result["chosen"]["trial"] and info["fidelity_max_abs_diff"] < 1e-3
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["search"]["chosen"] == result["chosen"] and "harmful" in report["rates"]["edited"]
    # the report's edited KL is exactly the chosen trial's edit, measured on the test prompts (exported checkpoint vs in memory)
    from refusal.direction.cleaning import Protection
    from refusal.edit.edits import Editor, KernelEdit
    from refusal.model.packaged import load_model
    from refusal.residual.directions import Candidates
    from refusal.residual.scoring import kl_divergence, last_logits, prepare_batches

    chosen = next(t for t in result["trials"] if t["trial"] == result["chosen"]["trial"])
    chat = load_model(str(organism_dir), device="cpu")
    harmless = json.loads((out / "prompts.json").read_text())["prompts"]["harmless"]["test"]
    batches = prepare_batches(chat, harmless, 16)
    before = last_logits(chat, batches)
    protection = Protection.load(out / "protection.safetensors")  # the trials' directions are cleaned against it
    edit = KernelEdit.from_candidates(Candidates.load(out / "candidates.safetensors"), EditParams.from_dict(chosen["params"]), protection)
    with Editor(chat) as editor, editor.applied(edit):
        after = last_logits(chat, batches)
    expected = kl_divergence(before, after).mean().item()
    assert report["kl"]["edited"]["first_token"]["mean"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert 'id="search"' in (out / "report" / "report.html").read_text()


def test_export_any_trial_of_the_front(organism_search_run, tmp_path):
    out, chat, result, settings = organism_search_run
    trial = result["front"][-1]
    assert main(["export", "--run", str(out), "--trial", str(trial), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert json.loads((tmp_path / "m" / "refusal.json").read_text())["search_trial"]["trial"] == trial
    assert main(["export", "--run", str(out), "--trial", "999", "--out", str(tmp_path / "n"), "--quiet"]) == 1
    assert not (tmp_path / "n").exists()


def test_bad_search_options_are_clear_errors(organism_dir, tmp_path, capsys):
    base = ["search", "--model", str(organism_dir), "--out", str(tmp_path / "run"), "--quiet"]
    for extra, message in (
        (["--time-budget=-5m"], "must be positive"),
        (["--time-budget", "soon"], "not a duration"),
        (["--variants", "sideways"], "unknown edit variant sideways"),
        (["--trials", "0"], "--trials must be at least 1"),
        (["--max-kl", "0"], "--max-kl must be a positive KL"),
        (["--max-refused", "2"], "--max-refused must be a fraction"),
        (["--screen-margin", "-0.1"], "--screen-margin must be a margin of at least 0"),
        (["--protect-prompts=-1"], "--protect-prompts must be at least 0"),
    ):
        capsys.readouterr()
        assert main(base + extra) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(RefusalError, match="front is empty"):
        choose([], SearchSettings(), 0)
    assert duration("20m") == 1200 and duration("90s") == 90 and duration("1h") == 3600 and duration("none") is None


def test_bisection_finds_the_lowest_kl_point_that_meets_the_target():
    """16 front points whose refusals fall with KL: 4 confirmations find the first one at 0 refusals."""
    front = [{"trial": i, "kl": 0.01 * (i + 1), "refusal": -i} for i in range(16)]
    refused = [max(0, 11 - i) for i in range(16)]  # first point at 0: index 11

    def confirm(point):
        return {**point, "confirmed": {"harmful_refused": refused[point["trial"]], "harmful_total": 32, "harmless_refused": 0, "harmless_total": 32}}

    config = SearchSettings(confirm=4, max_kl=1.0)
    confirmed = bisect_front(front, config, confirm, harmless_original=1)
    assert len(confirmed) == 4 and [p["trial"] for p in confirmed] == [7, 11, 9, 10]
    chosen, rule = choose(confirmed, config, 1)
    assert chosen["trial"] == 11 and rule.startswith("confirmed: the lowest KL")
    # a looser target (up to 10% refused, i.e. 3 of 32) picks a lower-KL point
    loose = SearchSettings(confirm=4, max_kl=1.0, max_refused=0.1)
    chosen, _ = choose(bisect_front(front, loose, confirm, 1), loose, 1)
    assert chosen["trial"] == 8
    # the KL cap bounds the points considered; nothing meets the target: the fewest refusals
    capped = SearchSettings(confirm=4, max_kl=0.05)
    chosen, rule = choose(bisect_front(front, capped, confirm, 1), capped, 1)
    assert chosen["trial"] == 4 and rule.startswith("fallback, not confirmed")
    # extra harmless refusals disqualify a point
    harmless = lambda p: {**confirm(p), "confirmed": {**confirm(p)["confirmed"], "harmless_refused": 2}}
    assert choose(bisect_front(front, config, harmless, 1), config, 1)[1].startswith("fallback, not confirmed")


def test_the_train_screen_fails_a_point_before_generation_and_counts_in_the_target(monkeypatch):
    """A point whose train screen finds refusals is not generated on and cannot meet the target; one that passes is."""
    from contextlib import nullcontext

    from refusal.search import choice

    class Engine:  # complies with every prompt and counts its generation calls
        calls = 0

        def generate_ids(self, prompts, max_new_tokens, stop=None):
            Engine.calls += 1
            return [[2] for _ in prompts]

        def decode(self, ids):
            return ["Sure" for _ in ids]

    class Editor:
        def applied(self, edit):
            return nullcontext()

    monkeypatch.setattr(choice.KernelEdit, "from_candidates", staticmethod(lambda *args: None))
    point = {"trial": 3, "kl": 0.1, "refusal": -1.0, "params": EditParams(layer=1.0).to_dict()}
    prompts = {"harmful": ["ok a", "ok b"], "harmless": ["ok c"]}
    confirm = lambda screen: choice.confirm_point(Editor(), Engine(), None, point, prompts, 8, ("I'm sorry",), None, screen, 0.0)
    config = SearchSettings()
    failed = confirm(lambda: (2, 192))
    assert Engine.calls == 0 and failed["confirmed"]["harmful_refused"] is None and failed["confirmed"]["train_refused"] == 2
    assert not choice.meets_target(failed, config, 0)
    passed = confirm(lambda: (0, 192))
    assert Engine.calls == 2 and passed["confirmed"] == {
        "harmful_refused": 0,
        "harmful_total": 2,
        "harmless_refused": 0,
        "harmless_total": 1,
        "train_refused": 0,
        "train_total": 192,
    }
    assert choice.meets_target(passed, config, 0)
    loose = SearchSettings(max_refused=0.02)  # 2 of 192 within 2%: generated on, and it meets the target
    assert choice.meets_target(
        choice.confirm_point(Editor(), Engine(), None, point, prompts, 8, ("I'm sorry",), None, lambda: (2, 192), 0.02), loose, 0
    )
    # no point meets the target: the fewest train refusals first (a generated point passed its screen)
    worse = {**failed, "trial": 4, "kl": 0.05, "confirmed": {**failed["confirmed"], "train_refused": 1}}
    refused_val = {**passed, "trial": 5, "kl": 0.2, "confirmed": {**passed["confirmed"], "harmful_refused": 1}}
    chosen, rule = choose([failed, worse, refused_val], config, 0)
    assert chosen["trial"] == 5 and rule.startswith("fallback, not confirmed")


def test_the_train_screen_counts_positive_first_token_margins(tokenizer):
    import torch

    from conftest import build_model
    from refusal.model.chat import wrap_model
    from refusal.residual.scoring import refusal_margin
    from refusal.search.choice import held_out_refusals

    chat = wrap_model(build_model("qwen2", len(tokenizer)), tokenizer, source="tiny")
    prompts = [f"prompt number {i} with {'many ' * i}words" for i in range(12)]
    with torch.no_grad():  # full sequences, one at a time: what greedy decoding's first step reads
        last = torch.stack([chat.model(torch.tensor([chat.encode(p)])).logits[0, -1].float() for p in prompts])
    ids = [int(last[0].argmax())]  # the "refusal token": prompt 0's greedy first token, so at least one prompt counts
    margins = refusal_margin(last, ids)
    assert int((margins > 0).sum()) >= 1
    assert held_out_refusals(chat, prompts, ids, 5)() == (int((margins > 0).sum()), len(prompts), 0.0)
    runner_up = [int(last[0].topk(2).indices[1])]  # a token no prompt starts with: every margin below 0
    below = refusal_margin(last, runner_up)
    ordered = below.sort().values
    buffer = -float(ordered[5] + ordered[6]) / 2  # a buffer between two prompts' margins: it takes in the top half
    assert held_out_refusals(chat, prompts, runner_up, 5)() == (0, len(prompts), 0.0)
    wider = held_out_refusals(chat, prompts, runner_up, 5, margin=buffer)()
    assert wider[:2] == (int((below > -buffer).sum()), len(prompts)) and 0 < wider[0] < len(prompts)


def test_changing_the_protected_prompts_recomputes_them_and_restarts_the_study(organism_dir, tmp_path):
    from refusal.common.progress import set_quiet
    from refusal.direction.cleaning import Protection

    out = tmp_path / "run"
    previous = set_quiet(True)
    try:
        settings = organism_settings(organism_dir, trials=6, time_budget=None, confirm=1, protect_prompts=8)
        settings.data.n_val = 8
        first = search(settings, out, export_model_dir=False).search
        assert Protection.load(out / "protection.safetensors").metadata["n_prompts"] == 8 + 24
        settings.search.protect_prompts = 4
        second = search(settings, out, export_model_dir=False).search
        assert Protection.load(out / "protection.safetensors").metadata["n_prompts"] == 4 + 24
        assert len(sampled(second)) == 6  # a fresh study, not 6 more on top of the first
        assert [t["kl"] for t in second["trials"]] != [t["kl"] for t in first["trials"]]  # other protection, other directions
        settings.search.protect_prompts = 0
        third = search(settings, out, export_model_dir=False).search
        assert len(sampled(third)) == 6 and all(t["params"]["clean"] is None for t in third["trials"])
    finally:
        set_quiet(previous)


def test_streamed_export_of_a_trial_writes_the_loaded_exports_bytes(organism_search_run, tmp_path, monkeypatch):
    import refusal.checkpoint.streaming as streaming

    out, chat, result, settings = organism_search_run
    trial = result["front"][-1]
    assert main(["export", "--run", str(out), "--trial", str(trial), "--out", str(tmp_path / "loaded"), "--quiet"]) == 0
    assert main(["export", "--run", str(out), "--trial", str(trial), "--out", str(tmp_path / "streamed"), "--streaming", "--quiet"]) == 0
    loaded, streamed = (json.loads((tmp_path / d / "refusal.json").read_text()) for d in ("loaded", "streamed"))
    assert "fidelity_max_abs_diff" in loaded and "fidelity_max_abs_diff" not in streamed  # no model in memory: the per-tensor check
    assert streamed["written"]["streamed"] and streamed["written"]["tensor_check_max_residual"] <= 1
    for file in (tmp_path / "loaded").glob("*.safetensors"):
        assert file.read_bytes() == (tmp_path / "streamed" / file.name).read_bytes()
    monkeypatch.setattr(streaming, "available_memory", lambda: 1000)  # a checkpoint larger than half the memory streams by itself
    assert main(["export", "--run", str(out), "--trial", str(trial), "--out", str(tmp_path / "auto"), "--quiet"]) == 0
    assert "fidelity_max_abs_diff" not in json.loads((tmp_path / "auto" / "refusal.json").read_text())


def test_the_reserved_time_follows_the_median_trial_not_a_slow_first_one():
    from refusal.search.trials import reserve_seconds

    trials = [{"seconds": 42.0}, {"seconds": 10.0}, {"seconds": 11.0}, {"seconds": 9.0}]
    assert reserve_seconds(trials[:1], 21) == reserve_seconds(trials[:2], 21) == 0.0  # too few to tell
    assert reserve_seconds(trials, 21) == 21 * 10.5
