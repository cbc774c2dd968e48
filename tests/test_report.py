"""The evaluation report: files written atomically, a self-contained HTML page whose numbers match report.json."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from refusal.errors import RefusalError
from refusal.measure.stats import wilson_interval
from refusal.report.render import REQUIRED, fmt, render_html, render_markdown, write_report

SECTIONS = ("rates", "costs", "selection", "projections", "cosine", "samples", "search", "mechanisms", "metadata")
UNMEASURED = ("search", "mechanisms")  # make_report measured neither: their sections are left out (issue 27)


def rate(refused: int, total: int) -> dict:
    low, high = wilson_interval(refused, total)
    return {"refused": refused, "total": total, "rate": refused / total, "low": round(low, 3), "high": round(high, 3)}


def make_report() -> dict:
    """A realistic report: 6 layers x 2 positions of candidates (one pruned), rates, safety, costs, samples."""
    candidates = [
        {
            "layer": layer,
            "position": pos,
            "bypass": 1.5 - 0.7 * layer + 0.1 * pos,
            "induce": 0.3 * layer - 1.0,
            "kl": 0.05 * (layer + 1),
            "filtered": [f"kl {0.05 * (layer + 1):.2f} > 0.1"] if layer < 2 else [],
        }
        for layer in range(6)
        for pos in (-2, -1)
    ]
    candidates[0].update(bypass=None, induce=None, kl=None, filtered=["pruned: in the last 20% of layers (not scored)"])
    layers = list(range(6))
    return {
        "format_version": "2",
        "created": "2026-11-25T19:00:00Z",
        "refusal_version": "0.1.0",
        "conditions": [
            {"name": "original", "label": "original"},
            {"name": "ablated", "label": "ablated (hooks)"},
            {"name": "added", "label": "activation addition"},
            {"name": "edited", "label": "edited checkpoint"},
        ],
        "model": {"source": "demo", "class": "Qwen2ForCausalLM", "n_layers": 6, "d_model": 896, "dtype": "float32"},
        "direction": {"layer": 4, "position": -1, "fallback": True},
        "settings": {"max_new_tokens": 32, "judge": "substring", "n_harmful": 32, "n_harmless": 32, "layers": [0, 5]},
        "rates": {
            "original": {"harmful": {"refused": 12, "total": 32, "rate": 0.375, "low": 0.229, "high": 0.548}, "harmless": rate(0, 32)},
            "ablated": {"harmful": rate(1, 32)},
            "added": {"harmless": rate(30, 32)},
            "edited": {"harmful": rate(2, 32), "harmless": rate(0, 32)},
        },
        "safety": {"judge": "llama-guard-3-1b", "original": {"harmful": rate(3, 32)}, "edited": {"harmful": rate(25, 32)}},
        "kl": {
            "ablated": {"first_token": {"mean": 0.78123456, "n": 32}, "multi_token": {"mean": 0.5, "n": 32, "tokens": 16}},
            "edited": {"first_token": {"mean": 0.78123457, "n": 32}, "multi_token": {"mean": 0.5, "n": 32, "tokens": 16}},
        },
        "ce_loss": {"loss": {"original": 2.3145678, "ablated": 2.35, "edited": 2.35}, "tokens": 5000, "corpus": "builtin"},
        "capability": {
            "loss": {"original": 0.61234, "edited": 0.7},
            "by_kind": {"original": {"code": 0.5, "math": 0.7}, "edited": {"code": 0.6, "math": 0.8}},
            "tokens": 1800,
            "items": 24,
            "set": "builtin",
        },
        "refusal_score": {"original": {"harmful": 1.5}, "ablated": {"harmful": -3.25}},
        "selection": {"chosen": {"layer": 4, "position": -1, "bypass": -1.4, "induce": 0.2, "kl": 0.25, "fallback": True}, "candidates": candidates},
        "projections": {
            "layers": layers,
            "harmful_mean": [0.1 * x * x for x in layers],
            "harmful_std": [0.2] * 6,
            "harmless_mean": [0.01 * x for x in layers],
            "harmless_std": [0.1] * 6,
        },
        "cosine": {"layers": layers, "matrix": [[1.0 if i == j else 0.9 ** abs(i - j) for j in layers] for i in layers]},
        "samples": [
            {
                "kind": "harmful",
                "instruction": "Write <script>alert(1)</script> & steal cookies",
                "original": "I cannot help.",
                "edited": "Sure: <script>alert('x')</script> | step 1 " + "a" * 300,
                "edit": "ablated",
            },
            {
                "kind": "harmless",
                "instruction": "Bake bread & butter",
                "original": "Mix flour & water.",
                "edited": "Mix flour & water.",
                "edit": "ablated",
            },
        ],
        "timings": {"extract": 4.25, "select": 61.0, "generate": 12.3},
    }


class Keyed(HTMLParser):
    """Collects (data-key, text) for every element with a data-key, plus every src/href and tag name."""

    def __init__(self) -> None:
        super().__init__()
        self.keyed: list[tuple[str, str]] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.open: list[list] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.links += [attrs[a] for a in ("src", "href") if attrs.get(a)]
        self.open.append([tag, attrs.get("data-key"), ""])

    def handle_data(self, data):
        for entry in self.open:
            entry[2] += data

    def handle_endtag(self, tag):
        while self.open:
            name, key, text = self.open.pop()
            if key is not None:
                self.keyed.append((key, text))
            if name == tag:
                break


def parse(page: str) -> Keyed:
    parser = Keyed()
    parser.feed(page)
    parser.close()
    return parser


def lookup(data: dict, path: str):
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def section(page: str, id_: str) -> str:
    match = re.search(rf'<section id="{id_}">(.*?)</section>', page, re.S)
    assert match, f"section {id_} missing"
    return match.group(1)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "nested" / "out"
    paths = write_report(make_report(), out)
    return out, paths


def test_write_report_writes_three_files_atomically_and_json_round_trips(written):
    out, paths = written
    assert set(paths) == {"json", "md", "html"}
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]  # no temporary files left
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == make_report()
    assert paths["json"].read_text(encoding="utf-8").startswith('{\n  "format_version": "2",')


def test_html_is_self_contained_with_every_section_and_plots(written):
    page = written[1]["html"].read_text(encoding="utf-8")
    parsed = parse(page)
    for id_ in SECTIONS:
        assert (f'id="{id_}"' in page) == (id_ not in UNMEASURED), id_
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 4  # rates, safety, selection heatmaps, projections, cosine
    assert all(base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n") for b64 in images)
    assert all(link.startswith("data:image/png;base64,") for link in parsed.links)  # nothing fetched from anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not parsed.tags & {"script", "link", "iframe", "object"}
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; steal" in page
    assert "<script" not in page
    assert len(page) < 400_000  # small plots keep the page small


def test_every_data_key_number_equals_the_json_value_formatted(written):
    _, paths = written
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    keyed = dict(parse(paths["html"].read_text(encoding="utf-8")).keyed)
    for key, text in keyed.items():
        assert text == fmt(key, lookup(data, key)), key
    for key in (
        "rates.original.harmful.refused",
        "rates.original.harmful.total",
        "rates.added.harmless.refused",
        "kl.ablated.first_token.mean",
        "kl.ablated.first_token.n",
        "kl.edited.multi_token.mean",
        "ce_loss.loss.original",
        "ce_loss.loss.edited",
        "capability.loss.original",
        "capability.loss.edited",
        "capability.items",
        "refusal_score.ablated.harmful",
        "safety.edited.harmful.refused",
        "selection.chosen.layer",
        "selection.candidates.0.bypass",
        "timings.select",
    ):
        assert key in keyed, key
    # the formatter itself: counts exact, rates as percentages with one decimal, floats with 4 significant digits
    assert [keyed[f"rates.original.harmful.{k}"] for k in ("refused", "total", "rate", "low", "high")] == ["12", "32", "37.5%", "22.9%", "54.8%"]
    assert (keyed["kl.ablated.first_token.mean"], keyed["ce_loss.loss.original"], keyed["selection.candidates.0.bypass"]) == ("0.7812", "2.315", "—")


def test_markdown_summary_has_rates_with_intervals_costs_and_escaped_truncated_samples(written):
    md = written[1]["md"].read_text(encoding="utf-8")
    assert "# Refusal report: demo" in md
    assert "layer 4, position -1 (fallback" in md
    assert "| original | 12/32 (37.5%, 95% CI 22.9%–54.8%) | 0/32 (0.0%, 95% CI 0.0%–10.7%) |" in md
    assert "| added | not measured | 30/32" in md.replace("activation addition", "added")
    assert "Unsafe rates (judge: llama-guard-3-1b)" in md
    assert "| KL on harmless, first token | ablated (hooks) | 0.7812 | n = 32 |" in md
    assert "| cross-entropy, nats/token | edited checkpoint | 2.35 | tokens = 5000, corpus = builtin |" in md
    assert "| capability proxy (code/math loss), nats/token | edited checkpoint | 0.7 | items = 24, tokens = 1800 |" in md
    assert "| select | 61 |" in md
    assert "&lt;script&gt;" in md and "<script" not in md and "\\|" in md
    assert "a" * 300 not in md and "…" in md


def test_missing_values_say_not_measured_and_unmeasured_sections_are_left_out(tmp_path):
    report = make_report()
    report.update(selection=None, projections=None, cosine=None, safety=None, ce_loss=None, capability=None, direction=None, samples=[])
    report["kl"]["ablated"]["multi_token"] = None
    del report["timings"], report["settings"]
    paths = write_report(report, tmp_path)
    page = paths["html"].read_text(encoding="utf-8")
    for id_ in ("selection", "projections", "cosine", "search", "mechanisms"):
        assert f'<section id="{id_}">' not in page, id_
    assert "not measured" in section(page, "samples")
    assert "not measured" in section(page, "rates").split("Unsafe")[1]
    assert section(page, "costs").count("not measured") == 2  # multi-token KL and CE loss
    assert page.count("data:image/png;base64,") == 1  # only the refusal-rate chart is left
    assert "direction: not measured" in paths["md"].read_text(encoding="utf-8")


def test_rate_interval_is_computed_when_the_json_lacks_it():
    report = make_report()
    report.update(selection=None, projections=None, cosine=None, safety=None)  # fewer plots: faster
    report["rates"]["original"]["harmful"] = {"refused": 12, "total": 20}
    md = render_markdown(report)
    assert "12/20 (60.0%, 95% CI 38.7%–78.1%)" in md
    keys = dict(parse(render_html(report)).keyed)
    assert keys["rates.original.harmful.refused"] == "12" and "rates.original.harmful.low" not in keys


@pytest.mark.parametrize("key", list(REQUIRED))
def test_missing_required_key_names_it_and_writes_nothing(tmp_path, key):
    report = make_report()
    del report[key]
    with pytest.raises(RefusalError, match=f"missing the required key '{key}'; add it"):
        write_report(report, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda r: r["rates"].update(orignal={"harmful": {"refused": 1, "total": 2}}),
            "rates.orignal is not a listed condition; add it to 'conditions'",
        ),
        (lambda r: r["rates"]["original"]["harmful"].update(refused=40), "0 <= refused <= total"),
        (lambda r: r["kl"].update(trial_3=r["kl"]["ablated"]), "kl.trial_3 is not a listed condition"),
        (lambda r: r["capability"]["loss"].update(trial_3=1.0), "capability.loss.trial_3 is not a listed condition"),
        (lambda r: r["conditions"].append({"name": "a.b", "label": "dotted"}), "a name of letters, digits"),
        (lambda r: r["conditions"].append({"name": "ablated", "label": "again"}), "conditions repeat a name"),
        (lambda r: r.update(format_version="3"), "format_version '3' is not supported"),
        (lambda r: r["cosine"]["matrix"].pop(), "6 x 6"),
        (lambda r: r["kl"]["ablated"]["first_token"].update(mean=float("nan")), "use null for values that were not measured"),
        (lambda r: r.update(mechanisms=[1]), "'mechanisms' must be an object or null"),
        (lambda r: r.update(mechanisms={"layers": [0, 1]}), "mechanisms.groups is missing"),
    ],
)
def test_malformed_report_is_a_clear_error_and_writes_nothing(tmp_path, change, message):
    report = make_report()
    change(report)
    with pytest.raises(RefusalError, match=re.escape(message)):
        write_report(report, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_report_of_format_version_1_is_refused_in_one_line_naming_the_fix(tmp_path):
    report = make_report()
    report.update(format_version="1", rates={"harmful_original": {"refused": 1, "total": 2}})
    del report["conditions"]
    with pytest.raises(RefusalError) as error:
        write_report(report, tmp_path / "out")
    assert "format_version '1' is not supported" in str(error.value) and "regenerate the report" in str(error.value)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_any_listed_condition_renders_with_its_label_and_no_code_change(tmp_path):
    """Conditions are data: new names (a weight-edit variant, a search trial, a suffix attack) need no report change."""
    report = make_report()
    report.update(selection=None, projections=None, cosine=None, safety=None)  # fewer plots: faster
    report["conditions"] = [
        {"name": "original", "label": "original"},
        {"name": "norm_preserving", "label": "norm-preserving edit"},
        {"name": "trial_30", "label": "search trial 30"},
        {"name": "suffix", "label": "adversarial <suffix>"},
    ]
    report["rates"] = {
        "original": {"harmful": rate(12, 32), "harmless": rate(0, 32)},
        "norm_preserving": {"harmful": rate(3, 32), "harmless": rate(1, 32)},
        "trial_30": {"harmful": rate(2, 32)},
        "suffix": {"harmful": rate(20, 32), "jailbreak": rate(5, 10)},
    }
    report["kl"] = {"norm_preserving": report["kl"]["ablated"], "trial_30": report["kl"]["edited"]}
    report["ce_loss"]["loss"] = {"original": 2.3, "trial_30": 2.4}
    report["capability"].update(loss={"original": 0.6, "trial_30": 0.9}, by_kind={})
    report["refusal_score"] = {"suffix": {"harmful": -1.0}}
    report["samples"] = [dict(s, edit="trial_30") for s in report["samples"]]
    paths = write_report(report, tmp_path)
    md, page = paths["md"].read_text(encoding="utf-8"), paths["html"].read_text(encoding="utf-8")
    assert "| condition | harmful | harmless | jailbreak |" in md
    assert "| search trial 30 | 2/32 (6.2%, 95% CI 1.7%–20.1%) | not measured | not measured |" in md
    assert "| KL on harmless, first token | norm-preserving edit | 0.7812 | n = 32 |" in md
    assert "| cross-entropy, nats/token | search trial 30 | 2.4 |" in md
    assert "adversarial &lt;suffix&gt;" in md and "adversarial &lt;suffix&gt;" in page and "<suffix>" not in page
    keyed = dict(parse(page).keyed)
    for key in (
        "rates.norm_preserving.harmless.refused",
        "rates.trial_30.harmful.rate",
        "rates.suffix.jailbreak.total",
        "kl.trial_30.first_token.mean",
    ):
        assert keyed[key] == fmt(key, lookup(report, key)), key
    assert keyed["refusal_score.suffix.harmful"] == "-1" and "search trial 30" in section(page, "samples")


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(RefusalError, match=re.escape("pip install 'refusal[report]'")):
        write_report(make_report(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_rendering_is_deterministic_and_does_not_touch_the_input(written):
    report = make_report()
    before = copy.deepcopy(report)
    assert render_html(report) == written[1]["html"].read_text(encoding="utf-8")
    assert render_markdown(report) == written[1]["md"].read_text(encoding="utf-8")
    assert report == before


def test_chromium_renders_the_page(written):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        if os.environ.get("CI") == "true":  # .ci/run installs it: a skip there would hide a broken page
            pytest.fail("chromium is missing in CI; .ci/run should have installed it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    path = written[1]["html"]
    result = subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for id_ in SECTIONS:
        assert (f'id="{id_}"' in result.stdout) == (id_ not in UNMEASURED), id_
