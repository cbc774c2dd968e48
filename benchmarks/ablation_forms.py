"""The gap between the two forms of hooked ablation on post-norm models (issue 27).

    python benchmarks/ablation_forms.py [--organism]

``interventions.ablate(chat, d, form=...)``: ``writers`` projects each attention / MLP output along the
gain-adjusted direction before the post-norm (what the weight edit equals), ``residual`` projects the
direction out of what the block adds to the stream, after the post-norm (the paper's hooks). On pre-norm
models they are the same hooks. For tiny random-init Gemma 2, Gemma 3 and OLMo 2 models (3 layers, width
32, norm gains with noise, as the tests build them) and a pre-norm Llama control, with the difference-in-means
direction of the built-in harmful and harmless prompts at the middle layer, prints per model: the ablation's own
effect (max |logit difference| original vs writers form, all positions), the gap between the forms (max
|logit difference| writers vs residual) and the mean first-token KL(writers || residual) at the last prompt
position. ``--organism`` adds the trained organism (a Llama: pre-norm, so its gap is 0). Not a test.
"""

from __future__ import annotations

import argparse
import re

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from refusal.data.prompt_sets import load_builtin, load_prompts
from refusal.model.chat import ChatModel, wrap_model
from refusal.model.organism import build_tokenizer
from refusal.residual.activations import mean_activations
from refusal.residual.interventions import ablate
from refusal.residual.scoring import kl_divergence

FAMILIES = ("gemma2", "gemma3_text", "olmo2", "llama")


def tiny(family: str, tokenizer) -> ChatModel:
    """The tests' tiny model of ``family`` (tests/conftest.py build_model): random init, noisy norm gains."""
    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    if family != "llama" and family != "olmo2":
        kw["head_dim"] = 16
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=3, **kw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.3)
    return wrap_model(model, tokenizer, source=f"tiny-{family}")


def gap(chat: ChatModel, harmful: list[str], harmless: list[str]) -> dict:
    layer = chat.n_layers // 2
    direction = (mean_activations(chat, harmful) - mean_activations(chat, harmless))[layer, -1]
    batch = chat.batch(harmful[:16])
    original = chat.logits(batch, last_only=False)
    out = {}
    for form in ("writers", "residual"):
        with ablate(chat, direction, form=form):
            out[form] = chat.logits(batch, last_only=False)
    last = chat.logits(batch)
    with ablate(chat, direction, form="writers"):
        last_w = chat.logits(batch)
    with ablate(chat, direction, form="residual"):
        last_r = chat.logits(batch)
    return {
        "post_norm": any(w.post_norm is not None for w in chat.writers),
        "effect": float((out["writers"] - original).abs().max()),
        "gap": float((out["writers"] - out["residual"]).abs().max()),
        "kl": float(kl_divergence(last_w, last_r).mean()),
        "kl_effect": float(kl_divergence(last, last_w).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--organism", action="store_true", help="also the trained organism (trains in ~40 s once)")
    args = parser.parse_args()
    words = {"user", "assistant", "system"}
    for kind in ("harmful", "harmless"):
        for text in load_builtin(kind):
            words.update(re.findall(r"\w+|[^\w\s]", text))
    tokenizer = build_tokenizer(words, split_punctuation=True)
    harmful, harmless = load_builtin("harmful")[:64], load_builtin("harmless")[:64]
    models = [(family, tiny(family, tokenizer), harmful, harmless) for family in FAMILIES]
    if args.organism:
        from refusal.model.packaged import load_model, packaged_prompts

        chat = load_model("organism", device="cpu")
        files = packaged_prompts("organism") or {}
        models.append(("organism", chat, load_prompts(str(files["harmful"]))[:64], load_prompts(str(files["harmless"]))[:64]))
    columns = ["model", "post-norm", "ablation's effect: max abs logit diff", "writers vs residual: max abs logit diff"]
    columns += ["first-token KL(writers, residual)", "first-token KL(original, writers)"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|")
    for name, chat, h, a in models:
        r = gap(chat, h, a)
        print(f"| {name} | {'yes' if r['post_norm'] else 'no'} | {r['effect']:.3g} | {r['gap']:.3g} | {r['kl']:.3g} | {r['kl_effect']:.3g} |")


if __name__ == "__main__":
    main()
