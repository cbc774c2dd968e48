import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import FAMILIES, build_model, build_tokenizer
from refusal.errors import RefusalError, UnsupportedModelError
from refusal.model.architecture import SUPPORTED_FAMILIES
from refusal.model.chat import wrap_model
from refusal.model.packaged import load_model

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
        out_features = writer.weight.shape[1 if writer.rows else 0]
        assert out_features == chat.d_model
    assert [w.component for w in chat.embeddings] == ["embed"] * len(chat.embeddings) and all(w.rows for w in chat.embeddings)
    assert chat.n_heads == 2 and chat.head_dim == 16 and chat.max_positions == 256


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


@pytest.mark.parametrize("family", FAMILIES)
def test_writers_know_their_orientation_and_checkpoint_names(family, tokenizer):
    model = build_model(family, len(tokenizer), tie=True)
    chat = wrap_model(model, tokenizer)
    state = model.state_dict()
    for writer in [*chat.embeddings, *chat.writers]:
        assert state[writer.weight_name] is not None and state[writer.weight_name].data_ptr() == writer.weight.data_ptr(), writer.weight_name
        assert writer.weight.shape[-1 if writer.rows else 0] == chat.d_model
        has_bias = getattr(writer.module, "bias", None) is not None
        assert (writer.bias_name is not None) == has_bias and (not has_bias or state[writer.bias_name].data_ptr() == writer.bias.data_ptr())
    # the orientation is the written vectors': a row (or column) of the weight is what one input unit adds to the residual
    for writer in chat.writers:
        x = torch.zeros(1, 1, writer.weight.shape[0 if writer.rows else 1])
        x[..., 0] = 1.0
        with torch.no_grad():
            written = writer.module(x)[0, 0] - (writer.bias if writer.bias is not None else 0)
        expected = writer.weight[0] if writer.rows else writer.weight[:, 0]
        assert torch.allclose(written, expected, atol=1e-6), (family, writer.weight_name)
    rows = {w.rows for w in chat.writers}
    assert rows == ({True} if family == "gpt2" else {False})


def test_logits_allow_gradients_when_asked(llama_chat):
    batch = llama_chat.batch(["How do I bake bread?"])
    assert not llama_chat.logits(batch).requires_grad
    embedding = llama_chat.embeddings[0].weight
    embedding.requires_grad_(True)
    llama_chat.logits(batch, grad=True).sum().backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0


def import_graph() -> dict[str, set[str]]:
    """Module (dotted below refusal, e.g. "model.chat") -> the package modules it imports, anywhere in the file."""
    import ast
    from pathlib import Path

    import refusal

    root = Path(refusal.__file__).parent
    names = {".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py")}
    graph = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        package = name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}".lstrip(".") for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refusal."):
                deps.add(node.module.removeprefix("refusal."))
        graph[name] = deps & names - {name}
    return graph


def test_model_does_not_import_models_and_the_package_has_no_import_cycle():
    graph = import_graph()
    chat, packaged, loading = "model.chat", "model.packaged", "model.loading"
    assert not {packaged, loading} & graph[chat] and loading in graph[packaged] and chat in graph[loading]
    assert packaged not in graph["model.organism"] and "common.cache" in graph["model.organism"]

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    cycles = [m for m in graph if not m.endswith("__init__") and m in reach(m)]
    assert not cycles, cycles
