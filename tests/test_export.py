import json

import pytest
import torch

import refusal.export as export_module
from conftest import build_model
from refusal.errors import FidelityError, RefusalError
from refusal.export import export_model
from refusal.interventions import ablate
from refusal.model import load_model, wrap_model


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt2"])
def test_export_reloads_as_hooked_ablation(family, tokenizer, tmp_path):
    chat = wrap_model(build_model(family, len(tokenizer), tie=True), tokenizer, source=str(tmp_path / "src"))
    direction = torch.randn(chat.d_model)
    info = export_model(chat, direction, tmp_path / "out", {"note": "x"})
    assert info["fidelity_max_abs_diff"] < 1e-4
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "refusal.json"} <= files
    assert json.loads((tmp_path / "out" / "refusal.json").read_text())["note"] == "x"
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
    direction = torch.randn(llama_chat.d_model)
    with pytest.raises(RefusalError, match="not empty.*--overwrite"):
        export_model(llama_chat, direction, target)
    assert (target / "keep.txt").read_text() == "mine"
    llama_chat.source = str(tmp_path / "src")
    (tmp_path / "src").mkdir()
    with pytest.raises(RefusalError, match="overlaps the source"):
        export_model(llama_chat, direction, tmp_path / "src")
    export_model(llama_chat, direction, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()


def test_failed_fidelity_check_leaves_nothing(llama_chat, tmp_path, monkeypatch):
    def broken(chat, path, direction, tolerance=None, expected=None):
        raise FidelityError("fidelity check failed: simulated")

    monkeypatch.setattr(export_module, "fidelity_check", broken)
    with pytest.raises(FidelityError):
        export_model(llama_chat, torch.randn(llama_chat.d_model), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_fidelity_check_detects_a_wrong_export(llama_chat, tmp_path):
    direction = torch.randn(llama_chat.d_model)
    llama_chat.model.save_pretrained(tmp_path / "unedited")  # not orthogonalized: must fail
    with pytest.raises(FidelityError, match="differ from hooked ablation"):
        export_module.fidelity_check(llama_chat, tmp_path / "unedited", direction)
