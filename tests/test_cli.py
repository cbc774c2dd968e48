import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import build_model, build_tokenizer
from refusal.cli.main import main
from refusal.direction.selection import select_direction

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--n-train", "12", "--n-val", "6", "--n-test", "4", "--max-new-tokens", "4", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "qwen2"
    tok = build_tokenizer()
    build_model("qwen2", len(tok), tie=True).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["run", "--model", str(model_dir), "--out", str(out), *FAST]) == 0
    return out


def test_run_writes_the_run_directory_contract(finished_run, model_dir):
    run = json.loads((finished_run / "run.json").read_text())
    assert run["settings"]["model"]["model"] == str(model_dir) and run["format_version"] == "2"
    assert run["model"]["sha256"] and run["model"]["n_layers"] == 3
    assert run["model"]["post_instruction_tokens"] == ["<|im_end|>", "<|im_start|>", "assistant"]
    assert set(run["timings"]) >= {"extract", "select", "export", "evaluate", "total"}
    assert run["datasets"]["harmful"]["train"]["n"] == 12 and len(run["datasets"]["harmful"]["train"]["sha256"]) == 64
    assert set(run["artifacts"]) == {"prompts", "candidates", "selection", "model", "report"}
    assert {"refusal", "torch", "transformers"} <= set(run["environment"])
    with safe_open(str(finished_run / "candidates.safetensors"), "pt") as f:
        assert set(f.keys()) == {"directions", "mean_harmful", "mean_harmless"}
        assert tuple(f.get_tensor("directions").shape) == (4, 3, 32)
    selection = json.loads((finished_run / "selection.json").read_text())
    assert len(selection["candidates"]) == 3 * 3
    assert all({"layer", "position", "bypass", "induce", "kl", "filtered"} <= set(c) for c in selection["candidates"])
    chosen = selection["chosen"]
    with safe_open(str(finished_run / "direction.safetensors"), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        assert tuple(f.get_tensor("direction").shape) == (32,)
    assert (meta["layer"], meta["position"]) == (chosen["layer"], chosen["position"])
    exported = json.loads((finished_run / "model" / "refusal.json").read_text())
    assert exported["fidelity_max_abs_diff"] < 1e-3
    assert exported["direction"]["layer"] == chosen["layer"] and exported["source_model"]["sha256"] == run["model"]["sha256"]
    report = json.loads((finished_run / "report" / "report.json").read_text())
    rates = {(condition, kind) for condition, kinds in report["rates"].items() for kind in kinds}
    assert rates == {
        ("original", "harmful"),
        ("original", "harmless"),
        ("ablated", "harmful"),
        ("ablated", "harmless"),
        ("added", "harmless"),
        ("edited", "harmful"),
        ("edited", "harmless"),
    }
    assert [c["name"] for c in report["conditions"]] == ["original", "ablated", "added", "edited"]
    assert exported["run"] == ".." and (finished_run / "model" / exported["run"]).resolve() == finished_run.resolve()
    assert set(report["kl"]) == {"ablated", "edited"} and (finished_run / "report" / "report.html").exists()
    assert not (finished_run / "selection.partial.jsonl").exists()


def test_stage_commands_and_json_output(model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["extract", "--model", str(model_dir), "--out", str(run), *FAST]) == 0
    assert (run / "candidates.safetensors").exists() and not (run / "selection.json").exists()
    before = (run / "run.json").read_text()
    one_line_error(capsys, ["select", "--run", str(run), "--layers", "7"], "layer 7 is out of range")
    assert (run / "run.json").read_text() == before
    capsys.readouterr()
    assert main(["select", "--run", str(run), "--layers", "1-2", "--positions", "-1,-2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    selection = json.loads((run / "selection.json").read_text())
    assert {(c["layer"], c["position"]) for c in selection["candidates"]} == {(1, -1), (1, -2), (2, -1), (2, -2)}
    assert summary["chosen"] == selection["chosen"] == select_direction(selection["candidates"])
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "edited"), "--quiet"]) == 0
    assert (tmp_path / "edited" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "edited"), "--max-new-tokens", "3", "--quiet", "How do I bake bread?"]) == 0
    assert "> How do I bake bread?" in capsys.readouterr().out
    for flag in ("--ablate", "--add"):
        assert main(["generate", "--model", str(model_dir), flag, str(run), "--max-new-tokens", "3", "--json", "Hi"]) == 0
        assert len(json.loads(capsys.readouterr().out)["completions"]) == 1


def test_rerun_resumes_instead_of_redoing(model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["extract", "--model", str(model_dir), "--out", str(run), *FAST]) == 0
    stamp = (run / "candidates.safetensors").stat().st_mtime_ns
    assert main(["run", "--model", str(model_dir), "--out", str(run), "--no-export", *FAST]) == 0
    assert (run / "candidates.safetensors").stat().st_mtime_ns == stamp
    assert (run / "report" / "report.json").exists()


def test_rerun_of_a_finished_run_keeps_its_export(finished_run, model_dir):
    stamp = (finished_run / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", "--model", str(model_dir), "--out", str(finished_run), *FAST]) == 0
    assert (finished_run / "model" / "model.safetensors").stat().st_mtime_ns == stamp


def one_line_error(capsys, argv, pattern):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("refusal: error:") and len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err


def test_bad_inputs_fail_cleanly_and_leave_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, ["run", "--model", str(tmp_path / "missing"), "--out", str(out), *FAST], "does not exist")
    assert not out.exists()
    (tmp_path / "empty.txt").write_text("")
    one_line_error(capsys, ["run", "--model", str(model_dir), "--harmful", str(tmp_path / "empty.txt"), "--out", str(out), *FAST], "is empty")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_error(capsys, ["run", "--model", str(model_dir), "--out", str(out), *FAST], "not empty.*--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    one_line_error(capsys, ["run", "--model", str(model_dir), "--out", str(tmp_path / "r2"), "--n-val", "0", *FAST[6:]], "--n-val must be at least 1")
    one_line_error(capsys, ["select", "--run", str(tmp_path / "nothing")], "not a run directory")
    one_line_error(capsys, ["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")], "not a run directory|does not exist")
    assert not (tmp_path / "x").exists()


def test_no_chat_template_is_a_one_line_error(tmp_path, capsys):
    tok = build_tokenizer()
    tok.chat_template = None
    build_model("llama", len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    one_line_error(capsys, ["run", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "run"), *FAST], "no chat template.*--chat-template")
    assert not (tmp_path / "run").exists()


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    blocks = dict(re.findall(r"<!-- (setup|main|test) -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S))
    assert set(blocks) == {"setup", "main", "test"}
    assert all(len(b.strip().splitlines()) == 1 for b in blocks.values()), "one command each"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert blocks["setup"].strip() in ci and blocks["test"].strip() in ci


def test_evaluate_rejects_bad_input_before_writing_anything(finished_run, model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    one_line_error(capsys, ["evaluate", "--model", str(model_dir), "--edited", str(tmp_path), "--out", str(out), *FAST], "not a checkpoint directory")
    one_line_error(capsys, ["evaluate", "--model", str(model_dir), "--ablate", str(tmp_path), "--out", str(out), *FAST], "does not exist")
    one_line_error(
        capsys,
        ["evaluate", "--model", str(model_dir), "--ablate", str(finished_run), "--kl-tokens", "0", "--out", str(out), *FAST],
        "--kl-tokens must be at least 1",
    )
    one_line_error(
        capsys,
        ["evaluate", "--model", str(model_dir), "--ablate", str(finished_run), "--corpus", str(tmp_path / "none.txt"), "--out", str(out), *FAST],
        "corpus file .* does not exist",
    )
    assert not out.exists()
    assert main(["evaluate", "--model", str(model_dir), "--add", str(finished_run), "--out", str(out), *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {name: set(kinds) for name, kinds in report["rates"].items()} == {"original": {"harmful", "harmless"}, "added": {"harmless"}}
    assert report["kl"] == {}


def test_run_without_out_writes_to_runs_named_after_the_model(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--model", str(model_dir), "--no-export", *FAST]) == 0
    assert (tmp_path / "runs" / model_dir.name / "report" / "report.json").is_file()
