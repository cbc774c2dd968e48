"""Issue 27's weak cases: one clear line, checked before any work, nothing left behind."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import error_line, save_tiny
from refusal.cli.main import main
from refusal.errors import RefusalError
from refusal.settings import SearchSettings, Settings

FAST = ["--n-train", "8", "--n-val", "4", "--n-test", "4", "--max-new-tokens", "4", "--ce-tokens", "0", "--capability-items", "0", "--quiet"]
ATTACK = ["--steps", "1", "--attack-prompts", "1", "--candidates", "4", "--top-k", "4", "--candidate-batch", "4"]
SEARCH = ["--trials", "2", "--time-budget", "none", "--confirm", "1", "--score-prompts", "4", "--protect-prompts", "0", "--second", "0"]
SEARCH += ["--refine", "0", "--no-export"]
KNOWN = "How do I bread"  # words of the tiny models' word-level vocabulary


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2")


@pytest.fixture(scope="module")
def short_model(tmp_path_factory, model_dir):
    """The tiny model with a context of 64 tokens (the built-in prompts are up to about 30 tokens with the template)."""
    path = tmp_path_factory.mktemp("short") / "qwen2"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (path / "config.json").write_text(json.dumps(config))
    return path


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# ---- 1. a suffix longer than the context ----------------------------------------------------------------
def test_a_suffix_longer_than_the_context_is_named_before_anything_is_written(short_model, tmp_path, capsys):
    out = tmp_path / "run"
    err = error_line(capsys, ["attack", "--model", str(short_model), "--out", str(out), *FAST, *ATTACK, "--suffix-length", "50"])
    assert "--suffix-length 50" in err and "context of 64" in err and "instructions" not in err and not out.exists()
    suffix = write(tmp_path / "suffix.txt", " ".join(["bread"] * 50))
    err = error_line(capsys, ["attack", "--model", str(short_model), "--out", str(out), *FAST, "--suffix-file", str(suffix)])
    assert f"suffix of {suffix}" in err and "context of 64" in err and not out.exists()


# ---- 2. prompt + --max-new-tokens against the context ------------------------------------------------------
def test_prompts_and_max_new_tokens_must_fit_the_context(short_model, tmp_path, capsys):
    out = tmp_path / "run"
    err = error_line(capsys, ["run", "--model", str(short_model), "--out", str(out), *FAST, "--max-new-tokens", "60"])
    assert "--max-new-tokens 60" in err and "context of 64" in err and not out.exists()
    err = error_line(capsys, ["attack", "--model", str(short_model), "--out", str(out), *FAST, *ATTACK, "--max-new-tokens", "40"])
    assert "--max-new-tokens 40" in err and not out.exists()
    err = error_line(capsys, ["generate", "--model", str(short_model), "--max-new-tokens", "60", "--quiet", "How do I bread?"])
    assert "'How do I bread?'" in err and "--max-new-tokens 60" in err
    report = tmp_path / "report"
    argv = ["evaluate", "--model", str(short_model), "--edited", str(short_model), "--out", str(report), *FAST, "--max-new-tokens", "60"]
    err = error_line(capsys, argv)
    assert "--max-new-tokens 60" in err and not report.exists()


# ---- 3. unknown characters in a suffix or --target ------------------------------------------------------------
def test_unknown_text_in_a_suffix_or_target_is_named_not_turned_into_unk(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    suffix = write(tmp_path / "suffix.txt", f"{KNOWN} zqxj\n")
    err = error_line(capsys, ["attack", "--model", str(model_dir), "--out", str(out), *FAST, "--suffix-file", str(suffix)])
    assert str(suffix) in err and "'zqxj'" in err and not out.exists()
    err = error_line(capsys, ["attack", "--model", str(model_dir), "--out", str(out), *FAST, *ATTACK, "--target", "Sure zqxj"])
    assert "--target" in err and "'zqxj'" in err and not out.exists()


# ---- 4. analyze on a mixture-of-experts model -------------------------------------------------------------------
def test_analyze_refuses_a_mixture_of_experts_model_up_front(tmp_path, capsys):
    model, run = save_tiny(tmp_path / "mixtral", family="mixtral", tie=False), tmp_path / "run"
    assert main(["extract", "--model", str(model), "--out", str(run), *FAST]) == 0
    suffix = write(tmp_path / "suffix.txt", KNOWN)
    err = error_line(capsys, ["analyze", "--run", str(run), "--suffix-file", str(suffix), "--quiet"])
    assert "mixture-of-experts" in err and "not support" in err
    assert not (run / "selection.json").exists() and not (run / "analysis.json").exists()  # no work done


# ---- 5. analyze --base of another width -------------------------------------------------------------------------
def test_a_base_of_another_width_is_refused_before_extraction(model_dir, tmp_path, capsys, monkeypatch):
    import refusal.commands.analyze

    run = tmp_path / "run"
    assert main(["extract", "--model", str(model_dir), "--out", str(run), *FAST]) == 0
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["hidden_size"] = 48
    (base / "config.json").write_text(json.dumps(config))

    def no_work(*args, **kwargs):
        raise AssertionError("extraction started before --base was checked")

    monkeypatch.setattr(refusal.commands.analyze, "candidates", no_work)
    suffix = write(tmp_path / "suffix.txt", KNOWN)
    err = error_line(capsys, ["analyze", "--run", str(run), "--suffix-file", str(suffix), "--base", str(base), "--quiet"])
    assert "--base" in err and "width 48" in err


# ---- 6. bad --storage URLs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, says",
    [
        ("sqlite:///:memory:", "in-memory"),
        ("nosuchdb://host/db", "not a database URL"),
        ("CORRUPT", "file is not a database"),
        ("postgresql+psycopg2://user@localhost/db", "driver psycopg2"),
    ],
)
def test_bad_storage_urls_are_refused_before_any_work(model_dir, tmp_path, capsys, monkeypatch, url, says):
    monkeypatch.chdir(tmp_path)  # where a relative database (and its lock file) would go
    if url == "CORRUPT":
        url = f"sqlite:///{write(tmp_path / 'study.db', 'this is not an SQLite file ' * 40)}"
    if "psycopg2" in url:
        pytest.importorskip("sqlalchemy")
        if __import__("importlib").util.find_spec("psycopg2") is not None:
            pytest.skip("psycopg2 is installed")
    out = tmp_path / "run"
    err = error_line(capsys, ["search", "--model", str(model_dir), "--out", str(out), *FAST, *SEARCH, "--storage", url])
    assert says in err and not out.exists()


# ---- 7. Optuna's warnings under --quiet -------------------------------------------------------------------------------
def test_quiet_silences_optunas_warnings(model_dir, tmp_path):
    pytest.importorskip("optuna")
    out, db = tmp_path / "run", tmp_path / "study.db"
    argv = ["search", "--model", str(model_dir), "--out", str(out), *FAST, *SEARCH, "--storage", f"sqlite:///{db}"]
    result = subprocess.run([sys.executable, "-m", "refusal", *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""  # no ExperimentalWarning, no heartbeat UserWarning, no Optuna log line


# ---- 8. one writer per run directory ------------------------------------------------------------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from refusal.settings import Settings
from refusal.run.workspace import start
settings = Settings()
settings.model.model = sys.argv[1]
settings.data.n_train, settings.data.n_val, settings.data.n_test, settings.evaluation.ce_tokens = 8, 4, 4, 0
start(settings, Path(sys.argv[2]))
print("holding", flush=True)
time.sleep(300)
"""


def test_a_run_directory_in_use_by_another_process_is_one_line(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(model_dir), str(out)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        before = (out / "run.json").read_text()
        err = error_line(capsys, ["extract", "--model", str(model_dir), "--out", str(out), *FAST])
        assert f"run directory {out} is in use by process {holder.pid}" in err and "--out" in err
        assert (out / "run.json").read_text() == before and not (out / "candidates.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["extract", "--model", str(model_dir), "--out", str(out), *FAST]) == 0  # the lock went with its process


# ---- 9. a full disk leaves no .attack.json.tmp -------------------------------------------------------------------------
def test_a_full_disk_leaves_no_temporary_attack_json(model_dir, tmp_path, capsys, monkeypatch):
    from pathlib import Path

    real = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if self.name == ".attack.json.tmp":
            real(self, data[:100], *args, **kwargs)  # part of it reached the disk
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "run"
    suffix = write(tmp_path / "suffix.txt", KNOWN)
    err = error_line(capsys, ["attack", "--model", str(model_dir), "--out", str(out), *FAST, "--suffix-file", str(suffix)])
    assert "disk is full" in err and "free space" in err
    assert not (out / ".attack.json.tmp").exists() and not (out / "attack.json").exists()


# ---- 10. the real cause of an OSError ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code, says, fix",
    [
        (errno.EROFS, "read-only", "writable location"),
        (errno.EFBIG, "file-size limit", "ulimit -f"),
        (errno.EDQUOT, "quota is used up", "within your quota"),
        (errno.EACCES, "permission denied", "permissions"),
        (errno.ENOSPC, "disk is full", "free space"),
    ],
)
def test_an_os_error_names_its_real_cause(model_dir, tmp_path, capsys, monkeypatch, code, says, fix):
    import refusal.run.directory

    def fail(path, data):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(refusal.run.directory, "write_json", fail)
    err = error_line(capsys, ["extract", "--model", str(model_dir), "--out", str(tmp_path / "run"), *FAST])
    assert says in err and fix in err and "run.json" in err
    if code not in (errno.ENOSPC, errno.EDQUOT):  # the cases where freeing space is the fix
        assert "free space" not in err


# ---- 11. --target with --suffix-file ---------------------------------------------------------------------------------------
def test_a_target_with_a_suffix_file_is_refused():
    settings = Settings()
    settings.attack.target, settings.attack.suffix_file = "Sure, here is", "/tmp/suffix.txt"
    with pytest.raises(RefusalError, match="--target.*--suffix-file"):
        settings.validate()


# ---- 12. a Jinja sandbox error -------------------------------------------------------------------------------------------------
def test_a_sandbox_error_in_the_chat_template_is_named(model_dir, tmp_path, capsys):
    template = (model_dir / "chat_template.jinja").read_text()
    unsafe = "{% if 'bread' in messages[-1]['content'] %}{{ messages[-1]['content'].__class__.__mro__ }}{% endif %}"
    path = write(tmp_path / "template.jinja", unsafe + template)
    argv = ["generate", "--model", str(model_dir), "--chat-template", str(path), "--max-new-tokens", "2", "--quiet", "How do I bread?"]
    err = error_line(capsys, argv)
    assert "sandbox" in err and "SecurityError" in err and "'How do I bread?'" in err and "no chat template" not in err


# ---- 13. SearchSettings.validate checks source_positions -----------------------------------------------------------------------
@pytest.mark.parametrize("positions", [[0], [], [-1, 2]])
def test_search_source_positions_are_validated(positions):
    with pytest.raises(RefusalError, match="--source-positions"):
        SearchSettings(source_positions=positions).validate()
