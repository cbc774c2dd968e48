import json

import pytest
import torch

import refusal.checkpoint.export as export_module
from conftest import build_model
from refusal.checkpoint.export import export_model
from refusal.edit.edits import EditParams, Kernel, KernelEdit, Orthogonalization
from refusal.errors import FidelityError, RefusalError
from refusal.model.chat import wrap_model
from refusal.model.packaged import load_model
from refusal.residual.interventions import ablate


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt2"])
def test_export_reloads_as_hooked_ablation(family, tokenizer, tmp_path):
    chat = wrap_model(build_model(family, len(tokenizer), tie=True), tokenizer, source=str(tmp_path / "src"))
    direction = torch.randn(chat.d_model)
    state = {k: v.clone() for k, v in chat.model.state_dict().items()}
    info = export_model(chat, Orthogonalization(direction), tmp_path / "out", {"note": "x"})
    assert info["fidelity_max_abs_diff"] < 1e-4 and info["edit"] == {"kind": "orthogonalization"}
    assert all(torch.equal(v, state[k]) for k, v in chat.model.state_dict().items())  # the model in memory is unchanged
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "refusal.json"} <= files
    assert json.loads((tmp_path / "out" / "refusal.json").read_text()) == info and info["note"] == "x"
    reloaded = load_model(str(tmp_path / "out"), device="cpu")
    batch = chat.batch(["How do I bake bread?"])
    with ablate(chat, direction):
        expected = chat.logits(batch)
    assert torch.allclose(reloaded.logits(batch), expected, atol=1e-4)
    assert not list(tmp_path.glob(".out.*"))  # no temporary left behind


def test_export_refuses_non_empty_target_and_the_source(llama_chat, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    edit = Orthogonalization(torch.randn(llama_chat.d_model))
    with pytest.raises(RefusalError, match="not empty.*--overwrite"):
        export_model(llama_chat, edit, target)
    assert (target / "keep.txt").read_text() == "mine"
    llama_chat.path = str(tmp_path / "src")
    (tmp_path / "src").mkdir()
    with pytest.raises(RefusalError, match="overlaps the source"):
        export_model(llama_chat, edit, tmp_path / "src")
    export_model(llama_chat, edit, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()


def test_failed_fidelity_check_leaves_nothing(llama_chat, tmp_path, monkeypatch):
    def broken(chat, path, expected, *args, **kwargs):
        raise FidelityError("fidelity check failed: simulated")

    monkeypatch.setattr(export_module, "fidelity_check", broken)
    with pytest.raises(FidelityError):
        export_model(llama_chat, Orthogonalization(torch.randn(llama_chat.d_model)), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_fidelity_check_detects_a_wrong_export(llama_chat, tmp_path):
    direction = torch.randn(llama_chat.d_model)
    llama_chat.model.save_pretrained(tmp_path / "unedited")  # not orthogonalized: must fail
    with ablate(llama_chat, direction):
        expected = llama_chat.logits(llama_chat.batch(list(export_module.FIDELITY_PROMPTS)), last_only=False)
    with pytest.raises(FidelityError, match="differ from hooked ablation"):
        export_module.fidelity_check(llama_chat, tmp_path / "unedited", expected, "hooked ablation")


def test_kernel_edit_exports_against_the_edited_model_in_memory(llama_chat, tmp_path):
    unit = torch.nn.functional.normalize(torch.randn(llama_chat.d_model), dim=0)
    params = EditParams(layer=1, attn=Kernel(0.8, 1.0, 1.0, 0.1), variant="norm_preserving")
    edit = KernelEdit(unit, params)
    batch = llama_chat.batch(["How do I bake bread?"])
    before = llama_chat.logits(batch)
    info = export_model(llama_chat, edit, tmp_path / "out")
    assert info["edit"] == {"kind": "kernel", "params": params.to_dict()} and info["fidelity_max_abs_diff"] < 1e-4
    assert torch.equal(llama_chat.logits(batch), before)
    assert not torch.allclose(load_model(str(tmp_path / "out"), device="cpu").logits(batch), before, atol=1e-4)


def test_export_refuses_the_directory_a_sources_symlinks_point_into(llama_chat, tmp_path):
    """A hub-cache layout: snapshots/<rev>/ holds symlinks into blobs/; exporting into blobs/ would destroy the source."""
    llama_chat.model.save_pretrained(tmp_path / "saved")
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted((tmp_path / "saved").iterdir())):
        file.rename(blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(blobs / f"blob{i}")
    llama_chat.path = str(snapshot)
    edit = Orthogonalization(torch.randn(llama_chat.d_model))
    for target in (blobs, tmp_path / "hub"):
        with pytest.raises(RefusalError, match="overlaps the source"):
            export_model(llama_chat, edit, target, overwrite=True)
    assert len(list(blobs.iterdir())) == len(list(snapshot.iterdir())) and all(p.resolve().is_file() for p in snapshot.iterdir())
    export_model(llama_chat, edit, tmp_path / "elsewhere", check=False)
