"""`refusal audit`: the brittleness parts from known numbers, and the audit end to end on the robust model organism."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import error_line, organism_args
from refusal.cli.main import main
from refusal.measure.brittleness import PARTLY_BRITTLE_BELOW, ROBUST_BELOW, Counts, brittleness, layer_strength, level

# Tiny budgets: a 6-trial search without second directions or refinements, the attack's cheap settings (test_attack_run).
SEARCH = ["--trials", "6", "--time-budget", "none", "--confirm", "2", "--second", "0", "--refine", "0"]
ATTACK = ["--suffix-length", "4", "--steps", "40", "--candidates", "64", "--attack-prompts", "8", "--attack-time-budget", "none"]
STAGE_FILES = ("candidates.safetensors", "selection.json", "search.json", "attack.json", "monitor.json", "audit.json", "model/model.safetensors")


# ---- the parts and the summary from numbers -------------------------------------------------------------
def test_a_part_is_the_net_share_of_the_unedited_refusals_removed():
    assert Counts(32, 4, 32).removed() == pytest.approx(0.875)
    assert Counts(20, 0, 32).removed() == 1.0 and Counts(20, 20, 32).removed() == 0.0
    assert Counts(10, 14, 32).removed() == 0.0  # an attack that adds refusals removes none
    assert Counts(0, 3, 32).removed() is None  # nothing to remove
    with pytest.raises(ValueError):
        Counts(33, 0, 32).removed()


def test_the_summary_is_the_mean_of_the_parts_present_with_its_level():
    b = brittleness({"ablation": Counts(32, 4, 32), "edit": Counts(32, 0, 32), "suffix": Counts(30, 15, 30)})
    assert b["score"] == pytest.approx((0.875 + 1.0 + 0.5) / 3) and b["level"] == "brittle" and b["note"] is None
    assert b["parts"]["suffix"] == {"removed": 0.5, "refused_before": 30, "refused_after": 15, "total": 30}
    partial = brittleness({"ablation": Counts(10, 8, 10), "edit": None, "suffix": None})
    assert partial["parts"]["edit"] is None and partial["parts"]["suffix"] is None
    assert partial["score"] == pytest.approx(0.2) and partial["level"] == "robust"
    assert brittleness({})["score"] is None and brittleness({})["note"] == "no part was measured"
    with pytest.raises(ValueError, match="unknown brittleness parts"):
        brittleness({"jailbreak": Counts(1, 0, 1)})


def test_the_levels_follow_the_thresholds():
    assert level(None) is None and level(0.0) == "robust" and level(ROBUST_BELOW - 1e-9) == "robust"
    assert level(ROBUST_BELOW) == "partly brittle" and level(PARTLY_BRITTLE_BELOW - 1e-9) == "partly brittle"
    assert level(PARTLY_BRITTLE_BELOW) == "brittle" and level(1.0) == "brittle"


def test_a_model_that_refuses_nothing_has_no_parts_and_says_so():
    b = brittleness({"ablation": Counts(0, 0, 32), "edit": Counts(0, 0, 32), "suffix": Counts(0, 0, 32)})
    assert all(p["removed"] is None for p in b["parts"].values()) and b["score"] is None and b["level"] is None
    assert "refuses none of the harmful test prompts" in b["note"]


def test_layer_strength_reads_the_chosen_position_in_layer_order():
    candidates = [
        {"layer": 1, "position": -1, "norm": 2.0, "bypass": -1.0, "induce": 2.0, "kl": 0.1, "filtered": []},
        {"layer": 0, "position": -1, "norm": 1.0, "bypass": None, "induce": None, "kl": None, "filtered": ["zero direction"]},
        {"layer": 0, "position": -2, "norm": 5.0, "bypass": 0.0, "induce": 0.0, "kl": 0.0, "filtered": []},
    ]
    rows = layer_strength(candidates, -1)
    assert [r["layer"] for r in rows] == [0, 1] and rows[0]["filtered"] == ["zero direction"] and rows[1]["bypass"] == -1.0


# ---- the command on the organism ---------------------------------------------------------------------
def audit_argv(run: Path, organism: Path, *extra: str) -> list[str]:
    return ["audit", "--out", str(run), *organism_args(organism), "--n-train", "64", *SEARCH, *ATTACK, "--quiet", *extra]


@pytest.fixture(scope="module")
def audited(tmp_path_factory, robust_organism_dir):
    """A run audited once (every stage), with the seconds the audit took."""
    run = tmp_path_factory.mktemp("audit") / "run"
    begin = time.perf_counter()
    assert main(audit_argv(run, robust_organism_dir)) == 0
    print(f"\naudit on organism-robust: {time.perf_counter() - begin:.1f} s")
    return run


def test_audit_json_has_every_part_and_its_metadata(audited):
    a = json.loads((audited / "audit.json").read_text())
    assert a["format_version"] == "1" and a["created"] and a["model"]["sha256"] and a["settings"]["search"]["trials"] == 6
    b = a["brittleness"]
    assert set(b["parts"]) == {"ablation", "edit", "suffix"} and all(p is not None for p in b["parts"].values())
    for p in b["parts"].values():
        assert 0.0 <= p["removed"] <= 1.0 and p["refused_before"] > 0
    assert b["score"] == pytest.approx(sum(p["removed"] for p in b["parts"].values()) / 3) and b["level"] in b["levels"]
    assert 0.0 <= b["detectable"] <= 1.0 and b["detectable"] == a["monitor"]["rows"]["harmful_suffix"]["tpr@1%"]
    assert a["skipped"] == [] and a["missing"] == {}
    report = json.loads((audited / "report" / "report.json").read_text())
    assert a["unedited"]["harmful"] == report["rates"]["original"]["harmful"] and a["ablation"]["harmful"] == report["rates"]["ablated"]["harmful"]
    search = json.loads((audited / "search.json").read_text())
    assert a["edit"]["trial"] == search["chosen"]["trial"] and a["edit"]["harmful"]["total"] == a["unedited"]["harmful"]["total"]
    attack = json.loads((audited / "attack.json").read_text())
    assert a["suffix"]["suffix"] == attack["refusal"]["suffix"] and a["suffix"]["text"] == attack["suffix"]
    assert a["layers"] and any(r["layer"] == a["direction"]["layer"] for r in a["layers"])
    record = json.loads((audited / "run.json").read_text())["artifacts"]["audit"]
    assert set(record["upstream"]) == {"selection", "report", "search", "attack", "monitor"}
    assert (audited / "model" / "refusal.json").is_file() and "search_trial" not in json.loads((audited / "model" / "refusal.json").read_text())


def test_the_report_shows_the_audit_section(audited):
    report = json.loads((audited / "report" / "report.json").read_text())
    assert report["audit"]["brittleness"] == json.loads((audited / "audit.json").read_text())["brittleness"]
    assert report["monitor"] is not None  # the monitor's own section is kept
    html = (audited / "report" / "report.html").read_text()
    section = html[html.index('<section id="audit">') :]
    section = section[: section.index("</section>")]
    shown = dict(re.findall(r'data-key="(audit\.[^"]+)">([^<]*)<', section))
    from refusal.report.render import fmt

    score = report["audit"]["brittleness"]["score"]
    assert shown["audit.brittleness.score"] == fmt("audit.brittleness.score", score)
    assert shown["audit.brittleness.parts.suffix.removed"].endswith("%") and "audit.layers.0.norm" in shown
    md = (audited / "report" / "report.md").read_text()
    assert "## Audit" in md and "### Brittleness" in md and report["audit"]["brittleness"]["level"] in md


def test_a_second_audit_recomputes_nothing(audited, robust_organism_dir, capsys):
    mtimes = {name: (audited / name).stat().st_mtime_ns for name in STAGE_FILES}
    report = (audited / "report" / "report.json").read_text()
    capsys.readouterr()
    begin = time.perf_counter()
    assert main([*audit_argv(audited, robust_organism_dir)[:-1], "--json"]) == 0
    seconds = time.perf_counter() - begin
    summary = json.loads(capsys.readouterr().out)
    print(f"second audit: {seconds:.1f} s", end=" ")
    assert {name: (audited / name).stat().st_mtime_ns for name in STAGE_FILES} == mtimes
    assert (audited / "report" / "report.json").read_text() == report
    a = json.loads((audited / "audit.json").read_text())
    assert summary["brittleness"] == a["brittleness"]["score"] and summary["level"] == a["brittleness"]["level"]
    assert summary["parts"] == {k: p["removed"] for k, p in a["brittleness"]["parts"].items()}


def test_skipped_stages_leave_their_parts_null_with_the_command_to_fill_them(audited, robust_organism_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(audited, run)
    kept = {name: (run / name).stat().st_mtime_ns for name in ("search.json", "attack.json", "monitor.json")}
    assert main(audit_argv(run, robust_organism_dir, "--skip", "search,attack,monitor")) == 0
    a = json.loads((run / "audit.json").read_text())
    b = a["brittleness"]
    assert b["parts"]["edit"] is None and b["parts"]["suffix"] is None and b["detectable"] is None
    assert b["parts"]["ablation"] is not None and b["score"] == b["parts"]["ablation"]["removed"]
    assert a["skipped"] == ["attack", "monitor", "search"] and a["edit"] is None and a["suffix"] is None and a["monitor"] is None
    assert set(a["missing"]) == {"edit", "suffix", "detectable"}
    assert all("refusal audit" in why and "without --skip" in why for why in a["missing"].values())
    assert json.loads((run / "run.json").read_text())["artifacts"]["audit"]["upstream"] == ["selection", "report"]
    assert {name: (run / name).stat().st_mtime_ns for name in kept} == kept  # the skipped stages did not run
    md = (run / "report" / "report.md").read_text()
    assert "without --skip search" in md and "not measured" in md


@pytest.mark.parametrize(
    "case, expected",
    [("skip", "unknown --skip stage 'nothing'"), ("model", "/no/such/model"), ("file", "is a file")],
)
def test_bad_input_is_one_line_and_writes_nothing(case, expected, robust_organism_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = audit_argv(out, robust_organism_dir)
    if case == "skip":
        argv += ["--skip", "search,nothing"]
    elif case == "model":
        argv[argv.index("--model") + 1] = "/no/such/model"
    else:
        out.write_text("a file\n")
    err = error_line(capsys, argv)
    assert expected in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if case != "file" else ["run"])
    if case == "file":
        assert out.read_text() == "a file\n"


def test_skip_takes_a_list_and_repeats():
    from refusal.cli.main import build_parser

    args = build_parser().parse_args(["audit", "--out", "x", "--skip", "search,attack", "--skip", "monitor", "--attack-time-budget", "90s"])
    assert args.skip == ["search", "attack", "monitor"] and getattr(args, "attack.time_budget") == 90.0
    assert build_parser().parse_args(["audit", "--out", "x"]).skip == []
