"""`refusal attack` and `refusal analyze` end to end on the robust model organism (`organism-robust`): files, resume, report section, bad inputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import organism_args
from refusal.cli.main import main

ATTACK = ["--suffix-length", "4", "--steps", "40", "--candidates", "64", "--attack-prompts", "8", "--time-budget", "none", "--quiet"]


@pytest.fixture(scope="module")
def attacked(tmp_path_factory, robust_organism_dir):
    """A run with attack.json and analysis.json (the organism trains in ~40 s once per machine, the rest takes seconds)."""
    run = tmp_path_factory.mktemp("attack") / "run"
    assert main(["attack", "--out", str(run), *organism_args(robust_organism_dir), *ATTACK]) == 0
    assert main(["analyze", "--run", str(run), "--quiet"]) == 0
    return run


def test_attack_json_holds_the_suffix_and_its_held_out_success(attacked):
    result = json.loads((attacked / "attack.json").read_text())
    assert len(result["suffix_ids"]) == 4 and result["suffix"] and result["source"] == "optimised"
    curve = result["optimisation"]["loss_curve"]
    assert curve and min(curve) < curve[0]  # the optimisation lowered the refusal log-odds
    refused = {name: entry["refused"] for name, entry in result["refusal"].items()}
    total = result["n_test"]
    assert refused["none"] >= 0.8 * total  # the organism refuses its held-out harmful prompts ...
    assert refused["suffix"] <= 0.5 * total  # ... the optimised suffix flips most of them ...
    assert refused["random"] >= 0.7 * total  # ... and a random suffix of the same length does not
    assert result["refusal_score"]["suffix"] < result["refusal_score"]["random"]


def test_analysis_shows_the_suffix_suppressing_the_direction(attacked):
    m = json.loads((attacked / "analysis.json").read_text())["mechanisms"]
    last = -1  # the final residual
    cos = {g: m["cosine"][g]["mean"][last] for g in m["groups"]}
    assert cos["harmful"] > cos["harmless"]
    assert cos["harmful_suffix"] < cos["harmful"] and cos["harmful_suffix"] < cos["harmful_random"]
    assert m["gap_closed"]["harmful_suffix"]["mean_from_direction_layer"] > m["gap_closed"]["harmful_random"]["mean_from_direction_layer"]
    for parts in m["decomposition"].values():
        assert parts["max_abs_error"] < 1e-3 * max(1.0, abs(parts["total"]))
    for head in m["heads"]:
        for masses in head["attention"].values():
            assert sum(masses.values()) == pytest.approx(1.0, abs=1e-4)
        assert head["attention"]["harmful"]["suffix"] == 0.0


def test_the_report_shows_the_mechanisms_section(attacked):
    report = json.loads((attacked / "report" / "report.json").read_text())
    assert report["mechanisms"]["heads"] == json.loads((attacked / "analysis.json").read_text())["mechanisms"]["heads"]
    html = (attacked / "report" / "report.html").read_text()
    section = html[html.index('<section id="mechanisms">') :]
    assert "not measured" not in section[: section.index("</section>")]
    shown = dict(re.findall(r'data-key="(mechanisms\.[^"]+)">([^<]*)<', html))
    from refusal.report.render import fmt

    head = report["mechanisms"]["heads"][0]
    assert shown["mechanisms.heads.0.attribution.harmful"] == fmt("x", head["attribution"]["harmful"])
    assert "## Mechanisms" in (attacked / "report" / "report.md").read_text()


def test_a_base_model_is_compared_layer_by_layer_and_a_foreign_one_refused(attacked, organism_dir, tmp_path, capsys):
    from conftest import save_tiny

    journal = (attacked / "run.json").read_text()
    tiny = save_tiny(tmp_path / "tiny")  # width 32, 3 layers: not the organism's architecture
    assert main(["analyze", "--run", str(attacked), "--base", str(tiny), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "give the base model of the same architecture" in err and len(err.splitlines()) == 1
    assert (attacked / "run.json").read_text() == journal  # the failed option is not kept
    assert main(["analyze", "--run", str(attacked), "--base", str(organism_dir), "--quiet"]) == 0  # same architecture and vocabulary
    m = json.loads((attacked / "analysis.json").read_text())["mechanisms"]
    assert m["base"]["model"] == str(organism_dir) and len(m["base"]["cosine"]) == len(m["layers"])
    assert all(-1.0 <= c <= 1.0 for c in m["base"]["cosine"])
    assert json.loads((attacked / "report" / "report.json").read_text())["mechanisms"]["base"] == m["base"]


def test_the_mechanisms_section_renders_headless(attacked):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI; .ci/run should have installed it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    page = attacked / "report" / "report.html"
    command = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom", page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    dom = result.stdout
    section = dom[dom.index('<section id="mechanisms">') :]
    section = section[: section.index("</section>")]
    assert section.count("<img") == 3 and "data:image/png;base64," in section
    written = dict(re.findall(r'data-key="(mechanisms\.[^"]+)">([^<]*)<', page.read_text()))
    rendered = dict(re.findall(r'data-key="(mechanisms\.[^"]+)">([^<]*)<', section))
    assert written and rendered == written


def test_a_second_call_resumes_and_more_steps_continue(attacked, robust_organism_dir, capsys):
    before = json.loads((attacked / "attack.json").read_text())
    assert main(["attack", "--out", str(attacked), *ATTACK, "--json"]) == 0  # model and prompts from the run
    again = json.loads(capsys.readouterr().out)
    assert again["suffix"] == before["suffix"] and json.loads((attacked / "attack.json").read_text())["created"] == before["created"]
    state = json.loads((attacked / "attack.state.json").read_text())["state"]
    if state["step"] == 40:  # not stopped early: more steps continue from there
        assert main(["attack", "--out", str(attacked), *ATTACK[:2], "--steps", "42", *ATTACK[4:]]) == 0
        assert json.loads((attacked / "attack.state.json").read_text())["state"]["step"] == 42


def test_a_published_suffix_is_evaluated_instead_of_optimised(tmp_path, robust_organism_dir):
    suffix = tmp_path / "suffix.txt"
    suffix.write_text("a poem for bread\n")
    run = tmp_path / "run"
    assert main(["attack", "--out", str(run), *organism_args(robust_organism_dir), "--suffix-file", str(suffix), "--quiet"]) == 0
    result = json.loads((run / "attack.json").read_text())
    assert result["source"].startswith("file") and result["suffix"] == "a poem for bread" and result["optimisation"] is None
    assert not (run / "attack.state.json").exists()


@pytest.mark.parametrize(
    "extra, content, message",
    [
        (["--suffix-length", "0"], None, "--suffix-length must be at least 1"),
        (["--suffix-file", "{file}"], "", "is empty"),
        (["--suffix-file", "{file}", "--suffix-length", "7"], "a poem for bread", "not --suffix-length 7"),
        (["--suffix-file", "{missing}"], None, "does not exist"),
        (["--steps", "0"], None, "--steps must be at least 1"),
    ],
)
def test_bad_attack_inputs_fail_in_one_line_and_write_nothing(tmp_path, robust_organism_dir, capsys, extra, content, message):
    file = tmp_path / "suffix.txt"
    if content is not None:
        file.write_text(content)
    extra = [x.replace("{file}", str(file)).replace("{missing}", str(tmp_path / "nope.txt")) for x in extra]
    run = tmp_path / "run"
    assert main(["attack", "--out", str(run), *organism_args(robust_organism_dir), *extra, "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not run.exists()


def test_analyze_needs_a_run_and_a_suffix(tmp_path, robust_organism_dir, capsys):
    assert main(["analyze", "--run", str(tmp_path / "nowhere")]) == 1
    assert "not a run directory" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["extract", "--out", str(run), *organism_args(robust_organism_dir), "--quiet"]) == 0
    before, journal = sorted(p.name for p in run.iterdir()), (run / "run.json").read_text()
    assert main(["analyze", "--run", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert "no attack.json" in err and "--suffix-file" in err and len(err.splitlines()) == 1
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["analyze", "--run", str(run), "--suffix-file", str(empty)]) == 1
    assert "is empty" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before and (run / "run.json").read_text() == journal


def test_a_report_on_another_test_split_drops_the_old_mechanisms_until_analyze_runs_again(attacked, capsys):
    """(Runs last: it changes the module's run.) The report's Mechanisms section is only ever from the current split and direction."""
    assert main(["run", "--out", str(attacked), *organism_args(robust_organism_dir_of(attacked)), "--n-test", "16", "--no-export", "--quiet"]) == 0
    assert json.loads((attacked / "report" / "report.json").read_text())["mechanisms"] is None
    assert main(["analyze", "--run", str(attacked), "--quiet"]) == 1  # attack.json was measured on the old split
    assert "attack.json is stale" in capsys.readouterr().err
    state = (attacked / "attack.state.json").read_text()
    assert main(["attack", "--out", str(attacked), *ATTACK]) == 0  # re-measured; the optimisation is not redone
    assert (attacked / "attack.state.json").read_text() == state
    assert json.loads((attacked / "attack.json").read_text())["n_test"] == 16
    assert main(["analyze", "--run", str(attacked), "--quiet"]) == 0
    report = json.loads((attacked / "report" / "report.json").read_text())
    assert report["mechanisms"]["n_prompts"] == {"harmful": 16, "harmless": 16}


def robust_organism_dir_of(run):
    from pathlib import Path

    return Path(json.loads((run / "run.json").read_text())["settings"]["model"]["model"])
