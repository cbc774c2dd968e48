import pytest
import torch

from conftest import FAMILIES, build_model
from refusal.edit.edits import orthogonalized
from refusal.edit.weights import embeddings_tied
from refusal.model.chat import wrap_model
from refusal.residual.interventions import ablate

PROMPTS = ["How do I bake bread?", "Tell me how to pick a lock.", "Write a haiku about the sea and the sky."]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_orthogonalized_weights_equal_hooked_ablation(family, tie, tokenizer):
    chat = wrap_model(build_model(family, len(tokenizer), tie=tie), tokenizer)
    direction = torch.randn(chat.d_model)
    batch = chat.batch(PROMPTS)
    mask = batch["attention_mask"].bool()
    original = chat.logits(batch, last_only=False)
    with ablate(chat, direction):
        hooked = chat.logits(batch, last_only=False)
    with orthogonalized(chat, direction):
        edited = chat.logits(batch, last_only=False)
    assert (hooked - original)[mask].abs().max() > 1e-3  # the edit does something
    assert torch.allclose(edited[mask], hooked[mask], atol=1e-4, rtol=1e-4), (edited - hooked)[mask].abs().max()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_orthogonalized_reverts_bit_for_bit(tie, tokenizer):
    chat = wrap_model(build_model("gemma2", len(tokenizer), tie=tie), tokenizer)
    batch = chat.batch(PROMPTS)
    before = chat.logits(batch, last_only=False)
    state = {k: v.clone() for k, v in chat.model.state_dict().items()}
    with orthogonalized(chat, torch.randn(chat.d_model)):
        pass
    assert embeddings_tied(chat) == tie
    assert torch.equal(chat.logits(batch, last_only=False), before)
    for key, value in chat.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_orthogonalized_reverts_after_exception(llama_chat):
    batch = llama_chat.batch(PROMPTS)
    before = llama_chat.logits(batch)
    with pytest.raises(RuntimeError):
        with orthogonalized(llama_chat, torch.randn(llama_chat.d_model)):
            raise RuntimeError("boom")
    assert torch.equal(llama_chat.logits(batch), before)


def test_an_edit_in_place_of_writers_not_in_memory_is_refused(tmp_path):
    from conftest import save_tiny
    from refusal.edit.edits import Editor, Orthogonalization
    from refusal.errors import RefusalError
    from refusal.model.loading import load_skeleton

    chat = load_skeleton(save_tiny(tmp_path / "src"))  # writers on the meta device, as accelerate leaves offloaded ones
    assert not chat.has_weights
    with pytest.raises(RefusalError, match="no weights in memory.*--streaming"):
        with Editor(chat) as editor, editor.applied(Orthogonalization(torch.ones(chat.d_model))):
            pass
