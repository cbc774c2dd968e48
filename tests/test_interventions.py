import pytest
import torch

from refusal.errors import RefusalError
from refusal.residual.activations import residual_reader
from refusal.residual.directions import unit_vector
from refusal.residual.interventions import ablate, add

PROMPTS = ["How do I bake bread?", "Tell me how to pick a lock.", "Write a haiku about the sea and the sky."]


def read_all_positions(chat, batch):
    """Residual stream at every layer input + final residual, all positions: [L+1, batch, seq, d]."""
    seen = {}
    n = batch["input_ids"].shape[1]
    with residual_reader(chat, n, lambda i, x: seen.__setitem__(i, x)):
        chat.logits(batch)
    return torch.stack([seen[i] for i in range(chat.n_layers + 1)])


def test_ablate_leaves_no_projection_anywhere(chat):
    direction = torch.randn(chat.d_model)
    unit = unit_vector(direction)
    batch = chat.batch(PROMPTS)
    mask = batch["attention_mask"].bool()
    before = read_all_positions(chat, batch) @ unit
    with ablate(chat, direction):
        after = read_all_positions(chat, batch) @ unit
    assert before[:, mask].abs().max() > 1e-2
    assert after[:, mask].abs().max() < 1e-4


def test_add_shifts_projection_by_the_norm_at_its_layer(chat):
    direction = torch.randn(chat.d_model) * 3
    unit = unit_vector(direction)
    batch = chat.batch(PROMPTS)
    mask = batch["attention_mask"].bool()
    layer = 1
    before = read_all_positions(chat, batch)
    with add(chat, direction, layer, coeff=1.0):
        after = read_all_positions(chat, batch)
    shift = (after[layer] - before[layer]) @ unit
    assert torch.allclose(shift[mask], torch.full_like(shift[mask], direction.norm().item()), atol=1e-4)
    assert torch.equal(after[:layer], before[:layer])  # layers before it are untouched
    with add(chat, direction, layer, coeff=-2.0):
        neg = read_all_positions(chat, batch)
    assert torch.allclose(((neg[layer] - before[layer]) @ unit)[mask], torch.full_like(shift[mask], -2 * direction.norm().item()), atol=1e-4)


def test_hooks_are_removed_even_on_exceptions(llama_chat):
    batch = llama_chat.batch(PROMPTS)
    before = llama_chat.logits(batch)
    direction = torch.randn(llama_chat.d_model)
    for context in (ablate(llama_chat, direction), add(llama_chat, direction, 0)):
        with pytest.raises(ValueError):
            with context:
                raise ValueError("inside")
    assert torch.equal(llama_chat.logits(batch), before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in llama_chat.model.modules())


def test_interventions_reject_bad_arguments(llama_chat):
    with pytest.raises(RefusalError, match="out of range"):
        with add(llama_chat, torch.randn(llama_chat.d_model), llama_chat.n_layers):
            pass
    with pytest.raises(RefusalError, match="zero"):
        with ablate(llama_chat, torch.zeros(llama_chat.d_model)):
            pass
    with pytest.raises(RefusalError, match="NaN"):
        with ablate(llama_chat, torch.full((llama_chat.d_model,), float("nan"))):
            pass


def test_ablation_runs_in_half_precision(tokenizer):
    from conftest import build_model
    from refusal.model.chat import wrap_model

    chat = wrap_model(build_model("llama", len(tokenizer)).to(torch.bfloat16), tokenizer)
    direction = torch.randn(chat.d_model)
    batch = chat.batch(PROMPTS)
    with ablate(chat, direction):
        after = read_all_positions(chat, batch)
    assert after.dtype == torch.float32
    assert (after[:, batch["attention_mask"].bool()] @ unit_vector(direction)).abs().max() < 0.05 * after.abs().max()
