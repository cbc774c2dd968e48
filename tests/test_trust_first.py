"""Issue 27, "the first minutes": one trial numbering, a confirmation that says what it did, a report of what was measured,
and the fresh held-out prompt set that only the final benchmark reads."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from refusal.cli.main import main
from refusal.search.choice import bisect_front, choose
from refusal.settings import SearchSettings

# the organism's search, cheap (as in tests/test_search.py), with a front longer than --confirm 2 can bisect by generation alone
ORGANISM_SEARCH = ["--n-val", "32", "--n-test", "16", "--max-new-tokens", "16", "--trials", "24", "--time-budget", "none", "--confirm", "2"]
LOGGED = re.compile(r"^trial +(\d+): refusal +(-?[\d.]+) +KL ([\d.]+)", re.M)


@pytest.fixture(scope="module")
def organism_search(organism_dir, tmp_path_factory):
    """`refusal search --model organism` (not quiet): the run directory and what it printed on stderr."""
    out = tmp_path_factory.mktemp("first") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["search", "--model", "organism", "--out", str(out), "--no-export", *ORGANISM_SEARCH]) == 0
    return out, err.getvalue()


# ---- one trial numbering ---------------------------------------------------------------------------
def test_the_live_log_numbers_trials_as_search_json_the_front_and_export_do(organism_search, tmp_path):
    out, printed = organism_search
    result = json.loads((out / "search.json").read_text())
    logged = {int(n): (float(refusal), float(kl)) for n, refusal, kl in LOGGED.findall(printed)}
    trials = {t["trial"]: t for t in result["trials"]}
    assert logged and set(logged) == set(trials)
    for number, (refusal, kl) in logged.items():  # the log's trial K is search.json's trial K
        assert refusal == pytest.approx(trials[number]["refusal"], abs=1e-3) and kl == pytest.approx(trials[number]["kl"], abs=1e-4)
    front_rows = re.findall(r"^[* ][P ] *(\d+) +(-?[\d.]+) ", printed, re.M)  # the printed front
    assert [int(n) for n, _ in front_rows] == result["front"]
    k = result["front"][-1]
    assert main(["export", "--run", str(out), "--trial", str(k), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    exported = json.loads((tmp_path / "m" / "refusal.json").read_text())["search_trial"]
    assert exported["trial"] == k and exported["refusal"] == pytest.approx(logged[k][0], abs=1e-3)


# ---- the confirmation says what it did; the screen's buffer follows the model ---------------------------------------
def test_on_the_organism_a_point_is_confirmed_by_generation_and_the_choice_says_how(organism_search):
    out, printed = organism_search
    result = json.loads((out / "search.json").read_text())
    chosen, confirmed = result["chosen"], result["confirmed"]
    generated = [p for p in confirmed if p["confirmed"]["harmful_refused"] is not None]
    assert generated, f"no front point was generated on: {[p['confirmed'] for p in confirmed]}"
    did = chosen["confirmation"]
    assert did["generated"] == [p["trial"] for p in generated] and set(did["met_target"]) <= set(did["generated"])
    assert did["screened"] == [p["trial"] for p in confirmed]  # every point is screened first (--confirm-train)
    assert all(p["confirmed"]["train_buffer"] > 0 for p in confirmed)  # auto: from the margins, never 0 on the organism
    if chosen["confirmed"]:
        assert chosen["trial"] in did["met_target"] and chosen["rule"].startswith("confirmed:")
    else:
        assert chosen["rule"].startswith("fallback, not confirmed")
    assert f"met the target: {', '.join(map(str, did['met_target'])) or 'none'}" in chosen["rule"]
    line = printed.split("chosen: trial")[1].splitlines()[0]
    assert ("fallback" not in line) if chosen["confirmed"] else ("fallback" in line)  # the console says which it was


def point(trial: int, kl: float) -> dict:
    return {"trial": trial, "kl": kl, "refusal": -trial}


def test_screen_failures_do_not_use_up_the_confirmations_and_the_fallback_says_why():
    """A front of 17: the train screen fails every point below index 16. Failed screens cost no generation, so the
    bisection reaches the one point that passes; with none passing, the choice is named a fallback and says why."""
    front = [point(i, 0.01 * (i + 1)) for i in range(17)]

    def confirm(p, passes=lambda i: i >= 16):
        refused = 0 if passes(p["trial"]) else None  # a failed screen: not generated on
        counts = {"harmful_refused": refused, "harmful_total": 32, "harmless_refused": refused, "harmless_total": 32}
        return {**p, "confirmed": {**counts, "train_refused": 0 if refused == 0 else 3, "train_total": 252}}

    config = SearchSettings(confirm=2, max_kl=1.0)
    confirmed = bisect_front(front, config, confirm, 0)
    assert [p["trial"] for p in confirmed] == [8, 12, 14, 15, 16]
    chosen, rule = choose(confirmed, config, 0)
    assert chosen["trial"] == 16 and rule.startswith("confirmed: the lowest KL") and "generated on: 16; met the target: 16" in rule
    never = bisect_front(front, config, lambda p: confirm(p, lambda i: False), 0)
    chosen, rule = choose(never, config, 0)
    assert rule.startswith("fallback, not confirmed") and "generated on: none" in rule and "not generated on" in rule


def test_the_auto_buffer_is_the_tail_scale_of_the_margins(tmp_path, capsys):
    """The mean of i·(x₍ᵢ₎ − x₍ᵢ₊₁₎) over the top four spacings: a model whose margins are ten times wider gets a buffer ten times wider."""
    from refusal.search.choice import tail_scale

    margins = [-0.02, -0.41, -0.46, -0.60, -0.70, -3.0]
    expected = (1 * 0.39 + 2 * 0.05 + 3 * 0.14 + 4 * 0.10) / 4
    assert tail_scale(margins) == pytest.approx(expected)
    assert tail_scale([10 * m for m in margins]) == pytest.approx(10 * expected)
    assert tail_scale([1.0]) == 0.0 and tail_scale([2.0, 1.0]) == pytest.approx(1.0)
    assert SearchSettings().screen_margin == "auto"
    for bad, message in (("-0.1", "--screen-margin must be a margin of at least 0 or 'auto'"), ("wide", "neither 'auto' nor a number")):
        assert main(["search", "--screen-margin", bad, "--out", str(tmp_path / "run"), "--quiet"]) == 1
        assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


# ---- a report shows what was measured ---------------------------------------------------------------
OPTIONAL = ("selection", "projections", "cosine", "search", "mechanisms")


def evaluate_edited(organism_dir, model: Path, out: Path) -> tuple[dict, str]:
    from conftest import organism_args

    argv = ["evaluate", *organism_args(organism_dir), "--edited", str(model), "--out", str(out), "--n-test", "16", "--max-new-tokens", "12"]
    assert main([*argv, "--quiet"]) == 0
    return json.loads((out / "report.json").read_text()), (out / "report.html").read_text()


def test_an_edited_report_shows_its_fresh_runs_direction_and_leaves_out_what_it_did_not_measure(organism_dir, tmp_path):
    from conftest import organism_args
    from refusal.commands.run import export_run

    run = tmp_path / "run"
    assert main(["extract", *organism_args(organism_dir), "--out", str(run), "--n-val", "16", "--quiet"]) == 0
    assert main(["select", "--run", str(run), "--quiet"]) == 0
    export_run(run, tmp_path / "model")
    report, page = evaluate_edited(organism_dir, tmp_path / "model", tmp_path / "report")
    for name in ("selection", "projections", "cosine"):  # the export's run is fresh: its direction's sections, as RUN/report has them
        assert report[name] and f'<section id="{name}">' in page, name
    assert report["selection"]["chosen"] == json.loads((run / "selection.json").read_text())["chosen"]
    assert page.count("data:image/png;base64,") >= 4  # rates, selection heatmaps, projections, cosine
    for name in ("search", "mechanisms"):  # not measured here: not on the page at all
        assert f'<section id="{name}">' not in page, name
    assert "not measured" not in page.split('<section id="rates">')[1].split("Unsafe")[0]
    # the run chooses another direction afterwards: the export is no longer its direction, so none of its sections show
    chosen = json.loads((run / "selection.json").read_text())["chosen"]["layer"]
    assert main(["select", "--run", str(run), "--layers", str(1 if chosen != 1 else 2), "--quiet"]) == 0
    report, page = evaluate_edited(organism_dir, tmp_path / "model", tmp_path / "report2")
    assert report["direction"] is None and report["projections"] is None
    for name in OPTIONAL:
        assert f'<section id="{name}">' not in page, name


def test_a_search_exports_report_has_no_sections_it_did_not_measure(organism_search, organism_dir, tmp_path):
    out, _ = organism_search
    trial = json.loads((out / "search.json").read_text())["chosen"]["trial"]
    assert main(["export", "--run", str(out), "--trial", str(trial), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    report, page = evaluate_edited(organism_dir, tmp_path / "m", tmp_path / "report")
    for name in OPTIONAL:
        assert f'<section id="{name}">' not in page, name
    assert "rates.edited.harmful.refused" in page and page.count("not measured") <= 4  # only values inside shown sections


# ---- the fresh held-out set: pinned, new, and read only by the final benchmark run ------------------------------------
# These tests hash, count and compare the held-out prompts; they never print one.
ROOT = Path(__file__).resolve().parents[1]


def normalised(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def holdout_records(kind: str) -> list[dict]:
    from refusal.data.holdout import holdout_bytes

    return [json.loads(line) for line in holdout_bytes(kind).decode("utf-8").splitlines() if line.strip()]


def shared_instructions() -> set[str]:
    """The refusal_direction data beside the checkout (../shared/data/refusal_direction), where there is a copy."""
    found = next((p for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared") if (p / "data" / "refusal_direction").is_dir()), None)
    if found is None:
        return set()
    out = set()
    for path in (found / "data" / "refusal_direction").rglob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data if isinstance(data, list) else []
        out |= {normalised(r["instruction"]) for r in records if isinstance(r, dict) and isinstance(r.get("instruction"), str)}
    return out


def test_the_held_out_set_is_pinned_counted_and_new():
    import hashlib

    from refusal.data.holdout import HOLDOUT_SHA256
    from refusal.data.prompt_sets import builtin_prompts

    known = {normalised(p.instruction) for kind in ("harmful", "harmless") for p in builtin_prompts(kind)} | shared_instructions()
    seen: set[str] = set()
    for kind in ("harmful", "harmless"):
        path = ROOT / "src" / "refusal" / "prompts" / f"holdout_{kind}.jsonl"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == HOLDOUT_SHA256[kind]
        records = holdout_records(kind)
        assert len(records) >= 64 and all(r["split"] == "holdout" and r["category"] for r in records)
        texts = {normalised(r["instruction"]) for r in records}
        assert len(texts) == len(records)  # no duplicate within the set
        assert len(texts & known) == 0, f"{len(texts & known)} {kind} held-out prompts repeat a built-in or refusal_direction prompt"
        assert len(texts & seen) == 0
        seen |= texts


def test_no_default_path_reads_the_held_out_set(tmp_path):
    from refusal.data.prompt_sets import load_prompts, load_splits
    from refusal.errors import RefusalError

    for spec in ("builtin:holdout_harmful", "builtin:holdout_harmless:test"):
        with pytest.raises(RefusalError, match="unknown built-in prompt set"):
            load_prompts(spec)
    held = {normalised(r["instruction"]) for kind in ("harmful", "harmless") for r in holdout_records(kind)}
    for kind in ("harmful", "harmless"):
        builtin = {normalised(t) for split in load_splits("builtin", kind).values() for t in split}
        assert len(builtin & held) == 0
    readers = [p.relative_to(ROOT).as_posix() for p in (ROOT / "src").rglob("*.py") if "load_holdout" in p.read_text(encoding="utf-8")]
    readers += [p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").glob("*.py") if "load_holdout" in p.read_text(encoding="utf-8")]
    assert sorted(readers) == ["benchmarks/search.py", "src/refusal/data/holdout.py"]  # only the final benchmark run reads it
    text = (ROOT / "benchmarks" / "search.py").read_text(encoding="utf-8")
    assert "if args.holdout" in text and 'add_argument("--holdout", action="store_true"' in text  # and only when asked


def test_reading_the_held_out_set_is_logged_first(tmp_path):
    from refusal.data.holdout import load_holdout
    from refusal.errors import RefusalError

    log = tmp_path / "bench" / "holdout-reads.md"
    with pytest.raises(RefusalError, match="needs a reader and a commit"):
        load_holdout(log, "", "abc123")
    assert not log.exists()
    sets = load_holdout(log, "benchmarks/search.py --holdout", "abc123")
    assert [len(sets["harmful"]), len(sets["harmless"])] == [len(holdout_records("harmful")), len(holdout_records("harmless"))]
    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# Reads of the fresh held-out set" and "commit abc123, read by benchmarks/search.py --holdout" in lines[-1]
    load_holdout(log, "benchmarks/search.py --holdout", "def456")
    assert log.read_text(encoding="utf-8").count("read by") == 2  # appended, never rewritten
