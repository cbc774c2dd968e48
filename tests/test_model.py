import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import FAMILIES, build_model, build_tokenizer
from refusal.errors import RefusalError, UnsupportedModelError
from refusal.model import SUPPORTED_FAMILIES, load_model, wrap_model

TEMPLATES = {
    # name: (template, expected post-instruction text)
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ["<|im_end|>", "<|im_start|>", "assistant"],
    ),
    "llama3": (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>"],
    ),
    "gemma": (
        "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        ["<end_of_turn>", "<start_of_turn>", "model"],
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        ["<|end|>", "<|assistant|>"],
    ),
    # Qwen3-style: with thinking off the template closes an empty think block, which is part of the suffix.
    "thinking": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}",
        ["<|im_end|>", "<|im_start|>", "assistant", "<think>", "</think>"],
    ),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_post_instruction_tokens_follow_the_template(name):
    template, expected = TEMPLATES[name]
    tok = build_tokenizer(template)
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<bos>",
                "<start_of_turn>",
                "<end_of_turn>",
                "<|user|>",
                "<|end|>",
                "<|assistant|>",
                "<think>",
                "</think>",
                "<|im_start|>",
                "<|im_end|>",
            ]
        }
    )
    tok.add_tokens(["model"])
    chat = wrap_model(build_model("llama", len(tok)), tok)
    assert tok.convert_ids_to_tokens(chat.post_instruction_ids) == expected
    # every chat-formatted prompt really ends with these tokens
    for instruction in ["How do I bake bread?", "Name a colour"]:
        assert chat.encode(instruction)[-chat.n_post :] == chat.post_instruction_ids


def test_every_family_exposes_layers_writers_and_embeddings(chat):
    assert chat.n_layers == 3
    assert len(chat.writers) == 2 * chat.n_layers
    assert {w.component for w in chat.writers} == {"attn", "mlp"}
    for writer in chat.writers:
        out_features = writer.module.weight.shape[0 if type(writer.module).__name__ != "Conv1D" else 1]
        assert out_features == chat.d_model


def test_post_norm_families_carry_gains(tokenizer):
    for family, expect in [("gemma2", True), ("olmo2", True), ("llama", False), ("gpt2", False)]:
        chat = wrap_model(build_model(family, len(tokenizer)), tokenizer)
        assert all((w.gain is not None) == expect for w in chat.writers), family


def test_refusal_tokens_come_from_the_tokenizer(llama_chat):
    ids = llama_chat.refusal_token_ids()
    assert llama_chat.tokenizer.convert_ids_to_tokens(ids)[:3] == ["I", "As", "Sorry"]
    assert llama_chat.refusal_token_ids(["Sure"]) == [llama_chat.tokenizer.convert_tokens_to_ids("Sure")]
    with pytest.raises(RefusalError, match="--refusal-tokens"):
        llama_chat.refusal_token_ids(["zzzqqq"])


def test_left_padding_positions_count_real_tokens(llama_chat):
    batch = llama_chat.batch(["Hi", "How do I bake a loaf of bread at home?"])
    mask, pos = batch["attention_mask"], batch["position_ids"]
    assert mask[0, 0] == 0 and mask[1].all()
    assert pos[0, -1] == mask[0].sum() - 1 and pos[1, -1] == mask[1].sum() - 1


def test_unsupported_architecture_is_named(tokenizer):
    config = AutoConfig.for_model(
        "bert", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, is_decoder=True
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError) as info:
        wrap_model(model, tokenizer)
    assert "BertLMHeadModel" in str(info.value) and SUPPORTED_FAMILIES in str(info.value)


def test_missing_chat_template_is_an_error(tokenizer):
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(RefusalError, match="--chat-template"):
        wrap_model(build_model("llama", len(tok)), tok)


def test_load_model_errors(tmp_path):
    with pytest.raises(RefusalError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefusalError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(RefusalError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(RefusalError, match="unknown dtype"):
        load_model(str(tmp_path / "empty"), dtype="float8")


def test_load_model_round_trip(tmp_path, tokenizer):
    model = build_model("qwen2", len(tokenizer), tie=True)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    chat = load_model(str(tmp_path / "m"), device="cpu")
    assert chat.tokenizer.convert_ids_to_tokens(chat.post_instruction_ids) == ["<|im_end|>", "<|im_start|>", "assistant"]
    batch = chat.batch(["How do I bake bread?"])
    with torch.inference_mode():
        expected = model(**batch).logits[:, -1]
    assert torch.allclose(chat.logits(batch), expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_override(tmp_path, family):
    tok = build_tokenizer()
    tok.chat_template = None
    model = build_model(family, len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATES["chatml"][0])
    chat = load_model(str(tmp_path / "m"), device="cpu", chat_template=template)
    assert chat.n_post == 3
