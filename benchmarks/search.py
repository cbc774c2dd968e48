"""The search against the paper's selection, side by side on the same prompts (default model).

    python benchmarks/search.py [--model demo] [--layers 8-18] [--positions -1] [--time-budget 10m]

Stages: extract; the paper's selection (this project's implementation, restricted to --layers and
--positions); the search (trial 0 is the paper's edit); then, on the built-in *test* split, for the
unedited model, the paper's point and the search's choice: harmful and harmless refusals (substring
judge, counts and 95% Wilson intervals), first-token and multi-token KL on harmless prompts. Prints
wall time and peak RSS per stage. Not a test: it only measures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from _stages import Stages, peak_rss_gb
from refusal.cli import join_negative_lists
from refusal.edits import Editor, EditParams, KernelEdit
from refusal.evaluation import Condition, EvalSettings, evaluate
from refusal.parsing import duration, int_list
from refusal.pipeline import candidates, selection
from refusal.progress import set_quiet
from refusal.search_run import study
from refusal.settings import Settings
from refusal.stats import format_rate
from refusal.workspace import start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--layers", type=int_list, default=int_list("8-18"))
    parser.add_argument("--positions", type=int_list, default=[-1])
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--time-budget", type=duration, default=duration("10m"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(join_negative_lists(sys.argv[1:]))
    set_quiet(True)
    out = args.out or Path(tempfile.mkdtemp(prefix="refusal-search-")) / "run"
    settings = Settings()
    settings.model.model, settings.model.device = args.model, "cpu"
    settings.data.n_train, settings.data.n_val, settings.data.n_test = 128, args.n_val, args.n_test
    settings.selection.layers, settings.selection.positions = args.layers, args.positions
    settings.search.trials, settings.search.time_budget = args.trials, args.time_budget
    stages = Stages()
    stage = stages.run

    ctx = stage("load model", lambda: start(settings, out, overwrite=True))
    chat = ctx.chat
    cands = stage("extract", lambda: candidates(ctx))
    stage("paper selection", lambda: selection(ctx, cands))
    result = stage("search (trials+confirm)", lambda: study(ctx, cands))

    trials = {t["trial"]: t for t in result["trials"]}
    paper, chosen = trials[result["paper_trial"]["trial"]], trials[result["chosen"]["trial"]]
    editor = Editor(chat)

    def edited(record):
        edit = KernelEdit.from_candidates(cands, EditParams.from_dict(record["params"]))
        return lambda: editor.applied(edit)

    conditions = [
        Condition("original", "original", chat),
        Condition("paper", "paper's edit", chat, edited(paper)),
        Condition("search", "search's choice", chat, edited(chosen)),
    ]
    e = settings.evaluation
    test = stage(
        "test-split evaluation",
        lambda: evaluate(
            conditions,
            {"harmful": ctx.prompts.get("harmful", "test"), "harmless": ctx.prompts.get("harmless", "test")},
            EvalSettings(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, kl_tokens=16, ce_max_tokens=0),
        ),
    )
    editor.close()

    print()
    print(
        f"model {args.model}; paper selection over layers {args.layers[0]}-{args.layers[-1]}, positions {args.positions}; "
        f"{len(trials)} search trials on {args.n_val}+{args.n_val} validation prompts; test split {args.n_test}+{args.n_test}"
    )
    confirmed = {p["trial"]: p["confirmed"] for p in result["confirmed"]}
    print("\nfront (validation): trial, refusal score, first-token KL, multi-token KL, confirmed harmful/harmless refused")
    for n in result["front"]:
        t, c = trials[n], confirmed.get(n)
        note = " <- chosen" if n == chosen["trial"] else ""
        counts = f"{c['harmful_refused']}/{c['harmful_total']}, {c['harmless_refused']}/{c['harmless_total']}" if c else "-"
        print(f"  {n:4d} {t['refusal']:8.3f} {t['kl']:8.4f} {t['kl_multi']:8.4f}  {counts}{note}")
    print(f"  paper's edit (trial {paper['trial']}): refusal {paper['refusal']:.3f}, KL {paper['kl']:.4f}, multi-token {paper['kl_multi']:.4f}")
    print(f"  chosen params: {chosen['params']}")
    print("\ntest split                      harmful refused                 harmless refused               KL first   KL multi")
    for name in ("original", "paper", "search"):
        h, l = test["rates"][name]["harmful"], test["rates"][name]["harmless"]
        kl = test["kl"].get(name)
        kls = f"{kl['first_token']['mean']:9.4f}  {kl['multi_token']['mean']:9.4f}" if kl else "        -          -"
        print(f"  {name:10s} {format_rate(h['refused'], h['total']):>32s} {format_rate(l['refused'], l['total']):>32s} {kls}")
    search_seconds = stages.seconds("extract", "search (trials+confirm)")
    print(f"\nextract + search: {search_seconds:.0f} s; total {stages.seconds():.0f} s; peak RSS {peak_rss_gb():.2f} GB; run {out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
