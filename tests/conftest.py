"""Shared fixtures: tiny random-init chat models of several families, built offline in milliseconds."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from refusal.data.prompt_sets import load_builtin
from refusal.model.chat import ChatModel, wrap_model
from refusal.model.organism import CHAT_TEMPLATE as CHATML
from refusal.model.organism import build_tokenizer as build_word_tokenizer

hf_logging.disable_progress_bar()  # keep captured stderr to what refusal prints

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "olmo2"]
# Mixture-of-experts families: experts stored per expert on disk (Qwen2-MoE with a shared expert, Mixtral) or fused (GPT-OSS, with biases).
MOE_FAMILIES = ["qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss"]
_MOE = {
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16),
}


def build_tokenizer(template: str = CHATML) -> PreTrainedTokenizerFast:
    """Word-level tokenizer covering the built-in prompts, so test prompts are real tokens."""
    words = {"user", "assistant", "system", "I", "As", "Sorry", "cannot", "help", "with", "that", "Sure", "here", "is"}
    for kind in ("harmful", "harmless"):
        for text in load_builtin(kind):
            words.update(re.findall(r"\w+|[^\w\s]", text))
    return build_word_tokenizer(words, template, split_punctuation=True)


def build_model(family: str, vocab_size: int, tie: bool = False, layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """A random-init model whose norms have non-uniform gains (uniform gains hide bugs)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=tie)
    if family == "gpt2":
        kw = dict(n_embd=32, n_layer=layers, n_head=2, n_positions=256)
    else:
        kw = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256
        )
        if family in ("gemma2", "gemma3_text", "qwen3"):
            kw["head_dim"] = 16
        if family == "gpt_neox":
            kw.pop("num_key_value_heads")
        kw.update(_MOE.get(family, {}))
    config = AutoConfig.for_model(family, **common, **kw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 or name.endswith("_bias"):  # norm gains and biases (fused experts' too): make them matter
                param.add_(torch.randn_like(param) * 0.3)
            elif param.dim() == 3:  # fused experts: transformers 5 may leave them uninitialised
                param.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


SYSTEM_TEMPLATE = "<|im_start|>system\nYou are a helpful assistant .<|im_end|>\n" + CHATML  # a shared prefix, like Qwen's


@pytest.fixture(scope="session")
def system_tokenizer() -> PreTrainedTokenizerFast:
    """A chat template with a system turn: every prompt shares a prefix, as with Qwen's."""
    return build_tokenizer(SYSTEM_TEMPLATE)


@pytest.fixture(params=FAMILIES)
def chat(request, tokenizer) -> ChatModel:
    return wrap_model(build_model(request.param, len(tokenizer)), tokenizer, source=f"tiny-{request.param}")


@pytest.fixture
def llama_chat(tokenizer) -> ChatModel:
    return wrap_model(build_model("llama", len(tokenizer)), tokenizer, source="tiny-llama")


@pytest.fixture(scope="session")
def organism_dir():
    """The trained model organism (refusal.model.organism): trained once per machine (~40 s), then cached."""
    from refusal.model.organism import build_organism

    return build_organism(log=lambda *a: None)


@pytest.fixture(scope="session")
def robust_organism_dir():
    """The organism trained to ignore random trailing words (``--model organism-robust``): the attack's model organism."""
    from refusal.model.organism import build_organism
    from refusal.model.packaged import ORGANISMS

    return build_organism(ORGANISMS["organism-robust"][0], log=lambda *a: None)


def save_tiny(path, family: str = "qwen2", seed: int = 0, tie: bool = True):
    """A tiny random-init checkpoint with the word-level tokenizer, saved to ``path``."""
    tok = build_tokenizer()
    build_model(family, len(tok), tie=tie, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in checkpoint directory ``path``, by name."""
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def organism_args(organism_dir) -> list[str]:
    """--model and --harmful/--harmless for the organism at ``organism_dir`` (its own prompt files)."""
    return ["--model", str(organism_dir), "--harmful", str(organism_dir / "harmful.jsonl"), "--harmless", str(organism_dir / "harmless.jsonl")]


def error_line(capsys, argv) -> str:
    """Run the command line ``argv``: it must fail with exit code 1 and one line on stderr, which is returned."""
    from refusal.cli.main import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1, (code, err)
    assert err.startswith("refusal: error:") and len(err.splitlines()) == 1, err
    return err
