import torch

from refusal.data.prompt_sets import load_builtin
from refusal.residual.activations import collect_activations, mean_activations

PROMPTS = load_builtin("harmless", "val")[:7]


def test_streaming_means_equal_batch_means(chat):
    per_prompt = collect_activations(chat, PROMPTS, batch_size=7)
    assert per_prompt.shape == (7, chat.n_layers + 1, chat.n_post, chat.d_model)
    streamed = mean_activations(chat, PROMPTS, batch_size=3)
    assert torch.allclose(streamed, per_prompt.mean(0), atol=1e-5)


def test_left_padded_batches_equal_single_prompts(chat):
    batched = collect_activations(chat, PROMPTS, batch_size=7)
    for i, prompt in enumerate(PROMPTS[:3]):
        single = collect_activations(chat, [prompt], batch_size=1)[0]
        assert torch.allclose(batched[i], single, atol=1e-4), (batched[i] - single).abs().max()


def test_template_tokens_are_identical_at_layer_zero(llama_chat):
    acts = collect_activations(llama_chat, PROMPTS)
    # the layer-0 input is the token embedding alone: same template token -> same vector
    assert torch.equal(acts[0, 0], acts[1, 0])
