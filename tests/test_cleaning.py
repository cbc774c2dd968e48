"""Ridge-cleaned directions: the formula, its limits, storage, and the edit that uses it."""

import math

import pytest
import torch

from refusal.checkpoint.export import export_model
from refusal.direction.cleaning import Protection, protect
from refusal.edit.edits import Editor, EditParams, Kernel, KernelEdit, source_direction
from refusal.errors import RefusalError
from refusal.residual.directions import Candidates


def random_protection(n=12, layers=4, d=32, positions=(-2, -1), seed=0) -> Protection:
    g = torch.Generator().manual_seed(seed)
    return Protection(torch.randn(n, layers + 1, len(positions), d, generator=g) + 0.5, list(positions))


def test_cleaning_equals_the_ridge_formula():
    prot = random_protection()
    d = torch.randn(32, generator=torch.Generator().manual_seed(1))
    H = prot.acts[:, 2, 1].double()
    M = H.T @ H / len(H)
    for log_alpha in (-1.0, 0.0, 1.5):
        beta = 10**log_alpha * torch.trace(M) / 32
        expected = beta * torch.linalg.solve(M + beta * torch.eye(32, dtype=torch.float64), d.double())
        got = prot.clean(d, 2.0, -1, log_alpha)
        assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_weak_cleaning_keeps_the_direction_and_strong_cleaning_leaves_the_protected_span():
    prot = random_protection(n=8)  # n < d: the protected activations span 8 of 32 dimensions
    d = torch.randn(32, generator=torch.Generator().manual_seed(2))
    weak = prot.clean(d, 1.0, -2, 6.0)
    assert torch.nn.functional.cosine_similarity(weak, d, dim=0) > 0.9999
    strong = prot.clean(d, 1.0, -2, -6.0)
    H = prot.acts[:, 1, 0]
    assert (H @ strong).abs().max() < 1e-4 * H.norm(dim=1).max() * strong.norm()
    # in between, the protected prompts carry less of the cleaned direction than of the raw one
    mid = prot.clean(d, 1.0, -2, 0.0)
    share = lambda v: ((H @ v) ** 2).mean() / v.norm() ** 2
    assert share(strong) < share(mid) < share(d)


def test_a_fractional_layer_blends_the_second_moments():
    prot = random_protection()
    d = torch.randn(32)
    assert torch.allclose(prot.clean(d, 3.0, -1, 0.5), prot.clean(d, 3.0 + 0.0, -1, 0.5))
    low, high = prot.acts[:, 1, 1].double(), prot.acts[:, 2, 1].double()
    M = 0.75 * low.T @ low / 12 + 0.25 * high.T @ high / 12
    beta = 10**0.5 * torch.trace(M) / 32
    expected = beta * torch.linalg.solve(M + beta * torch.eye(32, dtype=torch.float64), d.double())
    assert torch.allclose(prot.clean(d, 1.25, -1, 0.5).double(), expected, atol=1e-5, rtol=1e-5)


def test_protection_round_trips_and_refuses_a_position_it_lacks(tmp_path):
    prot = random_protection()
    prot.metadata = {"n_prompts": 12}
    prot.save(tmp_path / "p.safetensors")
    back = Protection.load(tmp_path / "p.safetensors")
    assert torch.equal(back.acts, prot.acts) and back.positions == [-2, -1] and back.metadata["n_prompts"] == 12
    with pytest.raises(RefusalError, match="positions"):
        back.clean(torch.randn(32), 1.0, -3, 0.0)


def test_protect_reads_the_residual_stream_of_a_tiny_model(llama_chat):
    tiny_chat = llama_chat
    prot = protect(tiny_chat, ["Write a haiku.", "Add 2 and 3.", "Name a colour."], [-1], batch_size=2)
    assert prot.acts.shape == (3, tiny_chat.n_layers + 1, 1, tiny_chat.d_model)
    assert torch.isfinite(prot.acts).all()
    with pytest.raises(RefusalError, match="protect-prompts"):
        protect(tiny_chat, [], [-1])


def test_a_cleaned_edit_needs_its_protection_and_is_a_different_unit_direction():
    g = torch.Generator().manual_seed(3)
    cands = Candidates(torch.randn(5, 2, 32, generator=g), torch.randn(5, 2, 32, generator=g))
    prot = random_protection()
    params = EditParams(layer=2.5, clean=0.0)
    with pytest.raises(RefusalError, match="protected activations"):
        source_direction(cands, params)
    unit = KernelEdit.from_candidates(cands, params, prot).unit
    plain = source_direction(cands, EditParams(layer=2.5))
    assert math.isclose(unit.norm().item(), 1.0, rel_tol=1e-5)
    assert torch.nn.functional.cosine_similarity(unit, plain, dim=0) < 0.999
    with pytest.raises(RefusalError, match="finite"):
        EditParams(layer=2.0, clean=math.nan).validate(4, 2)
    assert EditParams.from_dict(params.to_dict()) == params
    assert EditParams.from_dict({k: v for k, v in EditParams(layer=2.0).to_dict().items() if k != "clean"}).clean is None  # older search.json


def test_weak_cleaning_at_strength_one_is_the_papers_orthogonalization(llama_chat):
    from refusal.edit.weights import orthogonalize_weights

    direction = torch.randn(llama_chat.d_model, generator=torch.Generator().manual_seed(4))
    prot = protect(llama_chat, ["Write a haiku.", "Add 2 and 3.", "Sort a list in Python."], [-1])
    cands = Candidates(direction.expand(llama_chat.n_layers + 1, 1, -1).clone(), torch.zeros(llama_chat.n_layers + 1, 1, llama_chat.d_model))
    batch = llama_chat.batch(["How do I bake bread?", "Name three colors."])
    with Editor(llama_chat) as editor, editor.applied(KernelEdit.from_candidates(cands, EditParams(layer=1.5, clean=12.0), prot)):
        cleaned = llama_chat.logits(batch, last_only=False)
    orthogonalize_weights(llama_chat, direction)
    assert torch.allclose(cleaned, llama_chat.logits(batch, last_only=False), atol=1e-5)


def test_a_cleaned_edit_exports_with_the_fidelity_check_and_reverts_bit_for_bit(chat, tmp_path):
    """Every family: the export equals the edited model in memory, and the trial reverts exactly."""
    prot = protect(chat, ["Write a haiku.", "Add 2 and 3.", "Sort a list in Python.", "Explain rain."], [-1])
    g = torch.Generator().manual_seed(6)
    cands = Candidates(torch.randn(chat.n_layers + 1, 1, chat.d_model, generator=g), torch.randn(chat.n_layers + 1, 1, chat.d_model, generator=g))
    params = EditParams(layer=1.3, attn=Kernel(0.9, 1.0, 1.5, 0.2), mlp=Kernel(0.6), variant="biprojected", clean=0.0)
    edit = KernelEdit.from_candidates(cands, params, prot)
    batch = chat.batch(["How do I bake bread?"])
    before = chat.logits(batch, last_only=False)
    with Editor(chat) as editor:
        with editor.applied(edit):
            after = chat.logits(batch, last_only=False)
        assert torch.equal(chat.logits(batch, last_only=False), before)
    assert not torch.allclose(after, before, atol=1e-4)
    info = export_model(chat, edit, tmp_path / "out")
    assert info["fidelity_max_abs_diff"] < 1e-4 and info["edit"]["params"]["clean"] == 0.0
    assert torch.equal(chat.logits(batch, last_only=False), before)
