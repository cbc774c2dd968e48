"""The vLLM engine (refusal.engines.vllm).

vLLM needs a GPU and is not installed in CI, so most tests run the engine against ``FakeVLLM``: a
stand-in ``vllm`` module with the two names the engine uses (``LLM``, ``SamplingParams``) that decodes
greedily with transformers, one prompt at a time, and returns token ids the way vLLM does (the EOS
token included). They check what is ours: the prompts passed as the same token ids, greedy settings,
no remote code, outputs in input order and cut like ``HFEngine``'s, one vLLM model alive at a time,
and the evaluation's verdicts unchanged. The last test runs real vLLM where it and a GPU are present.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import organism_args
from refusal.cli.main import main
from refusal.engines.hf import HFEngine
from refusal.engines.vllm import VLLMEngine, cut_like_hf
from refusal.measure.judges import REFUSAL_PHRASES, is_refusal
from refusal.model.packaged import load_model


class FakeLLM:
    """``vllm.LLM`` for tests: greedy decoding with transformers, one prompt at a time."""

    created: list[dict] = []
    alive = 0
    most_alive = 0

    def __init__(self, **kwargs):
        FakeLLM.created.append(kwargs)
        FakeLLM.alive += 1
        FakeLLM.most_alive = max(FakeLLM.most_alive, FakeLLM.alive)
        self.model = AutoModelForCausalLM.from_pretrained(kwargs["model"], dtype=torch.float32)
        self.eos = self.model.generation_config.eos_token_id

    def generate(self, prompts, params, use_tqdm=True):
        assert params.temperature == 0.0 and not use_tqdm
        out = []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            with torch.inference_mode():
                row = self.model.generate(input_ids=ids, max_new_tokens=params.max_tokens, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
            out.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tuple(row.tolist()))]))
        return out

    def __del__(self):
        FakeLLM.alive -= 1


class FakeSamplingParams:
    def __init__(self, temperature=1.0, top_p=1.0, seed=None, max_tokens=16):
        self.temperature, self.top_p, self.seed, self.max_tokens = temperature, top_p, seed, max_tokens


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.created, FakeLLM.alive, FakeLLM.most_alive = [], 0, 0
    return FakeLLM


def test_cut_like_hf_stops_at_eos_and_at_the_checks_hf_makes():
    decode = lambda ids: " ".join(map(str, ids))
    assert cut_like_hf([5, 6, 2, 7, 8], {2}, decode, None) == [5, 6, 2]
    assert cut_like_hf([5, 6, 7], {2}, decode, None) == [5, 6, 7]
    says_9 = lambda text: "9" in text.split()
    # 9 appears at token 2: HFEngine checks after 4 and 8 new tokens, so it stops after 4
    assert cut_like_hf([5, 9, 6, 7, 8, 1, 3, 4, 0], {2}, decode, says_9) == [5, 9, 6, 7]
    assert cut_like_hf([5, 6, 7, 1, 9, 3, 4, 4, 0], {2}, decode, says_9) == [5, 6, 7, 1, 9, 3, 4, 4]
    assert cut_like_hf([5, 9, 2], {2}, decode, says_9) == [5, 9, 2]  # EOS before the first check


def test_vllm_engine_gives_hf_engines_outputs(fake_vllm, organism_dir):
    chat = load_model(str(organism_dir))
    prompts = [json.loads(line)["instruction"] for name in ("harmful", "harmless") for line in list((organism_dir / f"{name}.jsonl").open())[::7][:6]]
    hf, vllm = HFEngine(chat, batch_size=4), VLLMEngine(chat, organism_dir)
    assert vllm.generate_ids(prompts, 20) == hf.generate_ids(prompts, 20)
    judge = lambda text: is_refusal(text, REFUSAL_PHRASES)
    got, want = vllm.generate(prompts, 20, judge), hf.generate(prompts, 20, judge)
    assert got == want and any(map(judge, want)) and not all(map(judge, want))
    (kwargs,) = fake_vllm.created
    assert kwargs["trust_remote_code"] is False and kwargs["tensor_parallel_size"] >= 1 and kwargs["model"] == str(organism_dir)
    vllm.close()
    assert fake_vllm.alive == 0


def test_evaluate_with_vllm_has_the_transformers_verdicts(fake_vllm, organism_dir, tmp_path):
    fast = ["--n-train", "16", "--n-val", "8", "--n-test", "8", "--max-new-tokens", "12", "--ce-tokens", "64", "--capability-items", "2", "--quiet"]
    run = tmp_path / "run"
    assert main(["run", *organism_args(organism_dir), "--out", str(run), "--layers", "2", *fast]) == 0
    reports = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / engine
        argv = ["evaluate", *organism_args(organism_dir), "--edited", str(run / "model"), "--out", str(out), "--engine", engine, *fast]
        assert main(argv) == 0
        reports[engine] = json.loads((out / "report.json").read_text())
    assert reports["vllm"]["rates"] == reports["transformers"]["rates"]
    assert reports["vllm"]["completions"] == reports["transformers"]["completions"]
    assert [c["model"] for c in fake_vllm.created] == [str(organism_dir), str(run / "model")]
    assert fake_vllm.most_alive == 1  # the original's vLLM model was freed before the export's started


def test_engine_vllm_without_vllm_is_one_line(organism_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    out = tmp_path / "r"
    code = main(["evaluate", *organism_args(organism_dir), "--edited", str(organism_dir), "--out", str(out), "--engine", "vllm", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "pip install vllm" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a GPU; none here")
def test_real_vllm_agrees_with_transformers_on_refusal_verdicts(organism_dir):
    pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm on a GPU machine)")
    chat = load_model(str(organism_dir), device="cuda")
    prompts = [json.loads(line)["instruction"] for name in ("harmful", "harmless") for line in (organism_dir / f"{name}.jsonl").open()][:64]
    judge = lambda text: is_refusal(text, REFUSAL_PHRASES)
    want = [judge(t) for t in HFEngine(chat, batch_size=32).generate(prompts, 24)]
    engine = VLLMEngine(chat, organism_dir, dtype="float32")
    try:
        got = [judge(t) for t in engine.generate(prompts, 24)]
    finally:
        engine.close()
    assert got == want
