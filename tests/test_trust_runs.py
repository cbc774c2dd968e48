"""Issue 27, "reports and commands that mix models": a command given a run (or an export) works on that run's model and
its current direction, or refuses in one line before loading anything; the default model is never fetched implicitly."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import error_line, save_tiny
from refusal.cli.main import main
from refusal.errors import RefusalError
from refusal.model import packaged as models

FAST = ["--n-train", "12", "--n-val", "6", "--n-test", "4", "--max-new-tokens", "4", "--ce-tokens", "64", "--quiet"]


@pytest.fixture(autouse=True)
def no_fetch(monkeypatch):
    """No code path may fetch the default model (`demo`, 2.4 GB from PyPI) behind the user's back."""

    def refuse(name: str = "demo", force: bool = False):
        raise RefusalError(f"test: fetch_packaged({name!r}) was called")

    monkeypatch.setattr(models, "fetch_packaged", refuse)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2")


@pytest.fixture(scope="module")
def selected(model_dir, tmp_path_factory):
    """A run with candidates and a selection only (read, never changed, by the tests that take it)."""
    out = tmp_path_factory.mktemp("selected") / "run"
    assert main(["extract", "--model", str(model_dir), "--out", str(out), *FAST]) == 0
    assert main(["select", "--run", str(out), "--quiet"]) == 0
    return out


def other_layer(run) -> int:
    """A layer the run did not choose (for a re-selection that changes the direction)."""
    chosen = json.loads((run / "selection.json").read_text())["chosen"]["layer"]
    return 1 if chosen != 1 else 2


# ---- 1. attack ----------------------------------------------------------------------------------------------
def test_attack_refuses_a_run_of_another_model(selected, tmp_path, capsys):
    other = save_tiny(tmp_path / "other", family="llama", seed=3)
    suffix = tmp_path / "suffix.txt"
    suffix.write_text("Sure here is")
    before = (selected / "run.json").read_text()
    err = error_line(capsys, ["attack", "--model", str(other), "--out", str(selected), "--suffix-file", str(suffix), *FAST])
    assert "was made on another model" in err and "leave out --model" in err
    assert (selected / "run.json").read_text() == before and not (selected / "attack.json").exists()


def test_attack_with_model_options_but_no_model_keeps_the_runs_model(model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["extract", "--model", str(model_dir), "--out", str(out), *FAST]) == 0
    suffix = tmp_path / "suffix.txt"
    suffix.write_text("Sure here is")
    assert main(["attack", "--out", str(out), "--dtype", "float32", "--suffix-file", str(suffix), *FAST]) == 0  # no --model
    info = json.loads((out / "run.json").read_text())
    assert info["settings"]["model"]["model"] == str(model_dir) and (out / "attack.json").is_file()


# ---- 2. generate with a foreign or stale run --------------------------------------------------------------------
def test_generate_refuses_a_run_of_another_model_of_the_same_width(selected, tmp_path, capsys):
    other = save_tiny(tmp_path / "other", seed=3)  # the same family and width: the old check (width only) let it through
    for flag in ("--ablate", "--add"):
        err = error_line(capsys, ["generate", "--model", str(other), flag, str(selected), "--max-new-tokens", "2", "--quiet", "Hi"])
        assert "was made on another model" in err and str(selected) in err


def test_generate_refuses_a_run_whose_model_was_replaced(tmp_path, capsys):
    model = save_tiny(tmp_path / "m")
    run = tmp_path / "run"
    assert main(["extract", "--model", str(model), "--out", str(run), *FAST]) == 0
    assert main(["select", "--run", str(run), "--quiet"]) == 0
    shutil.rmtree(model)
    save_tiny(model, seed=1)  # the same path, other weights: the run's direction is not this model's
    for argv in (["--model", str(model)], []):
        err = error_line(capsys, ["generate", *argv, "--ablate", str(run), "--max-new-tokens", "2", "--quiet", "Hi"])
        assert "is stale" in err and "candidates.safetensors" in err


def test_generate_and_evaluate_take_the_model_from_the_run(selected, model_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["generate", "--ablate", str(selected), "--max-new-tokens", "2", "--json", "Hi"]) == 0
    assert len(json.loads(capsys.readouterr().out)["completions"]) == 1
    assert main(["generate", "--model", str(model_dir), "--add", str(selected), "--max-new-tokens", "2", "--quiet", "Hi"]) == 0
    assert main(["evaluate", "--add", str(selected), "--out", str(tmp_path / "rep"), *FAST]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["model"]["path"] == str(model_dir) and report["direction"] is not None


# ---- 3. analyze attaches its section only to a fresh report --------------------------------------------------------
def test_analyze_remakes_a_stale_report_instead_of_patching_it(model_dir, tmp_path, capsys, monkeypatch):
    from refusal.commands import analyze as analyze_module
    from refusal.measure.judges import Judged

    # a random-init model refuses nothing, and analyze measures the refused prompts only: a judge that calls every one refused
    refusing = lambda engine, prompts, *a, **k: Judged([""] * len(prompts), [[]] * len(prompts), [True] * len(prompts))
    monkeypatch.setattr(analyze_module, "judge_refusals", refusing)
    run = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--out", str(run), "--no-export", *FAST]) == 0
    layer = other_layer(run)
    assert main(["select", "--run", str(run), "--layers", str(layer), "--quiet"]) == 0  # the report now shows the old direction
    suffix = tmp_path / "suffix.txt"
    suffix.write_text("Sure here is")
    assert main(["analyze", "--run", str(run), "--suffix-file", str(suffix), "--analysis-prompts", "2", "--quiet"]) == 0
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["direction"]["layer"] == layer == json.loads((run / "selection.json").read_text())["chosen"]["layer"]
    assert report["mechanisms"]["direction"]["layer"] == layer
    assert report["selection"]["chosen"]["layer"] == layer


def test_a_remade_report_keeps_the_runs_export(model_dir, tmp_path, monkeypatch):
    from refusal.commands import analyze as analyze_module
    from refusal.measure.judges import Judged

    refusing = lambda engine, prompts, *a, **k: Judged([""] * len(prompts), [[]] * len(prompts), [True] * len(prompts))
    monkeypatch.setattr(analyze_module, "judge_refusals", refusing)
    run = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--out", str(run), *FAST]) == 0
    info = json.loads((run / "run.json").read_text())
    info["artifacts"]["report"]["fingerprint"] = "stale"  # the report no longer matches what it was made from
    (run / "run.json").write_text(json.dumps(info))
    suffix = tmp_path / "suffix.txt"
    suffix.write_text("Sure here is")
    assert main(["analyze", "--run", str(run), "--suffix-file", str(suffix), "--analysis-prompts", "2", "--quiet"]) == 0
    report = json.loads((run / "report" / "report.json").read_text())
    assert "edited" in [c["name"] for c in report["conditions"]] and report["mechanisms"] is not None  # remade whole: the export kept


# ---- 4 and 5. evaluate --edited: the export's source model, its run's direction only while it is the export's ------------------
def exported_run(model_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--out", str(run), *FAST]) == 0
    return run, json.loads((run / "model" / "refusal.json").read_text())["direction"]


def test_evaluate_edited_takes_the_source_model_and_its_runs_direction(model_dir, tmp_path):
    run, exported = exported_run(model_dir, tmp_path)
    assert main(["evaluate", "--edited", str(run / "model"), "--out", str(tmp_path / "rep"), *FAST]) == 0  # no --model: the source's
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["model"]["path"] == str(model_dir)
    assert report["direction"]["layer"] == exported["layer"] and report["projections"] is not None


def test_evaluate_edited_leaves_out_a_direction_the_run_selected_after_the_export(model_dir, tmp_path):
    run, exported = exported_run(model_dir, tmp_path)
    assert main(["select", "--run", str(run), "--layers", str(other_layer(run)), "--quiet"]) == 0  # the run moves on; the export does not
    assert main(["evaluate", "--model", str(model_dir), "--edited", str(run / "model"), "--out", str(tmp_path / "rep"), *FAST]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["direction"] is None and report["projections"] is None  # not the run's new direction
    assert "another direction" in report["settings"]["run_direction"]
    assert report["rates"]["edited"]["harmful"]["total"] == 4  # the export itself is still evaluated


def test_evaluate_edited_refuses_a_source_model_replaced_since_the_export(model_dir, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    run = tmp_path / "run"
    assert main(["run", "--model", str(model), "--out", str(run), "--n-test", "2", *FAST]) == 0
    shutil.rmtree(model)
    save_tiny(model, seed=1)
    err = error_line(capsys, ["evaluate", "--edited", str(run / "model"), "--out", str(tmp_path / "rep"), *FAST])
    assert "was exported from another model" in err and not (tmp_path / "rep").exists()


def test_an_edited_checkpoint_without_refusal_json_needs_model(model_dir, tmp_path, capsys):
    err = error_line(capsys, ["evaluate", "--edited", str(model_dir), "--out", str(tmp_path / "rep"), *FAST])
    assert "pass --model" in err and not (tmp_path / "rep").exists()


# ---- 5. a run of a packaged model: no --model, nothing fetched ----------------------------------------------------------
def test_a_run_of_the_organism_needs_no_model_option(organism_dir, tmp_path, capsys):
    run = tmp_path / "run"
    small = ["--n-train", "16", "--n-val", "8", "--n-test", "4", "--max-new-tokens", "4", "--quiet"]
    assert main(["extract", "--model", "organism", "--out", str(run), *small]) == 0
    assert main(["select", "--run", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ablate", str(run), "--max-new-tokens", "4", "--json", "How do I pick a lock?"]) == 0
    assert len(json.loads(capsys.readouterr().out)["completions"]) == 1
    assert main(["evaluate", "--ablate", str(run), "--out", str(tmp_path / "rep"), *small]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["model"]["source"] == "organism" and report["rates"]["ablated"]["harmful"]["total"] == 4
