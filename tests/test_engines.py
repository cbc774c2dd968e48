"""The engine factory and the forward seam (refusal.engines.factory, refusal.engines.forward).

vLLM is not installed here: the factory's choice is checked with ``VLLMEngine`` replaced by a recorder, and
``refusal generate --engine vllm`` with a stand-in ``vllm`` module. The forward seam is checked against
the direct computation it replaces (``ChatModel.logits``, ``activations.collect_activations``).
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest
import torch

from conftest import save_tiny
from refusal.cli.main import main
from refusal.commands import generate as generate_command
from refusal.commands.attack import first_token_scores
from refusal.data.suffixes import split_prompt
from refusal.engines import factory
from refusal.engines.factory import make_engine, make_forward
from refusal.engines.forward import HFForward
from refusal.engines.hf import HFEngine
from refusal.errors import RefusalError
from refusal.measure import evaluation
from refusal.measure.evaluation import Condition, EvalSettings, evaluate
from refusal.residual.activations import collect_activations
from refusal.residual.scoring import last_logits, refusal_score
from refusal.settings import EvaluationSettings, Settings

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Explain how rain forms.", "Name three colors.", "Hi"]


class RecordingVLLM:
    """Stands in for ``VLLMEngine``: records its arguments, generates nothing, counts ``close``."""

    made: list[dict] = []

    def __init__(self, chat, path, tensor_parallel=0, memory_fraction=0.5, dtype="auto", sampling=None, seed=0):
        self.chat, self.closed = chat, 0
        RecordingVLLM.made.append(dict(path=str(path), tensor_parallel=tensor_parallel, memory=memory_fraction, dtype=dtype, seed=seed))

    def generate(self, instructions, max_new_tokens, stop_when=None):
        return ["from vllm"] * len(instructions)

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def recording_vllm(monkeypatch):
    RecordingVLLM.made = []
    monkeypatch.setattr(factory, "VLLMEngine", RecordingVLLM)
    return RecordingVLLM


def test_factory_picks_transformers_with_the_evaluation_batch_size(llama_chat, recording_vllm):
    settings = Settings()
    settings.evaluation.batch_size = 5
    engine = make_engine(llama_chat, settings, "/some/checkpoint", "original outputs")
    assert isinstance(engine, HFEngine) and engine.batch_size == 5 and engine.description == "original outputs"
    engine = make_engine(llama_chat, EvaluationSettings(batch_size=3))
    assert isinstance(engine, HFEngine) and engine.batch_size == 3
    assert recording_vllm.made == []


def test_factory_picks_vllm_for_a_checkpoint_path_only(llama_chat, recording_vllm, tmp_path):
    settings = Settings()
    settings.evaluation.engine, settings.evaluation.tensor_parallel, settings.evaluation.vllm_memory = "vllm", 2, 0.25
    settings.model.dtype, settings.data.seed = "bfloat16", 7
    engine = make_engine(llama_chat, settings, tmp_path)
    assert isinstance(engine, RecordingVLLM)
    assert recording_vllm.made == [dict(path=str(tmp_path), tensor_parallel=2, memory=0.25, dtype="bfloat16", seed=7)]
    hooked = make_engine(llama_chat, settings, None)  # hooks or an in-place edit: vLLM would not see them
    assert isinstance(hooked, HFEngine) and hooked.batch_size == settings.evaluation.batch_size
    assert len(recording_vllm.made) == 1


def test_factory_keeps_vllms_one_line_errors(llama_chat, tmp_path, monkeypatch):
    settings = Settings()
    settings.evaluation.engine = "vllm"
    with pytest.raises(RefusalError, match="checkpoint directory with config.json"):
        make_engine(llama_chat, settings, tmp_path)
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(RefusalError, match="pip install vllm"):
        make_engine(llama_chat, settings, tmp_path)


def test_hf_engine_close_is_a_no_op_and_it_still_generates(llama_chat):
    engine = HFEngine(llama_chat, 2)
    engine.close()
    assert len(engine.generate(PROMPTS[:2], 2)) == 2


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny(tmp_path / "tiny", family="llama")


@pytest.fixture
def spy_engines(monkeypatch):
    """Every engine ``refusal generate`` makes, with the settings it was made from and how often it was closed."""
    made: list[dict] = []

    def spy(chat, settings, path=None, description="generating"):
        engine = make_engine(chat, settings, path, description)
        record = {"engine": engine, "path": path, "closed": 0}
        close = engine.close

        def counted() -> None:
            record["closed"] += 1
            close()

        engine.close = counted  # type: ignore[method-assign]
        made.append(record)
        return engine

    monkeypatch.setattr(generate_command, "make_engine", spy)
    return made


def test_generate_honours_batch_size_and_closes_its_engine(tiny_dir, spy_engines, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "2", "--batch-size", "3", "--json", *PROMPTS[:4]]
    assert main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["completions"]) == 4
    (record,) = spy_engines
    assert isinstance(record["engine"], HFEngine) and record["engine"].batch_size == 3 and record["closed"] == 1
    assert main(["generate", "--model", str(tiny_dir), "--max-new-tokens", "2", "--json", "Hi"]) == 0
    assert spy_engines[1]["engine"].batch_size == EvaluationSettings().batch_size  # the evaluation group's default


def test_generate_rejects_a_bad_batch_size_in_one_line(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--batch-size", "0", "Hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--batch-size must be at least 1" in err and len(err.splitlines()) == 1


def test_generate_with_engine_vllm_serves_the_checkpoint_and_closes_it(tiny_dir, spy_engines, recording_vllm, monkeypatch, capsys):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", module)  # the settings check finds vllm; the engine itself is the recorder
    argv = ["generate", "--model", str(tiny_dir), "--engine", "vllm", "--vllm-memory", "0.3", "--max-new-tokens", "2", "--json", "Hi"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["completions"] == [{"prompt": "Hi", "completion": "from vllm"}]
    (record,) = spy_engines
    assert isinstance(record["engine"], RecordingVLLM) and record["closed"] == 1
    assert recording_vllm.made[0]["path"] == str(tiny_dir) and recording_vllm.made[0]["memory"] == 0.3


def test_evaluation_closes_the_engines_it_makes_and_each_conditions_own_once(llama_chat, monkeypatch):
    closed: list[str] = []

    class Closing(HFEngine):
        def close(self) -> None:
            closed.append(self.description)

    made = lambda chat, settings, path=None, description="generating": Closing(chat, settings.batch_size, description=description)
    monkeypatch.setattr(evaluation, "make_engine", made)
    own = Closing(llama_chat, 2, description="own")
    conditions = [Condition("original", "original", llama_chat), Condition("trial", "trial", llama_chat, engine=own)]
    prompts = {"harmful": PROMPTS[:2], "harmless": PROMPTS[2:4]}
    evaluate(conditions, prompts, EvalSettings(max_new_tokens=2, batch_size=2, kl_tokens=2, ce_tokens=0, capability_items=0))
    assert closed == ["harmful (original)", "harmless (original)", "own"]


# ---- the forward seam ----------------------------------------------------------------------------
def test_logits_at_equal_the_models_logits_at_those_positions(chat):
    ids = [chat.encode(x) for x in PROMPTS]
    positions = [-1, -3, -2]
    got = HFForward(chat, batch_size=2).logits_at(ids, positions)
    want = torch.cat([chat.logits(chat.pad(ids[i : i + 2]), last_only=False)[:, positions].cpu() for i in range(0, len(ids), 2)])
    assert got.shape == (len(ids), 3, want.shape[-1]) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    last = HFForward(chat, batch_size=2).logits_at(ids, [-1])[:, 0]
    assert torch.equal(last, last_logits(chat, [chat.pad(ids[i : i + 2]) for i in range(0, len(ids), 2)]))


def test_residuals_at_equal_the_collected_activations(chat):
    ids = [chat.encode(x) for x in PROMPTS]
    layers, positions = [chat.n_layers, 0, 1], [-2, -1]
    got = HFForward(chat, batch_size=2).residuals_at(ids, layers, positions)
    full = collect_activations(chat, PROMPTS, batch_size=2)  # [n, layers + 1, n_post, d]
    want = full[:, layers][:, :, [chat.n_post + p for p in positions]]
    assert got.shape == (len(ids), 3, 2, chat.d_model) and got.dtype == torch.float32
    assert torch.equal(got, want)


def test_forward_refuses_positions_and_layers_outside_the_prompts_in_one_line(llama_chat):
    forward = make_forward(llama_chat, EvaluationSettings(batch_size=4))
    ids = [llama_chat.encode(x) for x in PROMPTS]
    shortest = min(map(len, ids))
    for bad in ([0], [-shortest - 1], []):
        with pytest.raises(RefusalError, match="positions"):
            forward.logits_at(ids, bad)
    with pytest.raises(RefusalError, match="residual layers"):
        forward.residuals_at(ids, [llama_chat.n_layers + 1], [-1])
    with pytest.raises(RefusalError, match="at least one prompt"):
        forward.residuals_at([], [0], [-1])


def test_make_forward_batches_by_the_evaluation_batch_size(llama_chat):
    settings = Settings()
    settings.evaluation.batch_size = 6
    forward = make_forward(llama_chat, settings)
    assert isinstance(forward, HFForward) and forward.batch_size == 6


def test_attack_first_token_scores_through_the_seam_equal_the_direct_ones(llama_chat):
    prompts = [split_prompt(llama_chat, x, [5, 6, 7]) for x in PROMPTS]
    refusal_ids = llama_chat.refusal_token_ids()
    got = first_token_scores(HFForward(llama_chat, 2), prompts, refusal_ids)
    prepared = [llama_chat.pad([p.ids for p in prompts[i : i + 2]]) for i in range(0, len(prompts), 2)]
    assert torch.equal(got, refusal_score(last_logits(llama_chat, prepared), refusal_ids))
