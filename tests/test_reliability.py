"""Bad input and faults as a hostile new user would try them (issue 13): one line, exit 1, nothing written.

The stale/foreign-data cases (run directory fingerprints) are in tests/test_run_dir.py; docs/reliability.md
lists every case and the test that proves it.
"""

import json
import os

import pytest
from safetensors.torch import load_file, save_file

from conftest import error_line, save_tiny
from refusal.cli.main import main

FAST = ["--n-train", "12", "--n-val", "6", "--n-test", "4", "--max-new-tokens", "4", "--ce-tokens", "64", "--quiet"]


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny(tmp_path / "qwen2")


def run(model_dir, out, *extra):
    return ["run", "--model", str(model_dir), "--out", str(out), *FAST, *extra]


def test_a_garbage_weights_file_is_one_line(model_dir, tmp_path, capsys):
    (model_dir / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    err = error_line(capsys, run(model_dir, tmp_path / "run"))
    assert "could not load model" in err and not (tmp_path / "run").exists()


def test_a_truncated_weights_file_is_one_line(model_dir, tmp_path, capsys):
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = error_line(capsys, run(model_dir, tmp_path / "run"))
    assert "could not load model" in err and not (tmp_path / "run").exists()


def test_a_checkpoint_missing_a_tensor_is_an_error_not_random_weights(model_dir, tmp_path, capsys):
    tensors = load_file(str(model_dir / "model.safetensors"))
    missing = next(k for k in tensors if "layers.1.mlp.down_proj" in k)
    del tensors[missing]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    err = error_line(capsys, run(model_dir, tmp_path / "run"))
    assert "missing" in err and "layers.1.mlp.down_proj" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b"{% for m in messages %}{{ m['content'] }"])
def test_a_bad_chat_template_is_one_line(model_dir, tmp_path, capsys, content):
    template = tmp_path / "template.jinja"
    template.write_bytes(content)
    err = error_line(capsys, run(model_dir, tmp_path / "run", "--chat-template", str(template)))
    assert "chat template" in err and not (tmp_path / "run").exists()


def test_out_under_a_file_is_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    err = error_line(capsys, run(model_dir, tmp_path / "afile" / "run"))
    assert "afile" in err


def test_a_directory_as_prompt_file_is_one_line(model_dir, tmp_path, capsys):
    err = error_line(capsys, run(model_dir, tmp_path / "run", "--harmful", str(tmp_path)))
    assert "is a directory" in err and not (tmp_path / "run").exists()


def test_cuda_without_a_gpu_is_one_line(model_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = error_line(capsys, run(model_dir, tmp_path / "run", "--device", "cuda"))
    assert "no CUDA GPU" in err and "--device cpu" in err


def test_corrupt_candidates_and_direction_files_are_one_line(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run(model_dir, out, "--no-export")) == 0
    (out / "direction.safetensors").write_bytes(b"not safetensors")
    err = error_line(capsys, ["export", "--run", str(out), "--out", str(tmp_path / "x"), "--quiet"])
    assert "direction.safetensors" in err and not (tmp_path / "x").exists()
    (out / "candidates.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    err = error_line(capsys, ["select", "--run", str(out), "--quiet"])
    assert "candidates.safetensors" in err


def test_a_run_json_of_the_wrong_shape_is_one_line(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"format_version": "2", "settings": {"data": {"n_val": "many"}}, "artifacts": {}}))
    err = error_line(capsys, ["select", "--run", str(out), "--quiet"])
    assert "run.json" in err and "n_val" in err


def test_a_corrupt_refusal_json_is_one_line(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run(model_dir, out)) == 0
    (out / "model" / "refusal.json").write_text("{not json")
    err = error_line(capsys, ["evaluate", "--model", str(model_dir), "--edited", str(out / "model"), "--out", str(tmp_path / "rep"), *FAST])
    assert "refusal.json" in err and not (tmp_path / "rep").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "99"], "layer 99 is out of range"),
        (["--positions", "0"], "position 0 is out of range"),
        (["--kl-threshold", "nan"], "--kl-threshold nan must be a positive number"),
        (["--prune-layer-fraction", "1.5"], r"--prune-layer-fraction 1.5 must be in \[0, 1\)"),
        (["--layers", "3-1"], "empty range"),
        (["--refusal-tokens", ",,,"], "names no words"),
    ],
)
def test_selection_options_fail_before_any_work(model_dir, tmp_path, capsys, extra, message):
    import re

    err = error_line(capsys, run(model_dir, tmp_path / "run", *extra))
    assert re.search(message, err) and not (tmp_path / "run").exists()


def test_identical_harmful_and_harmless_sets_are_named(model_dir, tmp_path, capsys):
    from refusal.data.prompt_sets import load_builtin

    prompts = tmp_path / "same.txt"
    prompts.write_text("\n".join(load_builtin("harmful")[:40]))
    err = error_line(capsys, run(model_dir, tmp_path / "run", "--harmful", str(prompts), "--harmless", str(prompts)))
    assert "harmful and harmless train prompts are the same" in err


def test_confirm_zero_names_the_right_option(model_dir, tmp_path, capsys):
    err = error_line(capsys, ["search", "--model", str(model_dir), "--out", str(tmp_path / "run"), "--confirm", "0", *FAST])
    assert "--confirm must be at least 1 (got 0)" in err and "--refusal-positions" not in err  # the old line named an option that did not exist


@pytest.mark.parametrize(
    "extra, message", [(["--max-new-tokens", "0"], "--max-new-tokens must be between 1"), (["--max-new-tokens", "100000"], "--max-new-tokens")]
)
def test_generate_bounds(model_dir, capsys, extra, message):
    err = error_line(capsys, ["generate", "--model", str(model_dir), *extra, "--quiet", "Hi"])
    assert message in err


def test_generate_with_a_nan_coefficient_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run(model_dir, out, "--no-export")) == 0
    err = error_line(capsys, ["generate", "--model", str(model_dir), "--add", str(out), "--coeff", "nan", "--quiet", "Hi"])
    assert "--coeff must be a finite number" in err


def test_interrupting_generate_does_not_promise_a_resume(model_dir, capsys, monkeypatch):
    import refusal.commands.generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(refusal.commands.generate, "generate_completions", interrupted)
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--quiet", "Hi"]) == 130
    assert "resume" not in capsys.readouterr().err


def test_a_remote_code_model_without_the_flag_gets_the_hint(model_dir, tmp_path, capsys):
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    config["model_type"] = "custom-remote-family"
    (model_dir / "config.json").write_text(json.dumps(config))
    err = error_line(capsys, run(model_dir, tmp_path / "run"))
    assert "--trust-remote-code" in err


def test_a_killed_exports_partial_directory_is_cleaned_up(model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(run(model_dir, out, "--no-export")) == 0
    target = tmp_path / "exported"
    partial = tmp_path / ".exported.partial-999999"  # a dead process's leftovers (a whole checkpoint on a real model)
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert main(["export", "--run", str(out), "--out", str(target), "--quiet"]) == 0
    assert (target / "model.safetensors").exists() and not partial.exists()


def test_run_files_never_go_into_the_source_model_directory(model_dir, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    err = error_line(capsys, run(model_dir, model_dir, "--no-export", "--overwrite"))
    assert "overlaps the source model" in err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_the_source_model_is_never_modified_by_a_whole_run(model_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert main(run(model_dir, tmp_path / "run")) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert sorted(os.listdir(model_dir)) == sorted(before)


def test_a_template_that_ignores_the_prompt_is_named(model_dir, tmp_path, capsys):
    template = tmp_path / "template.jinja"
    template.write_text("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    err = error_line(capsys, run(model_dir, tmp_path / "run", "--chat-template", str(template)))
    assert "ignores the user's message" in err


def test_a_full_disk_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    import errno

    import refusal.run.directory

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(refusal.run.directory, "write_json", full)
    err = error_line(capsys, run(model_dir, tmp_path / "run"))
    assert "No space left on device" in err


def test_select_with_new_options_then_run_exports_the_new_direction(model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(run(model_dir, out)) == 0
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(["select", "--run", str(out), "--layers", "1", "--positions", "-2", "--quiet"]) == 0
    assert main(run(model_dir, out, "--layers", "1", "--positions", "-2")) == 0
    chosen = json.loads((out / "selection.json").read_text())["chosen"]
    exported = json.loads((out / "model" / "refusal.json").read_text())["direction"]
    report = json.loads((out / "report" / "report.json").read_text())["direction"]
    assert (chosen["layer"], chosen["position"]) == (1, -2) == (exported["layer"], exported["position"]) == (report["layer"], report["position"])
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns != stamp


MODELING = """
from transformers import LlamaConfig, LlamaForCausalLM


class RemoteConfig(LlamaConfig):
    model_type = "refusal-remote-llama"


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
"""


def test_a_remote_code_model_runs_and_exports_with_the_flag(tmp_path):
    """Case 8: the fidelity check reloads the export with --trust-remote-code too."""
    model_dir = save_tiny(tmp_path / "remote", family="llama")
    (model_dir / "modeling_remote.py").write_text(MODELING)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "refusal-remote-llama"
    config["architectures"] = ["RemoteForCausalLM"]
    config["auto_map"] = {"AutoConfig": "modeling_remote.RemoteConfig", "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--out", str(out), "--trust-remote-code", *FAST]) == 0
    info = json.loads((out / "model" / "refusal.json").read_text())
    assert info["fidelity_max_abs_diff"] < 1e-3
