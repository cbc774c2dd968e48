"""Artifacts declared once (run.artifacts): get makes once then reads back, a stale upstream remakes what depends on it,
require refuses missing, stale and foreign data in one line, a new declaration needs no other code, and the
fingerprints of runs made before the declarations are unchanged."""

import json
from dataclasses import replace

import pytest

from conftest import save_tiny
from refusal.cli.main import main
from refusal.common.provenance import digest
from refusal.data.prompt_sets import Prompts, builtin_hash, dataset_hash, load_capability, load_self_questions
from refusal.errors import RefusalError
from refusal.run import store
from refusal.run.artifacts import ARTIFACTS, Artifact
from refusal.run.directory import RunDir
from refusal.run.files import write_json
from refusal.run.known import Reading
from refusal.run.workspace import Context, run_prompts
from refusal.settings import Settings

FAST = ["--n-train", "12", "--n-val", "6", "--n-test", "4", "--max-new-tokens", "4", "--ce-tokens", "64", "--quiet"]
SEARCH = ["--refine", "0", "--second", "0", "--trials", "3", "--anchors", "0.5", "--confirm", "1", "--time-budget", "none"]


def prompts(train: str = "a") -> Prompts:
    return Prompts({k: {"train": [f"{k} {train}"], "val": [f"{k} v"], "test": [f"{k} t"]} for k in ("harmful", "harmless")})


def counting(name: str, made: list[str]):
    """A maker that writes ``name``.json (what it was made from) and counts its calls in ``made``."""

    def make(ctx, upstream, fingerprint):
        made.append(name)
        value = {"format_version": "1", "upstream": sorted(upstream), "train": ctx.prompts.get("harmful", "train")}
        write_json(ctx.run.path / f"{name}.json", value)
        return value

    return make


@pytest.fixture
def declared(monkeypatch):
    """Two test-only artifacts, declared and nothing else: "base" (made from the train prompts and data.seed) and
    "derived" (made from base and the model)."""
    made: list[str] = []
    base = Artifact(
        "base",
        ("base.json",),
        "test",
        "1",
        ("data.seed",),
        lambda known, given: {"train": known.prompts.hash("harmful", "train")},
        make=counting("base", made),
        command="refusal test --out {run}",
    )
    derived = Artifact(
        "derived",
        ("derived.json",),
        "test",
        "1",
        ("selection.kl_threshold",),
        lambda known, given: {"model": known.model_id},
        lambda known, given, fresh: ("base",),
        make=counting("derived", made),
        command="refusal test --out {run}",
    )
    monkeypatch.setitem(ARTIFACTS, "base", base)
    monkeypatch.setitem(ARTIFACTS, "derived", derived)
    return made


def context(tmp_path, train: str = "a", model: str = "m1", settings: Settings | None = None) -> Context:
    settings = settings or Settings()
    path = tmp_path / "run"
    run = RunDir(path) if (path / "run.json").is_file() else RunDir.create(path, settings)
    return Context(run, settings, None, prompts(train), model)  # type: ignore[arg-type]  # the test makers load no model


def test_get_makes_once_then_reads_back(declared, tmp_path):
    ctx = context(tmp_path)
    first = ctx.get("derived")
    assert declared == ["base", "derived"] and first["upstream"] == ["base"]
    assert context(tmp_path).get("derived") == first and declared == ["base", "derived"]  # read back, nothing made
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["artifacts"]["derived"]["upstream"] == ["base"] and "test" in info["timings"]


def test_a_stale_upstream_remakes_what_depends_on_it_and_only_that(declared, tmp_path):
    context(tmp_path).get("derived")
    context(tmp_path, train="b").get("derived")  # base's input changed: base, then derived
    assert declared == ["base", "derived"] * 2
    settings = Settings()
    settings.selection.kl_threshold = 5
    context(tmp_path, train="b", settings=settings).get("derived")  # derived's setting alone
    assert declared == ["base", "derived"] * 2 + ["derived"]
    context(tmp_path, train="b", settings=settings).get("base", remake=True)  # made again from the same inputs:
    context(tmp_path, train="b", settings=settings).get("derived")  # the same fingerprint, derived still fresh
    assert declared[-1] == "base"


def test_require_refuses_missing_stale_and_foreign_data_in_one_line(declared, tmp_path):
    ctx = context(tmp_path)
    with pytest.raises(RefusalError) as missing:
        ctx.require("derived")
    context(tmp_path).get("derived")
    settings = Settings()
    settings.data.seed = 7
    with pytest.raises(RefusalError) as stale:
        context(tmp_path, settings=settings).require("derived")  # through its upstream: base is stale
    with pytest.raises(RefusalError) as foreign:
        context(tmp_path, model="m2").require("derived")
    messages = [str(e.value) for e in (missing, stale, foreign)]
    assert all("\n" not in m and "refusal test --out" in m for m in messages), messages
    assert "base.json does not exist" in messages[0]
    assert "base.json is stale: its setting data.seed changed" in messages[1]
    assert "derived.json is stale: it was made from another model" in messages[2]
    assert context(tmp_path).require("derived")["train"] == ["harmful a"]


def test_a_new_declaration_is_removed_by_overwrite_and_kept_files_survive_a_remake(declared, tmp_path, monkeypatch):
    context(tmp_path).get("base")
    RunDir.create(tmp_path / "run", Settings(), overwrite=True)
    assert not (tmp_path / "run" / "base.json").exists()
    monkeypatch.setitem(ARTIFACTS, "base", replace(ARTIFACTS["base"], files=("base.json", "base.partial"), scratch=("base.partial",)))
    context(tmp_path).get("base")
    (tmp_path / "run" / "base.partial").write_text("resume from here")
    context(tmp_path, train="b").get("base")
    assert (tmp_path / "run" / "base.partial").exists() and declared == ["base"] * 3


# ---- fingerprints: the declarations compute what the stages assembled by hand before them ---------------------------
def by_hand(settings: dict, version: str, paths: tuple[str, ...], inputs: dict, upstream: dict) -> str:
    part = {p: settings[p.partition(".")[0]][p.partition(".")[2]] if "." in p else settings[p] for p in paths}
    return digest({"format_version": version, "settings": part, "inputs": inputs, "upstream": upstream})


def test_fingerprints_are_those_assembled_by_hand_before_the_declarations(tmp_path):
    model, out = save_tiny(tmp_path / "qwen2"), tmp_path / "run"
    assert main(["run", "--model", str(model), "--out", str(out), *FAST]) == 0
    info = json.loads((out / "run.json").read_text())
    recorded = {k: v["fingerprint"] for k, v in info["artifacts"].items()}
    s, run = info["settings"], RunDir(out)
    p = run_prompts(run, run.settings)
    model_id, h = info["model"]["sha256"], p.hash
    val = {"harmful_val": h("harmful", "val"), "harmless_val": h("harmless", "val")}
    test = [h("harmful", "test"), h("harmless", "test")]
    expected = {
        "prompts": by_hand(s, "1", ("data",), {"harmful": "builtin:" + builtin_hash(), "harmless": "builtin:" + builtin_hash()}, {}),
        "candidates": by_hand(
            s,
            "1",
            ("model.dtype", "model.chat_template"),
            {"model": model_id, "harmful_train": h("harmful", "train"), "harmless_train": h("harmless", "train")},
            {},
        ),
    }
    expected["selection"] = by_hand(s, "1", ("selection", "evaluation.refusal_tokens"), val, {"candidates": expected["candidates"]})
    expected["model"] = by_hand(s, "1", (), {"edit": {"kind": "orthogonalization"}}, {"selection": expected["selection"]})
    report_version = ARTIFACTS["report"].format_version
    ups = {"selection": expected["selection"], "model": expected["model"]}
    expected["report"] = by_hand(s, report_version, ("evaluation",), {"test": test, "search": None}, ups)
    assert recorded == expected
    known = Reading(run.settings, p, model_id)
    given = {"model": {"edit": {"kind": "orthogonalization"}, "source": "selection"}, "report": {"search": None, "upstream": ("selection", "model")}}
    assert {name: store.fingerprint(run, known, name, given.get(name, {})) for name in recorded} == expected

    assert main(["search", "--model", str(model), "--out", str(out), *FAST, *SEARCH, "--protect-prompts", "4"]) == 0
    info = json.loads((out / "run.json").read_text())
    s, recorded = info["settings"], {k: v["fingerprint"] for k, v in info["artifacts"].items()}
    protected = p.get("harmless", "train")[:4] + [item.prompt for item in load_capability("train")]
    paths = ("model.dtype", "model.chat_template", "search.source_positions")
    protection = by_hand(s, "1", paths, {"model": model_id, "protected": dataset_hash(protected)}, {})
    study = {**val, "harmless_train": h("harmless", "train"), "self_questions": dataset_hash(load_self_questions())}
    ups = {"candidates": expected["candidates"], "selection": expected["selection"], "protection": protection}
    assert recorded["protection"] == protection
    assert recorded["search"] == by_hand(s, "1", ARTIFACTS["search"].settings, study, ups)
    assert info["artifacts"]["search"]["upstream"] == ["candidates", "selection", "protection"]
