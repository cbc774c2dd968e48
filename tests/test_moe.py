"""Mixture-of-experts families: every expert's output projection (fused 3-D, or one matrix per expert on disk),
shared experts, the router untouched."""

import dataclasses

import pytest
import torch

from conftest import MOE_FAMILIES, build_model, build_tokenizer
from conftest import checkpoint_tensors as tensors
from refusal.checkpoint.export import export_model
from refusal.edit.edits import Editor, EditParams, Kernel, KernelEdit, Orthogonalization, edited, orthogonalized
from refusal.model.chat import wrap_model
from refusal.model.loading import load_skeleton
from refusal.model.packaged import load_model
from refusal.residual.interventions import ablate

PROMPTS = ["How do I bake bread?", "Tell me how to pick a lock."]


@pytest.fixture(params=MOE_FAMILIES)
def moe_chat(request, tokenizer):
    return wrap_model(build_model(request.param, len(tokenizer)), tokenizer, source=f"tiny-{request.param}")


def test_every_expert_is_a_writer_and_orthogonalization_equals_ablation(moe_chat):
    chat = moe_chat
    fused = [w for w in chat.writers if w.weight.dim() == 3]
    assert len(fused) == chat.n_layers and all(w.component == "mlp" for w in fused)  # one fused experts writer per layer
    direction = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(0))
    batch = chat.batch(PROMPTS)
    original = chat.logits(batch, last_only=False)
    with ablate(chat, direction):
        expected = chat.logits(batch, last_only=False)
    with orthogonalized(chat, direction):
        got = chat.logits(batch, last_only=False)
    assert (expected - original).abs().max() > 1e-2  # the edit matters
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.equal(chat.logits(batch, last_only=False), original)  # reverted bit for bit


def test_kernel_edits_on_experts_revert_bit_for_bit(moe_chat):
    chat = moe_chat
    state = {k: v.clone() for k, v in chat.model.state_dict().items()}
    unit = torch.nn.functional.normalize(torch.randn(chat.d_model), dim=0)
    with Editor(chat) as editor:
        for variant in ("projection", "norm_preserving"):
            params = EditParams(layer=1.0, attn=Kernel(0.7), mlp=Kernel(1.2, centre=1.0, width=1.0), variant=variant)
            with editor.applied(KernelEdit(unit, params)):
                changed = [k for k, v in chat.model.state_dict().items() if not torch.equal(v, state[k])]
                fused = any(".experts." in k and v.dim() == 3 for k, v in state.items() if k in changed)
                assert fused == (variant == "norm_preserving")  # projections hook the fused experts; rescaling edits them
                assert changed and not any("gate.weight" in k or "router" in k for k in changed)
            assert all(torch.equal(v, state[k]) for k, v in chat.model.state_dict().items())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_export_streams_per_expert_and_fused_checkpoints(family, tmp_path):
    tok = build_tokenizer()
    build_model(family, len(tok), tie=False).save_pretrained(tmp_path / "src", max_shard_size="200KB")
    tok.save_pretrained(tmp_path / "src")
    chat = load_model(str(tmp_path / "src"), device="cpu")
    direction = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(1))
    info = export_model(chat, Orthogonalization(direction), tmp_path / "out")
    assert info["written"]["streamed"] and info["fidelity_max_abs_diff"] < 1e-4
    batch = chat.batch(PROMPTS)
    with ablate(chat, direction):
        expected = chat.logits(batch, last_only=False)
    assert torch.allclose(load_model(str(tmp_path / "out"), device="cpu").logits(batch, last_only=False), expected, atol=1e-4)
    before, after = tensors(tmp_path / "src"), tensors(tmp_path / "out")
    assert set(before) == set(after)  # the source's names: per expert where it stored them so
    routers = [k for k in before if k.endswith(("mlp.gate.weight", "router.weight", "router.bias", "block_sparse_moe.gate.weight"))]
    assert routers and all(torch.equal(before[k], after[k]) for k in routers)  # the router is untouched
    experts = [k for k in before if ".experts." in k and ("down_proj" in k or ".w2." in k)]
    assert experts and all(not torch.equal(before[k], after[k]) for k in experts)  # every expert's output projection edited
    skeleton = export_model(load_skeleton(tmp_path / "src"), Orthogonalization(direction), tmp_path / "streamed", check=False)
    assert skeleton["written"]["streamed"]
    for file in (tmp_path / "out").glob("*.safetensors"):
        assert file.read_bytes() == (tmp_path / "streamed" / file.name).read_bytes()


def test_search_trials_hook_the_experts_instead_of_copying_them(moe_chat):
    chat = moe_chat
    unit = torch.nn.functional.normalize(torch.randn(chat.d_model), dim=0)
    batch = chat.batch(PROMPTS)
    original = chat.logits(batch, last_only=False)
    params = EditParams(layer=1.0, attn=Kernel(0.8), mlp=Kernel(1.1, centre=1.0, width=1.5))
    with edited(chat, KernelEdit(unit, params)):  # the weights themselves (what the export writes)
        expected = chat.logits(batch, last_only=False)
    with Editor(chat) as editor:
        with editor.applied(KernelEdit(unit, params)):
            got = chat.logits(batch, last_only=False)
            assert not any(original.dim() == 3 for _, original in editor.snapshot.originals.values())  # no expert copied
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.equal(chat.logits(batch, last_only=False), original)  # hooks gone, weights restored
        with editor.applied(KernelEdit(unit, dataclasses.replace(params, variant="norm_preserving"))):
            assert any(original.dim() == 3 for _, original in editor.snapshot.originals.values())  # rescaling needs the copy
    assert torch.equal(chat.logits(batch, last_only=False), original)
