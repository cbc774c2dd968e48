"""The run directory contract: every reused artifact belongs to the same inputs, or it is recomputed or refused."""

import json
import os
import re
import shutil

import pytest

from conftest import error_line, save_tiny
from refusal.cli.main import main

FAST = ["--n-train", "12", "--n-val", "6", "--n-test", "4", "--max-new-tokens", "4", "--ce-tokens", "64", "--quiet"]
# no refinement or second direction: exact trial counts
SEARCH = ["--refine", "0", "--second", "0", "--trials", "3", "--anchors", "0.5", "--confirm", "1", "--time-budget", "none"]


def stamps(run):
    """Modification time of every artifact's first file (None when absent)."""
    names = {
        "candidates": "candidates.safetensors",
        "selection": "selection.json",
        "model": "model/model.safetensors",
        "report": "report/report.json",
        "search": "search.journal",
    }
    return {k: (run / v).stat().st_mtime_ns if (run / v).exists() else None for k, v in names.items()}


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny(tmp_path / "qwen2")


@pytest.fixture
def finished(model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--out", str(out), *FAST]) == 0
    return out


def test_an_unchanged_rerun_recomputes_nothing(finished, model_dir):
    before = stamps(finished)
    assert main(["run", "--model", str(model_dir), "--out", str(finished), *FAST]) == 0
    assert stamps(finished) == before


def test_a_changed_setting_recomputes_exactly_what_depends_on_it(finished, model_dir):
    before = stamps(finished)
    assert main(["run", "--model", str(model_dir), "--out", str(finished), *FAST[:-1], "--n-test", "3", "--quiet"]) == 0
    after = stamps(finished)
    assert [k for k in before if before[k] != after[k]] == ["report"]  # the test split feeds only the report
    assert main(["run", "--model", str(model_dir), "--out", str(finished), *FAST[:-1], "--n-test", "3", "--kl-threshold", "5", "--quiet"]) == 0
    again = stamps(finished)
    assert [k for k in after if after[k] != again[k]] == ["selection", "model", "report"]
    assert json.loads((finished / "selection.json").read_text())["settings"]["kl_threshold"] == 5


def test_a_replaced_model_is_refused_by_readers_and_recomputed_by_run(finished, model_dir, tmp_path, capsys):
    old = json.loads((finished / "run.json").read_text())["model"]["sha256"]
    shutil.rmtree(model_dir)
    save_tiny(model_dir, seed=1)
    err = error_line(capsys, ["export", "--run", str(finished), "--out", str(tmp_path / "x"), "--quiet"])
    assert re.search(r"candidates\.safetensors is stale.*re-run `refusal run", err) and not (tmp_path / "x").exists()
    before = stamps(finished)
    assert main(["run", "--model", str(model_dir), "--out", str(finished), *FAST]) == 0
    after = stamps(finished)
    assert all(after[k] != before[k] for k in ("candidates", "selection", "model", "report"))
    assert json.loads((finished / "run.json").read_text())["model"]["sha256"] != old
    assert json.loads((finished / "model" / "refusal.json").read_text())["source_model"]["sha256"] != old


def test_an_edited_prompt_file_is_noticed(model_dir, tmp_path):
    prompts = tmp_path / "harmful.txt"
    from refusal.data.prompt_sets import load_builtin

    prompts.write_text("\n".join(load_builtin("harmful")[:40]))
    out = tmp_path / "run"
    argv = ["extract", "--model", str(model_dir), "--harmful", str(prompts), "--out", str(out), *FAST]
    assert main(argv) == 0
    first = (out / "candidates.safetensors").stat().st_mtime_ns
    assert main(argv) == 0 and (out / "candidates.safetensors").stat().st_mtime_ns == first
    prompts.write_text("\n".join(load_builtin("harmful")[40:80]))
    assert main(argv) == 0 and (out / "candidates.safetensors").stat().st_mtime_ns != first


def test_a_run_read_from_another_directory_uses_the_same_files(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(model_dir.parent)
    assert main(["extract", "--model", model_dir.name, "--out", "run", *FAST]) == 0
    settings = json.loads((model_dir.parent / "run" / "run.json").read_text())["settings"]
    assert settings["model"]["model"] == str(model_dir.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["select", "--run", str(model_dir.parent / "run"), "--layers", "1", "--quiet"]) == 0


def test_a_stale_format_version_is_refused(finished, capsys):
    info = json.loads((finished / "run.json").read_text())
    info["format_version"] = "1"
    (finished / "run.json").write_text(json.dumps(info))
    err = error_line(capsys, ["select", "--run", str(finished), "--quiet"])
    assert "format version '1', this refusal reads version '2'" in err


def test_a_foreign_run_json_is_refused(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    err = error_line(capsys, ["run", "--model", str(model_dir), "--out", str(out), *FAST])
    assert "is not a refusal run file" in err and (out / "run.json").read_text() == "{}"


def test_overwrite_removes_every_artifact_and_dead_partials(finished, model_dir):
    partial = finished / ".model.partial-999999"
    partial.mkdir()
    (partial / "model.safetensors").write_text("half")
    (finished / "notes.txt").write_text("mine")
    assert main(["run", "--model", str(model_dir), "--out", str(finished), "--no-export", "--overwrite", *FAST]) == 0
    assert not (finished / "model").exists() and not partial.exists() and (finished / "notes.txt").exists()


def test_search_overwrite_with_a_changed_model_starts_a_fresh_study(model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["search", "--model", str(model_dir), "--out", str(out), *FAST, *SEARCH]) == 0
    first = json.loads((out / "search.json").read_text())
    assert len(first["trials"]) == 3
    shutil.rmtree(model_dir)
    save_tiny(model_dir, seed=1)
    assert main(["search", "--model", str(model_dir), "--out", str(out), "--overwrite", *FAST, *SEARCH]) == 0
    second = json.loads((out / "search.json").read_text())
    assert len(second["trials"]) == 3 and [t["kl"] for t in second["trials"]] != [t["kl"] for t in first["trials"]]


def test_search_with_a_changed_trial_setting_starts_a_fresh_study_but_more_trials_resume(model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["search", "--model", str(model_dir), "--out", str(out), "--no-export", *FAST, *SEARCH]) == 0
    first = json.loads((out / "search.json").read_text())["trials"]
    assert (
        main(["search", "--model", str(model_dir), "--out", str(out), "--no-export", *FAST, *SEARCH[:-4], "--trials", "4", "--time-budget", "none"])
        == 0
    )
    resumed = json.loads((out / "search.json").read_text())["trials"]
    assert len(resumed) == 4 and resumed[:3] == first
    assert main(["search", "--model", str(model_dir), "--out", str(out), "--no-export", *FAST, *SEARCH, "--refusal-floor", "-1.5"]) == 0
    fresh = json.loads((out / "search.json").read_text())["trials"]
    assert len(fresh) == 3 and all(t["refusal"] >= -1.5 for t in fresh)


def test_a_search_killed_during_the_papers_trial_scores_it_on_resume(model_dir, tmp_path, monkeypatch):
    import refusal.search.trials as search_module

    out = tmp_path / "run"
    calls = {"n": 0}
    measure = search_module.Objectives.measure

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return measure(self)

    monkeypatch.setattr(search_module.Objectives, "measure", interrupted)
    assert main(["search", "--model", str(model_dir), "--out", str(out), "--no-export", *FAST, *SEARCH]) == 130
    monkeypatch.setattr(search_module.Objectives, "measure", measure)
    assert main(["search", "--model", str(model_dir), "--out", str(out), "--no-export", *FAST, *SEARCH]) == 0
    result = json.loads((out / "search.json").read_text())
    paper = [t for t in result["trials"] if t["role"] == "paper"]
    assert len(paper) == 1 and result["paper_trial"]["trial"] == paper[0]["trial"] != 0
    assert {k: paper[0]["params"][k] for k in ("variant",)} == {"variant": "projection"}
    assert paper[0]["params"]["attn"]["peak"] == 1.0 and paper[0]["params"]["attn"]["width"] is None


def test_evaluate_refuses_a_run_of_another_model(finished, tmp_path, capsys):
    other = save_tiny(tmp_path / "other", family="llama", seed=3)
    err = error_line(capsys, ["evaluate", "--model", str(other), "--ablate", str(finished), "--out", str(tmp_path / "rep"), *FAST])
    assert "was made on another model" in err and not (tmp_path / "rep").exists()


def test_export_never_writes_into_a_symlinked_source(tmp_path, capsys):
    blobs = tmp_path / "blobs"
    save_tiny(blobs)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in blobs.iterdir():
        os.symlink(f, snapshot / f.name)
    before = {f.name: f.read_bytes() for f in blobs.iterdir()}
    out = tmp_path / "run"
    assert main(["run", "--model", str(snapshot), "--out", str(out), "--no-export", *FAST]) == 0
    err = error_line(capsys, ["export", "--run", str(out), "--out", str(blobs), "--overwrite", "--quiet"])
    assert "overlaps the source model" in err
    assert {f.name: f.read_bytes() for f in blobs.iterdir()} == before


def test_an_artifact_file_of_another_format_version_is_refused(finished, model_dir, capsys):
    selection = json.loads((finished / "selection.json").read_text())
    selection["format_version"] = "0"
    (finished / "selection.json").write_text(json.dumps(selection))
    err = error_line(capsys, ["run", "--model", str(model_dir), "--out", str(finished), *FAST])
    assert "selection.json has format version '0', this refusal reads version '1'" in err
