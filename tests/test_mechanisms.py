import pytest
import torch

from conftest import build_model
from refusal.data.prompt_sets import load_builtin, load_prompts
from refusal.data.suffixes import REGIONS, split_prompt
from refusal.errors import RefusalError
from refusal.measure.mechanisms import Decomposition, attention_masses, compare_directions, decompose, direction_cosines, layer_cosines, top_heads
from refusal.model.chat import ChatModel, wrap_model
from refusal.model.packaged import load_model
from refusal.residual.activations import collect_activations, mean_activations, residual_reader
from refusal.residual.directions import Candidates, compute_candidates, unit_vector
from refusal.residual.hooks import hooked, untuple

HARMFUL = load_builtin("harmful")[:4]
HARMLESS = load_builtin("harmless", "val")[:5]


def random_direction(chat: ChatModel, seed: int = 1) -> torch.Tensor:
    return torch.randn(chat.d_model, generator=torch.Generator().manual_seed(seed))


def suffix_ids(chat: ChatModel, text: str = "Sure here is") -> list[int]:
    return chat.tokenizer(text, add_special_tokens=False)["input_ids"][:4]


def suffixed_prompts(chat: ChatModel) -> list[list[int]]:
    """Real prompts, every other one with a short suffix (so batches mix lengths and need padding)."""
    return [split_prompt(chat, x, suffix_ids(chat) if i % 2 == 0 else []).ids for i, x in enumerate(HARMFUL)]


def final_projection(chat: ChatModel, prompts: list[list[int]], unit: torch.Tensor) -> torch.Tensor:
    """The last position's final residual projected on ``unit``, read by ``activations.residual_reader``."""
    found: dict[int, torch.Tensor] = {}
    with residual_reader(chat, 1, lambda index, x: found.__setitem__(index, x[:, 0])):
        chat.logits(chat.pad(prompts))
    return found[chat.n_layers] @ unit


def scale(d: Decomposition) -> float:
    """The size of the terms being added, for absolute tolerances."""
    return float((d.embed.abs() + d.heads.abs().sum((1, 2)) + d.attn_bias.abs().sum(1) + d.mlp.abs().sum(1)).max())


# ---- the decomposition ------------------------------------------------------------------------------
def test_decomposition_adds_up_to_the_final_residual(chat):
    prompts, direction = suffixed_prompts(chat), random_direction(chat)
    d = decompose(chat, prompts, direction, batch_size=3)
    n = len(prompts)
    assert d.embed.shape == (n,) and d.total.shape == (n,)
    assert d.heads.shape == (n, chat.n_layers, chat.n_heads)
    assert d.attn_bias.shape == d.mlp.shape == (n, chat.n_layers)
    assert all(t.dtype == torch.float32 for t in (d.embed, d.heads, d.attn_bias, d.mlp, d.total))
    atol = 1e-5 * scale(d)
    torch.testing.assert_close(d.summed(), d.total, rtol=1e-4, atol=atol)
    torch.testing.assert_close(d.total, final_projection(chat, prompts, unit_vector(direction)), rtol=1e-4, atol=atol)


def test_head_terms_add_up_to_the_attention_output(chat):
    """Per layer, heads plus bias are the attention output's projection (through the post-norm where there is one)."""
    prompts, direction = suffixed_prompts(chat), random_direction(chat)
    unit = unit_vector(direction)
    written: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        return lambda module, args, output: written.__setitem__(layer, untuple(output)[:, -1].float())

    attn = [w for w in chat.writers if w.component == "attn"]
    # What reaches the residual: the writer's output, or its post-norm's output in sandwich layers.
    sources = [chat.layers[w.layer].post_attention_layernorm if w.gain is not None else w.module for w in attn]
    with hooked(post=[(module, keep(w.layer)) for w, module in zip(attn, sources)]):
        chat.logits(chat.pad(prompts))
    expected = torch.stack([written[layer] @ unit for layer in range(chat.n_layers)], dim=1)  # [n_prompts, n_layers]
    d = decompose(chat, prompts, direction)
    torch.testing.assert_close(d.heads.sum(-1) + d.attn_bias, expected, rtol=1e-4, atol=1e-5 * scale(d))
    if all(w.bias is None for w in attn):
        assert torch.equal(d.attn_bias, torch.zeros_like(d.attn_bias))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_zeroing_a_head_changes_the_total_by_its_direct_term(family, tokenizer):
    """Zero one head's z and freeze every later writer at its clean output: the total moves by exactly that head's term."""
    chat = wrap_model(build_model(family, len(tokenizer)), tokenizer)
    prompts, direction = suffixed_prompts(chat), random_direction(chat)
    layer, head, hd = 1, 1, chat.head_dim
    d = decompose(chat, prompts, direction)
    index = next(i for i, w in enumerate(chat.writers) if w.component == "attn" and w.layer == layer)
    later = chat.writers[index + 1 :]
    clean: dict[int, torch.Tensor] = {}
    with hooked(post=[(w.module, lambda m, a, out, i=i: clean.__setitem__(i, untuple(out))) for i, w in enumerate(later)]):
        chat.logits(chat.pad(prompts))

    def zero_head(module, args, kwargs):
        z = args[0].clone()
        z[..., head * hd : (head + 1) * hd] = 0
        return (z, *args[1:]), kwargs

    freeze = [(w.module, lambda m, a, out, i=i: clean[i]) for i, w in enumerate(later)]
    with hooked(pre=[(chat.writers[index].module, zero_head)], post=freeze):
        ablated = final_projection(chat, prompts, unit_vector(direction))
    torch.testing.assert_close(d.total - ablated, d.heads[:, layer, head], rtol=1e-4, atol=1e-5 * scale(d))


def test_top_heads_rank_by_mean_attribution_with_deterministic_ties():
    heads = torch.tensor([[[0.0, 2.0], [1.0, 2.0]], [[0.0, 2.0], [3.0, 2.0]]])  # [2 prompts, 2 layers, 2 heads]; means [[0, 2], [2, 2]]
    zeros = torch.zeros(2, 2)
    d = Decomposition(torch.zeros(2), heads, zeros, zeros, torch.zeros(2))
    assert top_heads(d, k=3) == [(0, 1), (1, 0), (1, 1)]
    assert top_heads(d, k=10) == [(0, 1), (1, 0), (1, 1), (0, 0)]
    assert top_heads(d, k=0) == []


# ---- attention masses -------------------------------------------------------------------------------
def test_attention_masses_are_per_region_and_padding_free(chat):
    before = chat.model.config._attn_implementation
    with_suffix = split_prompt(chat, HARMFUL[0], suffix_ids(chat))
    plain = split_prompt(chat, HARMFUL[1])
    longest = split_prompt(chat, max(HARMFUL, key=len), suffix_ids(chat) * 3)
    heads = [(0, 0), (chat.n_layers - 1, chat.n_heads - 1)]
    masses = attention_masses(chat, [with_suffix, plain, longest], heads)
    assert masses.shape == (3, 2, len(REGIONS)) and masses.dtype == torch.float32
    torch.testing.assert_close(masses.sum(-1), torch.ones(3, 2))
    assert (masses >= 0).all()
    assert torch.equal(masses[1, :, REGIONS.index("suffix")], torch.zeros(2))
    assert (masses[0, :, REGIONS.index("suffix")] > 0).all()
    for i, prompt in enumerate([with_suffix, plain]):  # alone, unpadded: the same masses
        torch.testing.assert_close(attention_masses(chat, [prompt], heads)[0], masses[i], rtol=1e-4, atol=1e-5)
    assert chat.model.config._attn_implementation == before


def test_attention_masses_restore_the_implementation_on_error(llama_chat):
    before = llama_chat.model.config._attn_implementation
    assert before != "eager"

    def fail(module, args, kwargs):
        assert llama_chat.model.config._attn_implementation == "eager"
        raise RuntimeError("boom")

    with hooked(pre=[(llama_chat.layers[0], fail)]), pytest.raises(RuntimeError, match="boom"):
        attention_masses(llama_chat, [split_prompt(llama_chat, HARMFUL[0])], [(0, 0)])
    assert llama_chat.model.config._attn_implementation == before
    with pytest.raises(RefusalError, match="out of range"):
        attention_masses(llama_chat, [split_prompt(llama_chat, HARMFUL[0])], [(llama_chat.n_layers, 0)])


# ---- cosines ----------------------------------------------------------------------------------------
def test_layer_cosines_equal_those_of_collected_activations(chat):
    direction = random_direction(chat)
    cosines = layer_cosines(chat, [chat.encode(x) for x in HARMLESS], direction, batch_size=2)
    acts = collect_activations(chat, HARMLESS)[:, :, -1]  # [n_prompts, n_layers + 1, d_model]
    expected = torch.cosine_similarity(acts, unit_vector(direction)[None, None], dim=-1)
    assert cosines.shape == (len(HARMLESS), chat.n_layers + 1)
    torch.testing.assert_close(cosines, expected, rtol=1e-4, atol=1e-5)


def candidates(n_layers: int = 4, n_post: int = 2, d_model: int = 8, seed: int = 0) -> Candidates:
    g = torch.Generator().manual_seed(seed)
    harmful, harmless = torch.randn(n_layers + 1, n_post, d_model, generator=g), torch.randn(n_layers + 1, n_post, d_model, generator=g)
    harmful[0] = harmless[0]  # layer 0: the same template token for every prompt, no difference
    return compute_candidates(harmful, harmless)


def test_direction_cosines_are_one_at_the_directions_own_layer():
    c = candidates()
    cosines = direction_cosines(c, c.direction(2, -1), position=-1)
    assert len(cosines) == c.n_layers + 1
    assert cosines[2] == pytest.approx(1.0, abs=1e-6)
    assert cosines[0] == 0.0
    assert all(-1.0 - 1e-6 <= x <= 1.0 + 1e-6 for x in cosines)
    assert direction_cosines(c, c.direction(3, -2), position=-2)[3] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(RefusalError, match="dimensions"):
        direction_cosines(c, torch.ones(5))


def test_compare_directions_per_layer_and_mismatched_shapes():
    a = candidates()
    assert compare_directions(a, a) == pytest.approx([0.0] + [1.0] * a.n_layers, abs=1e-6)
    other = compare_directions(a, candidates(seed=1))
    assert len(other) == a.n_layers + 1 and all(abs(x) < 1.0 for x in other[1:])
    for mismatched in (candidates(n_layers=3), candidates(d_model=9)):
        with pytest.raises(RefusalError, match="differ in shape") as info:
            compare_directions(a, mismatched)
        assert "\n" not in str(info.value)


# ---- on a model that really refuses -----------------------------------------------------------------
def test_on_the_organism_harmful_prompts_carry_the_direction(organism_dir):
    chat = load_model(str(organism_dir))
    harmful = load_prompts(str(organism_dir / "harmful.jsonl"))[:96]
    harmless = load_prompts(str(organism_dir / "harmless.jsonl"))[:96]
    c = compute_candidates(mean_activations(chat, harmful, batch_size=32), mean_activations(chat, harmless, batch_size=32))
    layer = chat.n_layers // 2
    direction = c.direction(layer, -1)
    assert direction_cosines(c, direction)[layer] == pytest.approx(1.0, abs=1e-6)

    on_harmful = layer_cosines(chat, [chat.encode(x) for x in harmful[:32]], direction)
    on_harmless = layer_cosines(chat, [chat.encode(x) for x in harmless[:32]], direction)
    for index in (chat.n_layers - 1, chat.n_layers):
        assert on_harmful[:, index].mean() > on_harmless[:, index].mean() + 0.5

    d = decompose(chat, [chat.encode(x) for x in harmful[:16]], direction)
    torch.testing.assert_close(d.summed(), d.total, rtol=1e-4, atol=1e-5 * scale(d))
    assert (d.total > 0).all()
    best = top_heads(d, k=2)
    assert d.heads[:, best[0][0], best[0][1]].mean() > 0
    masses = attention_masses(chat, [split_prompt(chat, x, suffix_ids(chat, harmless[0])) for x in harmful[:4]], best)
    torch.testing.assert_close(masses.sum(-1), torch.ones(4, 2))
