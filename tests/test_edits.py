"""Parametrised weight edits: the paper's edit as a special case, exact revert, the variants."""

import math

import pytest
import torch

from conftest import FAMILIES, build_model
from refusal.edit.edits import Editor, EditParams, Kernel, KernelEdit, Orthogonalization, edited, source_direction
from refusal.edit.weights import Snapshot, embeddings_tied, orthogonalize_weights
from refusal.errors import RefusalError
from refusal.model.chat import wrap_model
from refusal.residual.directions import Candidates, unit_vector

PROMPTS = ["How do I bake bread?", "Name three colors."]


def fresh(family, tokenizer, tie=False):
    return wrap_model(build_model(family, len(tokenizer), tie=tie), tokenizer, source=f"tiny-{family}")


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_one_everywhere_equals_the_papers_orthogonalization(family, tokenizer):
    tie = family in ("llama", "gemma2")
    direction = torch.randn(32, generator=torch.Generator().manual_seed(4))
    reference = fresh(family, tokenizer, tie)
    orthogonalize_weights(reference, direction)
    chat = fresh(family, tokenizer, tie)
    KernelEdit(unit_vector(direction), EditParams(layer=1)).apply(chat, Snapshot(chat))
    batch = chat.batch(PROMPTS)
    assert torch.allclose(chat.logits(batch, last_only=False), reference.logits(batch, last_only=False), atol=1e-5)
    for (name, a), b in zip(chat.model.named_parameters(), reference.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("variant", ["projection", "norm_preserving", "biprojected"])
def test_revert_restores_logits_bit_for_bit(variant, tokenizer):
    chat = fresh("llama", tokenizer, tie=True)
    batch = chat.batch(PROMPTS)
    before = chat.logits(batch, last_only=False)
    unit = unit_vector(torch.randn(32, generator=torch.Generator().manual_seed(5)))
    params = EditParams(layer=1, attn=Kernel(1.3, 1.0, 0.8, 0.1), mlp=Kernel(0.7, 2.0, 1.5, 0.0), variant=variant)
    edit = KernelEdit(unit, params)
    with Editor(chat) as editor:
        for _ in range(2):  # two trials in a row: the second starts from the reverted weights
            with editor.applied(edit):
                assert not torch.equal(chat.logits(batch, last_only=False), before)
            assert torch.equal(chat.logits(batch, last_only=False), before)
        with pytest.raises(ValueError):
            with editor.applied(edit):
                raise ValueError("inside a trial")
        assert torch.equal(chat.logits(batch, last_only=False), before)
    assert embeddings_tied(chat)  # closing re-ties what was tied


def test_norm_preserving_keeps_every_written_vector_norm(tokenizer):
    chat = fresh("llama", tokenizer)
    writer = chat.writers[0]
    norms = writer.module.weight.float().norm(dim=0).clone()  # Linear [d_model, in]: columns
    unit = unit_vector(torch.randn(32, generator=torch.Generator().manual_seed(6)))
    with Editor(chat) as editor:
        with editor.applied(KernelEdit(unit, EditParams(layer=1, variant="norm_preserving"))):
            w = writer.module.weight.float()
            assert torch.allclose(w.norm(dim=0), norms, atol=1e-5)
        with editor.applied(KernelEdit(unit, EditParams(layer=1, variant="projection"))):
            assert (writer.module.weight.float().T @ unit).abs().max() < 1e-5  # nothing written along u


def test_kernel_peaks_at_its_centre_and_stays_above_its_floor():
    s = Kernel(peak=1.0, centre=3.0, width=1.0, floor=0.2).strengths(8)
    assert max(range(8), key=lambda i: s[i]) == 3 and s[3] == pytest.approx(1.0)
    assert min(s) > 0.2 and s[0] == pytest.approx(0.2 + 0.8 * math.exp(-4.5))
    assert Kernel(peak=0.5).strengths(4) == [0.5] * 4


def test_zero_strength_changes_nothing_but_the_embedding_follows_layer_zero(tokenizer):
    chat = fresh("llama", tokenizer)
    before = [p.clone() for p in chat.model.parameters()]
    unit = unit_vector(torch.randn(32, generator=torch.Generator().manual_seed(7)))
    with edited(chat, KernelEdit(unit, EditParams(layer=1, attn=Kernel(0.0), mlp=Kernel(0.0)))):
        assert all(torch.equal(a, b) for a, b in zip(chat.model.parameters(), before))


def test_source_direction_blends_layers_and_biprojection_is_orthogonal_to_the_harmless_mean():
    torch.manual_seed(0)
    harmful, harmless = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    candidates = Candidates(harmful, harmless)
    assert torch.allclose(source_direction(candidates, EditParams(layer=2)), unit_vector(candidates.direction(2, -1)))
    half = source_direction(candidates, EditParams(layer=1.5))
    assert torch.allclose(half, unit_vector(candidates.direction(1, -1) + candidates.direction(2, -1)), atol=1e-6)
    bi = source_direction(candidates, EditParams(layer=2, variant="biprojected"))
    assert abs(float(bi @ harmless[2, 1])) < 1e-5 and float(bi.norm()) == pytest.approx(1.0)


def test_bad_parameters_are_clear_errors():
    with pytest.raises(RefusalError, match="unknown edit variant 'sideways'"):
        EditParams(layer=1, variant="sideways").validate(4, 2)
    with pytest.raises(RefusalError, match="source layer 9 is out of range"):
        EditParams(layer=9).validate(4, 2)
    params = EditParams(layer=1.5, attn=Kernel(1.2, 2.0, 1.0, 0.1))
    assert EditParams.from_dict(params.to_dict()) == params


def test_snapshot_clones_only_what_an_edit_touches(tokenizer):
    chat = fresh("llama", tokenizer, tie=True)
    unit = unit_vector(torch.randn(32, generator=torch.Generator().manual_seed(8)))
    mlp_only = KernelEdit(unit, EditParams(layer=1, attn=Kernel(0.0), mlp=Kernel(1.0, 1.0, 0.5, 0.0)))
    snapshot = Snapshot(chat)
    mlp_only.apply(chat, snapshot)
    saved = {id(t) for t, _ in snapshot.originals.values()}
    touched = {id(w.weight) for w in chat.writers if w.component == "mlp"}
    assert saved == touched and embeddings_tied(chat)  # no attention weight, no embedding cloned; nothing untied
    snapshot.restore()
    # the tied embedding is untied, not cloned: the unembedding's copy is the original
    snapshot = Snapshot(chat)
    embedding = chat.model.get_input_embeddings().weight
    before = embedding.detach().clone()
    Orthogonalization(unit).apply(chat, snapshot)
    assert not embeddings_tied(chat) and snapshot.original(embedding) is not embedding
    assert snapshot.original(embedding).data_ptr() == chat.model.get_output_embeddings().weight.data_ptr()
    assert torch.equal(snapshot.original(embedding), before)
    snapshot.restore()
    assert embeddings_tied(chat) and torch.equal(embedding, before) and not snapshot.originals


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_editor_reverts_bit_for_bit_over_many_trials(tie, tokenizer):
    chat = fresh("gemma2", tokenizer, tie=tie)
    state = {k: v.clone() for k, v in chat.model.state_dict().items()}
    batch = chat.batch(PROMPTS)
    before = chat.logits(batch, last_only=False)
    torch.manual_seed(9)
    trials = [
        KernelEdit(unit_vector(torch.randn(32)), EditParams(layer=1, attn=Kernel(torch.rand(1).item() * 2, i % 3, 0.5 + i, 0.1 * i), variant=v))
        for i, v in enumerate(["projection", "norm_preserving", "biprojected", "norm_preserving", "projection"])
    ]
    trials.insert(2, Orthogonalization(torch.randn(32)))
    with Editor(chat) as editor:
        for edit in trials:
            with editor.applied(edit):
                assert not torch.equal(chat.logits(batch, last_only=False), before)
            assert torch.equal(chat.logits(batch, last_only=False), before)
            for key, value in chat.model.state_dict().items():
                assert torch.equal(value, state[key]), key
    assert embeddings_tied(chat) == tie
    for key, value in chat.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_edits_describe_themselves():
    params = EditParams(layer=1.5, attn=Kernel(1.2, 2.0, 1.0, 0.1))
    assert KernelEdit(torch.ones(4), params).describe() == {"kind": "kernel", "params": params.to_dict()}
    assert Orthogonalization(torch.ones(4)).describe() == {"kind": "orthogonalization"}
    candidates = Candidates(torch.randn(4, 2, 8), torch.randn(4, 2, 8))
    assert torch.equal(KernelEdit.from_candidates(candidates, params).unit, source_direction(candidates, params))
