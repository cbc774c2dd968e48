"""The search on the model organism: better than the paper's point, resumable, bounded, exportable."""

import json

import pytest

from conftest import organism_args
from refusal.cli import main
from refusal.edits import EditParams
from refusal.errors import RefusalError
from refusal.parsing import duration
from refusal.pipeline import extract, select
from refusal.search import anchor_params, choose
from refusal.search_run import search
from refusal.settings import SearchSettings, Settings


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
    from refusal.models import load_model
    from refusal.progress import set_quiet

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
    assert len(saved["trials"]) == 24 and set(saved["front"]) <= set(trials)


def test_the_study_starts_with_the_papers_edit_then_flat_anchors(organism_search_run):
    out, chat, result, settings = organism_search_run
    trials = {t["trial"]: t for t in result["trials"]}
    assert result["paper_trial"]["trial"] == 0 and trials[0]["role"] == "paper"
    anchors = anchor_params(chat.n_layers, SearchSettings())
    assert len(anchors) == 4
    for number, anchor in enumerate(anchors, start=1):
        got = EditParams.from_dict(trials[number]["params"])
        assert got.variant == "biprojected" and got.layer == anchor.layer
        assert set(got.attn.strengths(chat.n_layers) + got.mlp.strengths(chat.n_layers)) == {1.0}
    assert all(t["refusal"] >= SearchSettings().refusal_floor for t in trials.values())  # per-prompt floor


def test_resumed_search_continues_the_same_study(organism_search_run):
    out, chat, first, settings = organism_search_run
    settings.search.trials, settings.search.confirm = 27, 2  # stopping rule and confirmation: the same study goes on
    more = search(settings, out, export_model_dir=False).search
    numbers = [t["trial"] for t in more["trials"]]
    assert len(numbers) == 27 and len(set(numbers)) == 27
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
    from refusal.cleaning import Protection
    from refusal.directions import Candidates
    from refusal.edits import Editor, KernelEdit
    from refusal.models import load_model
    from refusal.scoring import kl_divergence, last_logits, prepare_batches

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
    ):
        capsys.readouterr()
        assert main(base + extra) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(RefusalError, match="front is empty"):
        choose([], SearchSettings(), 0)
    assert duration("20m") == 1200 and duration("90s") == 90 and duration("1h") == 3600 and duration("none") is None
