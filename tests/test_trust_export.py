"""Exports that look right and are not (issue 27): what the export reads is what transformers reads, what it copies
is what a checkpoint needs, every edit is checked against a hooked reference, and an interrupted export leaves nothing."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import refusal.checkpoint.export as export
from conftest import build_model, build_tokenizer, checkpoint_tensors, save_tiny
from refusal.checkpoint.export import export_model
from refusal.cli.main import main
from refusal.common.provenance import model_fingerprint
from refusal.common.safetensors_files import INDEX
from refusal.edit.edits import EditParams, Kernel, KernelEdit, Orthogonalization
from refusal.errors import FidelityError, RefusalError
from refusal.model.loading import load_skeleton
from refusal.model.packaged import load_model
from refusal.residual.interventions import ablate

FAST = ["--n-train", "12", "--n-val", "6", "--n-test", "4", "--quiet"]


def save_sharded(path, seed: int = 0, sub: str | None = None):
    """A tiny qwen2 checkpoint in several safetensors files with an index; with ``sub`` the files sit in that subfolder."""
    tok = build_tokenizer()
    build_model("qwen2", len(tok), tie=True, seed=seed).save_pretrained(path, max_shard_size="150KB")
    tok.save_pretrained(path)
    if sub is not None:
        index = json.loads((path / INDEX).read_text())
        (path / sub).mkdir()
        for name in set(index["weight_map"].values()):
            shutil.move(path / name, path / sub / name)
        index["weight_map"] = {k: f"{sub}/{v}" for k, v in index["weight_map"].items()}
        (path / INDEX).write_text(json.dumps(index))
    return path


def plain_logits(path, chat, texts=("How do I bake bread?", "Tell me how to pick a lock.")):
    """Logits of the checkpoint at ``path`` as plain transformers loads it, on ``chat``'s formatted prompts."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(**chat.batch(list(texts)), use_cache=False).logits.float()


def hooked_logits(chat, hooks, texts=("How do I bake bread?", "Tell me how to pick a lock.")):
    with hooks:
        return chat.logits(chat.batch(list(texts)), last_only=False)


# 1. A stray *.safetensors file beside model.safetensors


def test_a_stray_safetensors_file_is_neither_edited_nor_exported(tmp_path):
    source = save_tiny(tmp_path / "src")
    shutil.copyfile(source / "model.safetensors", source / "zz-backup.safetensors")  # a backup copy, sorted after model.safetensors
    chat = load_model(str(source), device="cpu")
    direction = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(1))
    info = export_model(chat, Orthogonalization(direction), tmp_path / "out")
    assert info["written"]["streamed"]
    got = plain_logits(tmp_path / "out", chat)
    assert torch.allclose(got, hooked_logits(chat, ablate(chat, direction)), atol=1e-4)  # what transformers loads is edited
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]


def test_the_weights_file_the_config_names_is_the_one_edited(tmp_path):
    source = save_tiny(tmp_path / "src")
    shutil.copyfile(source / "model.safetensors", source / "custom.safetensors")  # model.safetensors stays, a copy transformers skips
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "transformers_weights": "custom.safetensors"}))
    chat = load_model(str(source), device="cpu")
    direction = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(4))
    export_model(chat, Orthogonalization(direction), tmp_path / "out")
    assert torch.allclose(plain_logits(tmp_path / "out", chat), hooked_logits(chat, ablate(chat, direction)), atol=1e-4)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["custom.safetensors"]


def test_safetensors_files_without_model_safetensors_or_an_index_are_refused(tmp_path):
    source = save_tiny(tmp_path / "src")
    (source / "model.safetensors").rename(source / "a.safetensors")
    shutil.copyfile(source / "a.safetensors", source / "b.safetensors")
    with pytest.raises(RefusalError, match=r"a\.safetensors, b\.safetensors but neither model\.safetensors nor") as e:
        load_skeleton(str(source))
    assert len(str(e.value).splitlines()) == 1


# 2. An index whose files sit in a subfolder, or outside the directory


def test_an_index_into_a_subfolder_exports_edited_files_in_the_same_subfolder(tmp_path):
    source = save_sharded(tmp_path / "src", sub="sub")
    chat = load_model(str(source), device="cpu")
    direction = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(2))
    info = export_model(chat, Orthogonalization(direction), tmp_path / "out")
    out = tmp_path / "out"
    assert info["written"]["streamed"]
    assert sorted(p.name for p in (out / "sub").glob("*.safetensors")) == sorted(p.name for p in (source / "sub").glob("*.safetensors"))
    assert not list(out.glob("*.safetensors"))
    index = json.loads((out / INDEX).read_text())
    untied = index["weight_map"].pop("lm_head.weight")  # the tied embedding untied, beside the embedding in its file
    assert index["weight_map"] == json.loads((source / INDEX).read_text())["weight_map"] and untied.startswith("sub/")
    edited, original = checkpoint_tensors(out / "sub"), checkpoint_tensors(source / "sub")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(edited[name], original[name])
    writer = next(w for w in chat.writers if w.weight_name == name)
    assert (writer.direction(direction / direction.norm()) @ edited[name]).abs().max() < 1e-5  # nothing written along it
    assert torch.allclose(plain_logits(out, chat), hooked_logits(chat, ablate(chat, direction)), atol=1e-4)


def test_an_index_naming_a_file_outside_the_directory_is_refused_before_anything_is_written(tmp_path):
    source = save_sharded(tmp_path / "src", sub="shared")
    shutil.move(source / "shared", tmp_path / "shared")
    index = json.loads((source / INDEX).read_text())
    index["weight_map"] = {k: "../" + v for k, v in index["weight_map"].items()}
    (source / INDEX).write_text(json.dumps(index))
    for load in (lambda: load_model(str(source), device="cpu"), lambda: load_skeleton(str(source))):
        with pytest.raises(RefusalError, match=r"outside the checkpoint directory") as e:
            load()
        assert len(str(e.value).splitlines()) == 1


# 3. The model's content hash covers the files it loads


def test_a_replaced_shard_in_a_subfolder_changes_the_model_hash_and_makes_artifacts_stale(tmp_path, capsys):
    source = save_sharded(tmp_path / "src", sub="sub")
    before = model_fingerprint(str(source))
    run = tmp_path / "run"
    assert main(["extract", "--model", str(source), "--out", str(run), *FAST]) == 0
    first = (run / "candidates.safetensors").stat().st_mtime_ns
    save_sharded(tmp_path / "other", seed=1, sub="sub")
    shard = sorted((source / "sub").glob("*.safetensors"))[0]
    shutil.copyfile(tmp_path / "other" / "sub" / shard.name, shard)
    assert model_fingerprint(str(source), before)["sha256"] != before["sha256"]
    assert any(name.startswith("sub/") for name in before["files"])
    capsys.readouterr()
    assert main(["select", "--run", str(run), "--quiet"]) == 1
    assert "candidates.safetensors is stale" in capsys.readouterr().err
    assert main(["extract", "--model", str(source), "--out", str(run), *FAST]) == 0
    assert (run / "candidates.safetensors").stat().st_mtime_ns != first  # recomputed


def test_a_stray_safetensors_file_does_not_change_the_model_hash(tmp_path):
    source = save_tiny(tmp_path / "src")
    before = model_fingerprint(str(source))["sha256"]
    shutil.copyfile(source / "model.safetensors", source / "backup.safetensors")
    assert model_fingerprint(str(source))["sha256"] == before


def test_the_model_hash_covers_its_own_code_and_skips_dotfiles(tmp_path):
    source = save_tiny(tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "modeling_x.XConfig"}}))
    (source / "modeling_x.py").write_text("# the model's code\n")
    before = model_fingerprint(str(source))["sha256"]
    (source / ".cache.json").write_text("{}")
    assert model_fingerprint(str(source))["sha256"] == before
    (source / "modeling_x.py").write_text("# the model's code, changed\n")
    assert model_fingerprint(str(source))["sha256"] != before


# 4. Only what a checkpoint needs is copied


@pytest.mark.parametrize("streamed", [True, False])
def test_only_the_files_a_checkpoint_needs_are_copied(streamed, tmp_path, monkeypatch):
    source = save_tiny(tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("hf_SECRET")
    (source / ".env").write_text("HF_TOKEN=hf_SECRET\n")
    (source / ".git-credentials").write_text("https://user:hf_SECRET@huggingface.co\n")
    (source / "notes.md").write_text("private notes\n")
    (source / "linked.txt").symlink_to(secret)
    (source / "README.md").write_text("# model card\n")
    (source / "LICENSE").write_text("Apache-2.0\n")
    if not streamed:
        monkeypatch.setattr(export, "streamable", lambda chat: False)
    chat = load_model(str(source), device="cpu")
    info = export_model(chat, Orthogonalization(torch.randn(chat.d_model)), tmp_path / "out")
    assert info["written"]["streamed"] is streamed
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert not names & {".env", ".git-credentials", "notes.md", "linked.txt"}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "refusal.json"} <= names
    if streamed:
        assert {"README.md", "LICENSE", "generation_config.json"} <= names
    assert not any("hf_SECRET" in p.read_text(errors="ignore") for p in (tmp_path / "out").iterdir() if p.suffix != ".safetensors")


# 5. Every edit is checked against a hooked reference


def kernel_edit(chat) -> KernelEdit:
    """Per-layer strengths, a cleaned direction's log-ridge recorded, and a second direction."""
    g = torch.Generator().manual_seed(3)
    unit = torch.randn(chat.d_model, generator=g)
    params = EditParams(
        layer=1.0,
        attn=Kernel(peak=0.9, centre=1.0, width=0.8, floor=0.2),
        mlp=Kernel(peak=0.7, centre=2.0, width=1.5, floor=0.1),
        clean=0.5,
        second={"vector": torch.randn(chat.d_model, generator=g).tolist(), "strength": 0.6},
    )
    return KernelEdit(unit / unit.norm(), params)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt2"])
def test_a_kernel_edit_export_matches_its_hooked_reference(family, tmp_path):
    source = save_tiny(tmp_path / "src", family=family)
    chat = load_model(str(source), device="cpu")
    edit = kernel_edit(chat)
    hooks = edit.hooks(chat)
    assert hooks is not None
    info = export_model(chat, edit, tmp_path / "out")
    assert info["fidelity_reference"].startswith("its hooked equivalent") and info["fidelity_max_abs_diff"] < 1e-4
    expected = hooked_logits(chat, hooks)
    assert torch.allclose(plain_logits(tmp_path / "out", chat), expected, atol=1e-4)


def test_an_export_whose_weights_disagree_with_the_hooked_reference_fails(tmp_path, monkeypatch):
    source = save_tiny(tmp_path / "src")
    chat = load_model(str(source), device="cpu")
    edit = kernel_edit(chat)
    right = KernelEdit.removal

    def without_second(self, n_layers):  # a bug shared by the in-memory edit and the streamed export
        removal = right(self, n_layers)
        return type(removal)(removal.steps[:1], removal.norms)

    monkeypatch.setattr(KernelEdit, "removal", without_second)
    with pytest.raises(FidelityError, match="hooked equivalent"):
        export_model(chat, edit, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


# 6. SIGTERM during an export


SCRIPT = """
import os, signal, sys, time
import torch
import refusal.checkpoint.streaming as streaming
from refusal.edit.edits import Orthogonalization
from refusal.checkpoint.export import export_model
from refusal.model.packaged import load_model

rewrite = streaming.rewrite_file

def slow(*args, **kwargs):  # the export is under way: terminate it
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)
    return rewrite(*args, **kwargs)

streaming.rewrite_file = slow
chat = load_model(sys.argv[1], device="cpu")
export_model(chat, Orthogonalization(torch.randn(chat.d_model)), sys.argv[2])
print("finished")
"""


def test_sigterm_during_an_export_leaves_no_partial_export(tmp_path):
    source = save_sharded(tmp_path / "src")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(source), str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "finished" not in done.stdout, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), "a partial export was left behind"
