"""An edit is a set of named tensor deltas (issue 28 item 3): a merged LoRA and a bias edit apply in memory, stream
into an export, read back and are fidelity-checked; projections export exactly as before; descriptions read back."""

import json

import pytest
import torch

from conftest import checkpoint_tensors, save_tiny
from refusal.checkpoint.export import FIDELITY_PROMPTS, export_model, fidelity_check
from refusal.checkpoint.read_back import ExportSwap
from refusal.edit.deltas import Added, LowRank, Projection, Removal
from refusal.edit.described import edit_from_dict
from refusal.edit.edits import EditParams, Kernel, KernelEdit, Orthogonalization, edited
from refusal.edit.tensor_deltas import FILE, TensorDeltas
from refusal.edit.tensor_edit import TensorEdit
from refusal.edit.weights import Snapshot, remove_direction
from refusal.errors import FidelityError, RefusalError
from refusal.model.packaged import load_model
from refusal.residual.directions import Candidates, unit_vector

Q = "model.layers.1.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"  # [64, 32]
K_BIAS = "model.layers.0.self_attn.k_proj.bias"
NORM = "model.layers.2.input_layernorm.weight"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora(rows: int, cols: int, rank: int, seed: int = 0) -> LowRank:
    g = generator(seed)
    return LowRank(torch.randn(rows, rank, generator=g) * 0.3, torch.randn(rank, cols, generator=g) * 0.3, scale=0.5)


def bias_edit(chat) -> TensorDeltas:
    g = generator(1)
    k_bias, norm = (dict(chat.model.named_parameters())[n] for n in (K_BIAS, NORM))
    return TensorDeltas({K_BIAS: Added(torch.randn(k_bias.shape, generator=g)), NORM: Added(0.5 * torch.randn(norm.shape, generator=g))})


def logits(chat) -> torch.Tensor:
    return chat.logits(chat.batch(list(FIDELITY_PROMPTS)), last_only=False)


def in_memory_state(chat, edit) -> dict[str, torch.Tensor]:
    with edited(chat, edit):
        return {k: v.detach().clone() for k, v in chat.model.state_dict().items()}


@pytest.fixture
def qwen2(tmp_path):
    """A tiny Qwen2-style checkpoint (q/k/v biases) and the model loaded from it."""
    source = save_tiny(tmp_path / "src", "qwen2", tie=False)
    return source, load_model(str(source), device="cpu")


@pytest.mark.parametrize("make", [lambda chat: TensorDeltas({Q: lora(32, 32, 4)}), bias_edit], ids=["low_rank_q_proj", "added_bias_and_norm"])
def test_a_tensor_delta_edit_streams_like_the_edit_in_memory(qwen2, tmp_path, make):
    source, chat = qwen2
    edit = make(chat)
    before = {k: v.clone() for k, v in chat.model.state_dict().items()}
    original = logits(chat)
    expected = in_memory_state(chat, edit)
    info = export_model(chat, edit, tmp_path / "out")
    assert info["written"]["streamed"] and info["written"]["tensors_edited"] == len(edit.tensor_deltas)
    assert info["written"]["tensor_check_max_residual"] <= 1
    assert info["fidelity_reference"] == "the edited model in memory" and info["fidelity_max_abs_diff"] < 1e-4
    exported, src = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(source)
    for name, value in exported.items():
        assert torch.equal(value, expected[name]), name  # float32: the same blocks in memory and streamed
        assert torch.equal(value, src[name]) == (name not in edit.tensor_deltas), name  # only the edited tensors change
    assert all(torch.equal(v, before[k]) for k, v in chat.model.state_dict().items())  # the model is as it was
    with ExportSwap(chat, tmp_path / "out").swapped():  # the names come from refusal.json
        swapped = logits(chat)
    with edited(chat, edit):
        assert torch.equal(swapped, logits(chat)) and (swapped - original).abs().max() > 1e-3  # the edit matters


def test_a_tampered_export_fails_the_fidelity_check(qwen2, tmp_path):
    from safetensors.torch import load_file, save_file

    _, chat = qwen2
    edit = TensorDeltas({Q: lora(32, 32, 4)})
    export_model(chat, edit, tmp_path / "out")
    with edited(chat, edit):
        expected = logits(chat)
    assert fidelity_check(chat, tmp_path / "out", expected, in_place=True, names=[Q]) < 1e-4
    (file,) = (tmp_path / "out").glob("*.safetensors")
    tensors = load_file(str(file))
    tensors[Q] = tensors[Q] + 0.5 * lora(32, 32, 4).a @ lora(32, 32, 4).b  # a wrong delta: 1.5 times the right one
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(FidelityError, match="the edited model in memory"):
        fidelity_check(chat, tmp_path / "out", expected, in_place=True, names=[Q])


def test_a_wrong_streamed_delta_fails_its_tensor_check():
    weight = torch.randn(64, 32, generator=generator(2))
    delta = lora(64, 32, 8)
    assert delta.streamed("w", weight.clone()) <= 1 and Added(torch.ones(64, 32)).streamed("w", weight.clone()) <= 1
    assert not LowRank(delta.a, delta.b, float("nan")).streamed("w", weight.clone()) <= 1  # NaN fails
    assert not Added(torch.full((64, 32), float("nan"))).streamed("w", weight.clone()) <= 1
    with pytest.raises(RefusalError, match="low-rank delta"):
        LowRank(delta.b.T, delta.a.T).streamed("w", weight.clone())
    with pytest.raises(RefusalError, match="added delta"):
        Added(torch.ones(3)).streamed("w", weight.clone())


def test_a_streamed_delta_written_wrong_fails_its_check_and_nothing_is_exported(qwen2, tmp_path, monkeypatch):
    _, chat = qwen2
    right = torch.Tensor.addmm_

    def off_by_a_percent(self, a, b, *, alpha=1.0):  # a bug in the streamed arithmetic
        return right(self, a, b, alpha=1.01 * alpha)

    monkeypatch.setattr(torch.Tensor, "addmm_", off_by_a_percent)
    with pytest.raises(RefusalError, match=f"edited tensor {Q} failed its check"):
        export_model(chat, TensorDeltas({Q: lora(32, 32, 4)}), tmp_path / "out", check=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def old_streamed(chat, removal: Removal, source) -> dict[str, torch.Tensor]:
    """The export before deltas: each writer tensor through ``TensorEdit`` with the units ``tensor_edits`` built."""
    tensors = checkpoint_tensors(source)
    for writer in (*chat.embeddings, *chat.writers):
        units = [writer.direction(Removal.unit(u, writer).float().cpu()).float().cpu() for u, _ in removal.steps]
        steps = tuple((u, s) for u, (_, strength) in zip(units, removal.steps) if (s := strength(writer)) != 0)
        TensorEdit(writer.weight_name, steps, writer.rows, removal.norms).apply(tensors[writer.weight_name])
        if writer.bias_name is not None:
            TensorEdit(writer.bias_name, steps, rows=True).apply(tensors[writer.bias_name])
    return tensors


def kernel(chat, variant: str = "projection+written_norms") -> KernelEdit:
    g = generator(3)
    params = EditParams(
        layer=1.0, attn=Kernel(0.9, 1.0, 0.8, 0.2), mlp=Kernel(0.7, 2.0, 1.5, 0.1), variant=variant,
        second={"vector": torch.randn(chat.d_model, generator=g).tolist(), "strength": 0.6},
    )  # fmt: skip
    return KernelEdit(unit_vector(torch.randn(chat.d_model, generator=g)), params)


@pytest.mark.parametrize("variant", ["projection", "projection+written_norms", "projection+coordinate_norms"])
def test_projection_deltas_give_the_exports_and_edits_of_before_bit_for_bit(tmp_path, variant):
    source = save_tiny(tmp_path / "src", "gemma2", tie=True)  # post-norm gains, a tied embedding
    chat = load_model(str(source), device="cpu")
    for i, edit in enumerate([Orthogonalization(torch.randn(chat.d_model, generator=generator(4))), kernel(chat, variant)]):
        removal = edit.removal(chat.n_layers)
        export_model(chat, edit, tmp_path / f"out{i}")
        want = old_streamed(chat, removal, source)
        got = checkpoint_tensors(tmp_path / f"out{i}")
        assert all(torch.equal(got[name], want[name]) for name in want)
        snapshot = Snapshot(chat)
        for unit, strength in removal.steps:  # the edit in memory before deltas: ``remove_direction`` step by step
            remove_direction(chat, unit, strength, snapshot, norms=removal.norms)
        old = {k: v.detach().clone() for k, v in chat.model.state_dict().items()}
        snapshot.restore()
        new = in_memory_state(chat, edit)
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
        as_deltas = TensorDeltas(edit.deltas(chat))  # the same deltas as a generic edit: the same export
        export_model(chat, as_deltas, tmp_path / f"deltas{i}")
        assert all(torch.equal(got[name], value) for name, value in checkpoint_tensors(tmp_path / f"deltas{i}").items())


def same_deltas(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(
        type(left[n]) is type(right[n])
        and left[n].numbers() == right[n].numbers()
        and left[n].tensors().keys() == right[n].tensors().keys()
        and all(torch.equal(t, right[n].tensors()[p]) for p, t in left[n].tensors().items())
        for n in left
    )


def test_every_kind_of_edit_reads_back_from_its_description(qwen2):
    _, chat = qwen2
    g = generator(5)
    direction = torch.randn(chat.d_model, generator=g)
    n = chat.n_layers + 1
    candidates = Candidates(torch.randn(n, 2, chat.d_model, generator=g), torch.randn(n, 2, chat.d_model, generator=g))
    params = EditParams(
        layer=1.5, attn=Kernel(0.8, 1.0, 1.0), variant="biprojected_targets+written_norms", second={"vector": [1.0] * chat.d_model, "strength": 0.5}
    )
    cases = [
        (Orthogonalization(direction), {"direction": direction}),
        (KernelEdit.from_candidates(candidates, params), {"candidates": candidates}),
        (TensorDeltas({K_BIAS: Added(torch.randn(32, generator=g).bfloat16())}, note={"lora": "r4"}), {}),
        (TensorDeltas({UP: lora(64, 32, 16)}), {}),  # large: in a file (read back in the test below)
    ]
    for edit, artifacts in cases[:3]:
        described = json.loads(json.dumps(edit.describe()))
        back = edit_from_dict(described, **artifacts)
        assert back.describe() == edit.describe() and same_deltas(back.deltas(chat), edit.deltas(chat))
    assert cases[2][0].describe()["file"] is None and cases[3][0].describe()["file"] == FILE
    with pytest.raises(RefusalError, match="candidates="):
        edit_from_dict(cases[1][0].describe())
    with pytest.raises(RefusalError, match="unknown edit kind"):
        edit_from_dict({"kind": "lora"})
    with pytest.raises(RefusalError, match="unknown artifact"):
        edit_from_dict({"kind": "orthogonalization"}, vector=direction)


def test_deltas_kept_in_a_file_read_back_and_a_tampered_file_is_refused(qwen2, tmp_path):
    from safetensors.torch import load_file, save_file

    _, chat = qwen2
    edit = TensorDeltas({UP: lora(64, 32, 16), Q: Projection(((unit_vector(torch.randn(32, generator=generator(6))), 0.5),), rows=False)})
    info = export_model(chat, edit, tmp_path / "out")
    described = json.loads((tmp_path / "out" / "refusal.json").read_text())["edit"]
    assert described == info["edit"] and described["file"] == FILE and (tmp_path / "out" / FILE).is_file()
    back = edit_from_dict(described, directory=tmp_path / "out")
    assert same_deltas(back.deltas(chat), edit.deltas(chat))
    with pytest.raises(RefusalError, match="directory="):
        edit_from_dict(described)
    tensors = load_file(str(tmp_path / "out" / FILE))
    tensors[f"{UP}:a"][0, 0] += 1.0
    save_file(tensors, str(tmp_path / "out" / FILE))
    with pytest.raises(RefusalError, match="sha256"):
        edit_from_dict(described, directory=tmp_path / "out")


def test_a_delta_on_experts_stored_one_matrix_each_is_refused_but_a_projection_streams(tmp_path):
    source = save_tiny(tmp_path / "src", "qwen2_moe", tie=False)
    chat = load_model(str(source), device="cpu")
    fused = next(w for w in chat.writers if w.weight.dim() == 3)
    assert fused.weight_name not in checkpoint_tensors(source)  # stored one matrix per expert
    with pytest.raises(RefusalError, match="one matrix per expert"):
        export_model(chat, TensorDeltas({fused.weight_name: Added(torch.zeros(fused.weight.shape))}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    export_model(chat, TensorDeltas(Orthogonalization(torch.randn(chat.d_model)).deltas(chat)), tmp_path / "out")


def test_a_model_saved_from_memory_carries_the_deltas(tokenizer, tmp_path):
    from conftest import build_model
    from refusal.model.chat import wrap_model

    chat = wrap_model(build_model("qwen2", len(tokenizer)), tokenizer, source="tiny-qwen2")
    edit = bias_edit(chat)
    info = export_model(chat, edit, tmp_path / "out")
    assert not info["written"]["streamed"] and info["fidelity_max_abs_diff"] < 1e-4
    expected = in_memory_state(chat, edit)
    assert all(torch.equal(v, expected[k]) for k, v in checkpoint_tensors(tmp_path / "out").items() if k in edit.tensor_deltas)


def test_a_delta_on_an_unknown_tensor_is_refused_by_name(qwen2):
    _, chat = qwen2
    with pytest.raises(RefusalError, match="no parameter model.layers.9.q.weight"):
        with edited(chat, TensorDeltas({"model.layers.9.q.weight": Added(torch.zeros(1))})):
            pass
