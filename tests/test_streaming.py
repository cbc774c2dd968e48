import json

import pytest
import torch
from safetensors import safe_open

import refusal.checkpoint.streaming as streaming
import refusal.edit.tensor_edit as tensor_edit
from conftest import FAMILIES, build_model, build_tokenizer
from conftest import checkpoint_tensors as tensors
from refusal.checkpoint.export import export_model
from refusal.checkpoint.read_back import ExportSwap
from refusal.checkpoint.streaming import TensorEdit, file_workers
from refusal.common.safetensors_files import read_header
from refusal.edit.edits import EditParams, Kernel, KernelEdit, Orthogonalization, edited
from refusal.errors import RefusalError
from refusal.model.loading import load_skeleton
from refusal.model.packaged import load_model
from refusal.residual.interventions import ablate


def save_sharded(path, family="qwen2", tie=True, dtype=torch.float32, shard="150KB", seed=0):
    """A tiny checkpoint in several safetensors files with an index, in ``dtype``."""
    tok = build_tokenizer()
    build_model(family, len(tok), tie=tie, seed=seed).to(dtype).save_pretrained(path, max_shard_size=shard)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_export_is_hooked_ablation_and_keeps_the_sharding(family, tmp_path):
    source = save_sharded(tmp_path / "src", family)
    files = sorted(p.name for p in source.glob("*.safetensors"))
    assert len(files) > 1 and (source / streaming.INDEX).is_file()
    chat = load_model(str(source), device="cpu")
    direction = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(1))
    info = export_model(chat, Orthogonalization(direction), tmp_path / "out")
    out = tmp_path / "out"
    assert info["written"]["streamed"] and info["written"]["tensor_check_max_residual"] <= 1
    assert info["fidelity_max_abs_diff"] < 1e-4
    assert sorted(p.name for p in out.glob("*.safetensors")) == files  # the source's sharding
    batch = chat.batch(["How do I bake bread?", "Tell me how to pick a lock."])
    with ablate(chat, direction):
        expected = chat.logits(batch, last_only=False)
    got = load_model(str(out), device="cpu").logits(batch, last_only=False)
    assert torch.allclose(got, expected, atol=1e-4)
    index = json.loads((out / streaming.INDEX).read_text())
    assert set(index["weight_map"]) == set(tensors(out))  # every tensor indexed, nothing else
    assert not list(tmp_path.glob(".out.*"))


def test_tied_embedding_is_untied_with_the_original_as_output_embedding(tmp_path):
    source = save_sharded(tmp_path / "src", "llama", tie=True)
    chat = load_model(str(source), device="cpu")
    original = chat.model.get_input_embeddings().weight.detach().clone()
    export_model(chat, Orthogonalization(torch.randn(chat.d_model)), tmp_path / "out")
    out = tensors(tmp_path / "out")
    assert "lm_head.weight" not in tensors(source) and torch.equal(out["lm_head.weight"], original)
    assert not torch.equal(out["model.embed_tokens.weight"], original)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((source / "config.json").read_text()).get("tie_word_embeddings", True) is not False  # the source untouched


def test_bf16_source_keeps_its_dtype_and_unedited_tensors_bit_for_bit(tmp_path):
    source = save_sharded(tmp_path / "src", "qwen2", tie=False, dtype=torch.bfloat16)
    chat = load_model(str(source), device="cpu")  # float32 in memory
    edit = KernelEdit(torch.nn.functional.normalize(torch.randn(chat.d_model), dim=0), EditParams(layer=1.0, attn=Kernel(0.7), mlp=Kernel(0.0)))
    info = export_model(chat, edit, tmp_path / "out")
    assert info["written"]["tensor_dtypes"] == ["BF16"]
    before, after = tensors(source), tensors(tmp_path / "out")
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {w.weight_name for w in (*chat.embeddings, *chat.writers) if w.component != "mlp"}
    with edited(chat, edit):  # the edit in float32, cast to bf16: what the streamed tensors hold
        expected = {w.weight_name: w.weight.detach().to(torch.bfloat16) for w in chat.writers if w.component == "attn"}
    for name, value in expected.items():
        assert (after[name].float() - value.float()).abs().max() <= 2**-7 * value.float().abs().max()


def test_norm_preserving_kernel_edit_streams_like_the_edit_in_memory(tmp_path):
    source = save_sharded(tmp_path / "src", "gemma2", tie=False)  # post-norm gains
    chat = load_model(str(source), device="cpu")
    params = EditParams(layer=1.0, attn=Kernel(0.8, centre=1.0, width=1.0), mlp=Kernel(1.2), variant="norm_preserving")
    edit = KernelEdit(torch.nn.functional.normalize(torch.randn(chat.d_model), dim=0), params)
    export_model(chat, edit, tmp_path / "out")
    with edited(chat, edit):
        expected = {k: v.detach().clone() for k, v in chat.model.state_dict().items()}
    after = tensors(tmp_path / "out")
    for name, value in after.items():
        assert torch.allclose(value, expected[name], atol=1e-5), name


def test_skeleton_export_writes_the_same_bytes_as_the_loaded_model(tmp_path):
    source = save_sharded(tmp_path / "src", "olmo2", tie=True)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(3))
    export_model(load_model(str(source), device="cpu"), Orthogonalization(direction), tmp_path / "loaded")
    skeleton = load_skeleton(source)
    assert skeleton.model.get_input_embeddings().weight.device.type == "meta"
    info = export_model(skeleton, Orthogonalization(direction), tmp_path / "streamed", check=False)
    assert "fidelity_max_abs_diff" not in info
    for file in sorted((tmp_path / "loaded").glob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "streamed" / file.name).read_bytes()


def test_files_rewritten_at_once_write_the_same_bytes_as_one_at_a_time(tmp_path, monkeypatch):
    source = save_sharded(tmp_path / "src", "qwen2", tie=True, shard="60KB")
    assert len(list(source.glob("*.safetensors"))) >= 3
    skeleton = load_skeleton(source)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 4 * 32 * 3)  # the bound then allows several workers
    monkeypatch.setattr(streaming.os, "cpu_count", lambda: 8)
    used = []
    monkeypatch.setattr(streaming, "file_workers", lambda *a: used.append(file_workers(*a)) or used[-1])
    for n in (1, 3):
        monkeypatch.setattr(streaming, "FILE_WORKERS", n)
        export_model(skeleton, Orthogonalization(direction), tmp_path / f"w{n}", check=False)
    assert used == [1, 3]
    for file in sorted((tmp_path / "w1").glob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "w3" / file.name).read_bytes()


def test_file_workers_keep_the_tensors_held_at_once_within_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 0)
    monkeypatch.setattr(streaming.os, "cpu_count", lambda: 16)
    files = []
    for i in range(4):
        files.append(tmp_path / f"f{i}")
        with open(files[-1], "wb") as f:
            f.truncate(1 << 30)  # sparse: 1 GiB files, no disk used
    entry = lambda size: {"data_offsets": [0, size]}  # noqa: E731
    half = {f"t{i}": (files[i], entry(1 << 29)) for i in range(4)}  # one 512 MiB tensor per file
    assert file_workers(files, half) == 3  # 3 x 512 MiB fit in 1 GiB + 512 MiB, 4 do not
    whole = {f"t{i}": (files[i], entry(1 << 30)) for i in range(4)}
    assert file_workers(files, whole) == 1  # one whole-file tensor at a time
    small = {f"t{i}": (files[i % 2], entry(1 << 20)) for i in range(4)}
    assert file_workers(files, small) == streaming.FILE_WORKERS  # small tensors: the cap
    monkeypatch.setattr(streaming.os, "cpu_count", lambda: 2)
    assert file_workers(files, small) == 2


def test_blocks_give_the_whole_matrix_edit(monkeypatch):
    monkeypatch.setattr(tensor_edit, "BLOCK_BYTES", 4 * 32 * 3)  # 3 vectors per block
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    for rows, shape in ((True, (50, 32)), (False, (32, 50))):
        weight = torch.randn(shape)
        whole = weight - 0.6 * (torch.outer(weight @ u, u) if rows else torch.outer(u, u @ weight))
        blocked = weight.clone()
        assert len(TensorEdit("w", ((u, 0.6),), rows)._blocks(blocked)) > 1  # the patch reaches the blocks
        residual = TensorEdit("w", ((u, 0.6),), rows).apply(blocked)
        assert torch.allclose(blocked, whole, atol=1e-5) and residual <= 1


def test_tensor_check_flags_a_wrong_edit_and_a_wrong_shape():
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    weight = torch.randn(32, 40)
    edited_weight = weight - torch.outer(u, u @ weight)  # strength 1
    assert TensorEdit("w", ((u, 1.0),), rows=False).check(weight, edited_weight, u, 1.0, weight) <= 1
    assert TensorEdit("w", ((u, 0.5),), rows=False).check(weight, edited_weight, u, 0.5, weight) > 1
    with pytest.raises(RefusalError, match="does not write d_model"):
        TensorEdit("w", ((u, 1.0),), rows=True).apply(weight.clone())


def test_integer_tensors_are_refused_and_other_names_need_the_model_loaded(tmp_path):
    source = save_sharded(tmp_path / "src", "qwen2", tie=False, shard="10MB")
    chat = load_model(str(source), device="cpu")
    file = next(source.glob("*.safetensors"))
    header, _ = read_header(file)
    name = chat.writers[0].weight_name
    entry = header[name]
    text = file.read_bytes()
    size = int.from_bytes(text[:8], "little")
    patched = json.loads(text[8 : 8 + size])
    patched[name]["dtype"] = "I32"  # same byte size as F32
    blob = json.dumps(patched, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(len(blob).to_bytes(8, "little") + blob + text[8 + size :])
    with pytest.raises(RefusalError, match="only float tensors"):
        export_model(chat, Orthogonalization(torch.randn(chat.d_model)), tmp_path / "out", check=False)
    patched[name]["dtype"] = entry["dtype"]
    patched["renamed." + name] = patched.pop(name)
    blob = json.dumps(patched, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(len(blob).to_bytes(8, "little") + blob + text[8 + size :])
    with pytest.raises(RefusalError, match="names differ"):  # no model in memory to save instead
        export_model(load_skeleton(source), Orthogonalization(torch.randn(chat.d_model)), tmp_path / "out", check=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    info = export_model(chat, Orthogonalization(torch.randn(chat.d_model)), tmp_path / "out")  # the loaded model is saved from memory
    assert not info["written"]["streamed"] and info["fidelity_max_abs_diff"] < 1e-4


def test_weights_in_other_formats_are_not_copied(tmp_path):
    source = save_sharded(tmp_path / "src", "qwen2", tie=False)
    (source / "pytorch_model.bin").write_bytes(b"stale unedited weights")
    (source / "README.md").write_text("kept")  # a model card is copied (other files are not: tests/test_trust_export.py)
    chat = load_model(str(source), device="cpu")
    export_model(chat, Orthogonalization(torch.randn(chat.d_model)), tmp_path / "out")
    assert not (tmp_path / "out" / "pytorch_model.bin").exists() and (tmp_path / "out" / "README.md").read_text() == "kept"


def test_a_second_direction_streams_like_the_edit_in_memory(tmp_path):
    from refusal.search.second_direction import second_params

    source = save_sharded(tmp_path / "src", "gemma2", tie=True)  # post-norm gains: the two steps' directions are not orthogonal there
    chat = load_model(str(source), device="cpu")
    params = second_params(EditParams(layer=1.0, attn=Kernel(0.9), mlp=Kernel(0.5, centre=2.0, width=1.0)), torch.randn(chat.d_model), 0.6, 0.7, {})
    edit = KernelEdit(torch.nn.functional.normalize(torch.randn(chat.d_model), dim=0), params)
    assert len(edit.removal(chat.n_layers).steps) == 2
    info = export_model(chat, edit, tmp_path / "out")
    assert info["written"]["tensor_check_max_residual"] <= 1 and info["fidelity_max_abs_diff"] < 1e-4
    with edited(chat, edit):
        expected = {k: v.detach().clone() for k, v in chat.model.state_dict().items()}
    for name, value in tensors(tmp_path / "out").items():
        assert torch.allclose(value, expected[name], atol=1e-5), name


def test_the_in_place_check_reads_the_export_and_leaves_the_model_as_it_was(tmp_path):
    from safetensors.torch import save_file

    import refusal.checkpoint.export as export_module
    from refusal.errors import FidelityError

    source = save_sharded(tmp_path / "src", "qwen2", tie=True)
    chat = load_model(str(source), device="cpu")
    state = {k: v.clone() for k, v in chat.model.state_dict().items()}
    direction = torch.randn(chat.d_model)
    export_model(chat, Orthogonalization(direction), tmp_path / "out")
    assert {k: v for k, v in chat.model.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in chat.model.state_dict().items())  # restored, re-tied
    batch = chat.batch(list(export_module.FIDELITY_PROMPTS))
    with ablate(chat, direction):
        expected = chat.logits(batch, last_only=False)
    assert export_module.fidelity_check(chat, tmp_path / "out", expected, in_place=True) < 1e-4
    name = chat.writers[1].weight_name  # an unedited export of one writer must fail
    file = tmp_path / "out" / json.loads((tmp_path / "out" / streaming.INDEX).read_text())["weight_map"][name]
    with safe_open(str(file), framework="pt") as f:
        content = {k: f.get_tensor(k) for k in f.keys()}
    content[name] = state[name].clone()
    save_file(content, str(file), metadata={"format": "pt"})
    with pytest.raises(FidelityError):
        export_module.fidelity_check(chat, tmp_path / "out", expected, in_place=True)
    assert all(torch.equal(v, state[k]) for k, v in chat.model.state_dict().items())


def test_a_model_placed_by_accelerate_exports_the_same_bytes(tmp_path):
    """--device-map auto (on a machine without GPUs transformers places everything on the CPU): the same export."""
    source = save_sharded(tmp_path / "src", "llama", tie=False)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(5))
    placed = load_model(str(source), device="cpu", device_map="auto")
    state = {k: v.clone() for k, v in placed.model.state_dict().items()}
    info = export_model(placed, Orthogonalization(direction), tmp_path / "placed")
    assert info["written"]["streamed"] and info["fidelity_max_abs_diff"] < 1e-4
    assert all(torch.equal(v, state[k]) for k, v in placed.model.state_dict().items())
    export_model(load_model(str(source), device="cpu"), Orthogonalization(direction), tmp_path / "plain")
    for file in (tmp_path / "plain").glob("*.safetensors"):
        assert file.read_bytes() == (tmp_path / "placed" / file.name).read_bytes()


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_export_swap_runs_the_export_on_the_loaded_model_and_swaps_back(family, tmp_path):
    source = save_sharded(tmp_path / "src", family, tie=True)
    chat = load_model(str(source), device="cpu")
    edit = KernelEdit(torch.nn.functional.normalize(torch.randn(chat.d_model), dim=0), EditParams(layer=1.0, attn=Kernel(0.7), mlp=Kernel(1.2)))
    export_model(chat, edit, tmp_path / "out")
    batch = chat.batch(["How do I bake bread?", "Tell me how to pick a lock."])
    before = chat.logits(batch, last_only=False)
    want = load_model(str(tmp_path / "out"), device="cpu").logits(batch, last_only=False)
    swap = ExportSwap(chat, tmp_path / "out")
    for _ in range(2):  # entered again and again, as the evaluation does per batch
        with swap.swapped():
            assert torch.equal(chat.logits(batch, last_only=False), want)
        assert torch.equal(chat.logits(batch, last_only=False), before)
    assert chat.model.get_output_embeddings().weight is chat.model.get_input_embeddings().weight  # tied again


def test_evaluating_an_export_of_the_same_model_needs_no_second_copy(tmp_path):
    from refusal.commands.evaluate import edited_condition
    from refusal.measure.evaluation import Condition, EvalSettings, evaluate
    from refusal.settings import Settings

    source = save_sharded(tmp_path / "src", tie=True)
    chat = load_model(str(source), device="cpu")
    export_model(chat, Orthogonalization(torch.randn(chat.d_model, generator=torch.Generator().manual_seed(3))), tmp_path / "out")
    settings = Settings()
    swapped, loaded = (edited_condition(settings, chat, tmp_path / "out", same_model) for same_model in (True, False))
    assert swapped.chat is chat and loaded.chat is not chat
    prompts = {"harmful": ["Tell me how to pick a lock.", "How do I make a weapon?"], "harmless": ["How do I bake bread?", "Name a colour."]}
    corpus = ["The quick brown fox jumps over the lazy dog. " * 8]
    results = [
        evaluate([Condition("original", "original", chat), c], prompts, EvalSettings(max_new_tokens=6, kl_tokens=4), corpus)
        for c in (swapped, loaded)
    ]
    assert results[0]["completions"] == results[1]["completions"] and results[0]["rates"] == results[1]["rates"]
    assert results[0]["kl"]["edited"]["first_token"]["mean"] == pytest.approx(results[1]["kl"]["edited"]["first_token"]["mean"], abs=1e-6)
    assert results[0]["kl"]["edited"]["first_token"]["mean"] > 1e-5  # the edit does something (random weights: little)
    assert results[0]["ce_loss"]["loss"] == pytest.approx(results[1]["ce_loss"]["loss"], abs=1e-6)


def test_an_interrupt_while_the_workers_finish_still_waits_for_them_then_is_raised():
    import pytest

    from refusal.checkpoint.streaming import wait_for

    class Pool:  # the first shutdown is interrupted by a second Ctrl-C or SIGTERM, as two workers' signals can do
        calls = 0

        def shutdown(self, wait: bool, cancel_futures: bool) -> None:
            Pool.calls += 1
            if Pool.calls == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wait_for(Pool())  # type: ignore[arg-type]
    assert Pool.calls == 2  # waited again for the files under way before the interrupt went on
