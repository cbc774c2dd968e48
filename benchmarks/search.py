"""The search side by side with the paper's edit and today's kernel search, on the same prompts (default model).

    python benchmarks/search.py [--model demo] [--layers all] [--n-val 64] [--n-test 64] [--time-budget 9m] [--out RUN [--reuse]]

Stages, in one process on one loaded model:
1. extract (the whole train split, as ``refusal search`` does);
2. the paper's selection (this project's implementation, over --layers / --positions, by default every
   candidate);
3. the kernel search as it was before issue 15 (``--protect-prompts 0``: no cleaned directions;
   ``--refusal-measure log-odds``: the refusal log-odds objective; ``--refine 0``: no refinement
   trials), its choice made both by the new rule and by issue 13's rule (``old_rule_choice``);
4. the search with its defaults (directions cleaned against the protected prompts, the refusal
   margin objective, refinement trials); both score trials on the first --score-prompts validation prompts and
   confirm on all --n-val;
5. on the built-in *test* split, for the original model, the paper's edit and both choices: harmful
   and harmless refusals (substring judge, counts and 95% Wilson intervals), first-token and 16-token
   KL on harmless prompts, cross-entropy on the built-in corpus, and the capability proxy (teacher-
   forced loss of the built-in code/math reference solutions, test split).
Prints wall time and peak RSS per stage. Not a test: it only measures.

``--holdout`` (the final benchmark run only) adds stage 6: the same conditions on the fresh held-out set
(``refusal.data.holdout``: 72 + 72 prompts written after the test split had been read while choosing defaults);
the read is logged first, with the date and the commit, in docs/bench/holdout-reads.md and in the output.
``--no-kernel`` leaves out stage 3 and ``--no-paper`` the paper's edit on the test split (their figures from an
earlier run stand in; docs/bench).
``--reuse`` keeps an existing ``--out`` run directory: its extraction and paper selection are reused
where their fingerprints match these settings (the stage then takes seconds and says so); the
searches always run afresh, since both write the run's one study.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from _stages import Stages, peak_rss_gb
from refusal.cli.main import join_negative_lists
from refusal.cli.printing import confirmed_counts
from refusal.commands.run import candidates, protection, selection
from refusal.commands.search import study
from refusal.common.parsing import duration, int_list
from refusal.common.progress import set_quiet
from refusal.data.holdout import load_holdout
from refusal.data.prompt_sets import load_capability, load_corpus
from refusal.edit.edits import Editor, EditParams, KernelEdit, Orthogonalization
from refusal.engines.hf import HFEngine
from refusal.measure.evaluation import Condition, EvalSettings, evaluate
from refusal.measure.judges import REFUSAL_PHRASES
from refusal.measure.stats import format_rate
from refusal.run.workspace import start
from refusal.search.choice import confirm_point
from refusal.settings import Settings


def print_front(name: str, result: dict) -> None:
    trials = {t["trial"]: t for t in result["trials"]}
    confirmed = {p["trial"]: p["confirmed"] for p in result["confirmed"]}
    t = result["timings"]
    print(f"\n{name}: {len(trials)} trials; cache {t['cache_original']:.0f} s, trials {t['trials']:.0f} s, confirmation {t['confirm']:.0f} s")
    print("  front (validation): trial, role, refusal score, first-token KL, multi-token KL, confirmed harmful/harmless refused (train screen)")
    for n in result["front"]:
        record, c = trials[n], confirmed.get(n)
        note = " <- chosen" if n == result["chosen"]["trial"] else ""
        counts = confirmed_counts(c)
        print(f"  {n:4d} {record['role']:8s} {record['refusal']:8.3f} {record['kl']:8.4f} {record['kl_multi']:8.4f}  {counts}{note}")
    params = trials[result["chosen"]["trial"]]["params"]
    second = params.get("second")
    shown = {**params, "second": {k: v for k, v in second.items() if k != "vector"}} if second else params  # not its d_model numbers
    print(f"  chosen ({result['chosen']['rule']}): trial {result['chosen']['trial']}, {shown}")


def old_rule_choice(ctx, cands, result: dict, editor: Editor) -> dict:
    """Issue 13's confirmation and choice on a finished study: confirm the ``confirm`` front points with KL <= max_kl
    and the lowest refusal scores (then the lowest-KL rest); choose the fewest confirmed harmful refusals with no
    more harmless refusals than the original, ties to the lower KL. Confirmations the study made are reused."""
    s = ctx.settings
    trials = {t["trial"]: t for t in result["trials"]}
    front = [trials[n] for n in result["front"]]
    under = sorted((p for p in front if p["kl"] <= s.search.max_kl), key=lambda p: p["refusal"])
    points = (under[: s.search.confirm] + [p for p in front if p["kl"] > s.search.max_kl])[: s.search.confirm]
    done = {p["trial"]: p for p in result["confirmed"] if p["confirmed"]["harmful_refused"] is not None}  # generated on
    engine = HFEngine(ctx.chat, s.evaluation.batch_size)
    prompts = {kind: ctx.prompts.get(kind, "val") for kind in ("harmful", "harmless")}
    tokens = s.evaluation.max_new_tokens
    confirmed = [done.get(p["trial"]) or confirm_point(editor, engine, cands, p, prompts, tokens, REFUSAL_PHRASES) for p in points]
    ok = [p for p in confirmed if p["confirmed"]["harmless_refused"] <= result["harmless_original_refused"]] or confirmed
    chosen = min(ok, key=lambda p: (p["confirmed"]["harmful_refused"], p["kl"]))
    rule = "issue 13: fewest confirmed refusals among the 4 lowest refusal scores with KL <= max_kl"
    return {**result, "confirmed": confirmed, "chosen": {"trial": chosen["trial"], "rule": rule}}


ROOT = Path(__file__).resolve().parents[1]
HOLDOUT_LOG = ROOT / "docs" / "bench" / "holdout-reads.md"


def commit() -> str:
    """The checkout's commit, marked "+uncommitted changes" where the work tree differs from it."""
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()
    return (git("rev-parse", "HEAD") or "unknown") + (" +uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def evaluate_holdout(conditions: list[Condition], settings: Settings) -> dict:
    """Stage 6 (``--holdout``): the conditions on the fresh held-out set, read once here and logged (refusal.data.holdout)."""
    version = commit()
    prompts = load_holdout(HOLDOUT_LOG, "benchmarks/search.py --holdout", version)
    e = settings.evaluation
    result = evaluate(conditions, prompts, replace(EvalSettings.from_settings(e, []), kl_tokens=16, ce_tokens=0))
    return {**result, "read": f"read at commit {version}, logged in {HOLDOUT_LOG.relative_to(ROOT)}"}


def print_rates(title: str, conditions: list[Condition], result: dict) -> None:
    print(f"\n{title}\n  {'':14s} {'harmful refused':>30s} {'harmless refused':>30s}  KL first  KL multi")
    for c in conditions:
        h, l = result["rates"][c.name]["harmful"], result["rates"][c.name]["harmless"]
        kl = result["kl"].get(c.name)
        kls = f"{kl['first_token']['mean']:8.4f}  {kl['multi_token']['mean']:8.4f}" if kl else "       -         -"
        print(f"  {c.name:14s} {format_rate(h['refused'], h['total']):>30s} {format_rate(l['refused'], l['total']):>30s}  {kls}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--layers", type=int_list, default=None, help="the paper's selection over these layers (default: all)")
    parser.add_argument("--positions", type=int_list, default=None, help="... and these positions (default: all)")
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--score-prompts", type=int, default=32)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--time-budget", type=duration, default=Settings().search.time_budget, help="trial budget per search (default: the search's)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="reuse --out's fresh extraction and paper selection instead of starting afresh")
    parser.add_argument("--no-kernel", action="store_true", help="leave out the kernel search (issue 13's configuration) and its columns")
    parser.add_argument("--second", type=int, default=None, help="second-direction trials of the default search (default: the search's)")
    parser.add_argument("--no-paper", action="store_true", help="leave out the paper's edit on the test split (an earlier run's row stands in)")
    parser.add_argument("--holdout", action="store_true", help="the final benchmark run: evaluate on the fresh held-out set too (the read is logged)")
    args = parser.parse_args(join_negative_lists(sys.argv[1:]))
    set_quiet(True)
    out = args.out or Path(tempfile.mkdtemp(prefix="refusal-search-")) / "run"
    settings = Settings()
    settings.model.model, settings.model.device = args.model, "cpu"
    settings.data.n_val, settings.data.n_test = args.n_val, args.n_test
    settings.selection.layers, settings.selection.positions = args.layers, args.positions
    settings.search.trials, settings.search.time_budget, settings.search.score_prompts = args.trials, args.time_budget, args.score_prompts
    if args.second is not None:
        settings.search.second = args.second
    # issue 13's kernel search: no cleaning, the log-odds objective, no refinement or second direction, its anchors, no screen
    kernel_settings = {
        "protect_prompts": 0,
        "refusal_measure": "log-odds",
        "refine": 0,
        "second": 0,
        "anchors": [0.45, 0.55, 0.65, 0.75],
        "confirm_train": False,
    }
    defaults = {k: getattr(settings.search, k) for k in kernel_settings}  # restored for the default search
    stages = Stages()
    stage = stages.run

    ctx = stage("load model", lambda: start(settings, out, overwrite=not args.reuse))
    chat = ctx.chat
    fresh = {
        "extraction": lambda: ctx.fresh("candidates"),
        "paper selection": lambda: ctx.fresh("selection"),
    }
    reused = [name for name, is_fresh in fresh.items() if args.reuse and is_fresh()]
    cands = stage("extract", lambda: candidates(ctx))
    _, direction = stage("paper selection", lambda: selection(ctx))
    if reused:
        print(f"  (reused from {out}: {', '.join(reused)}; their fingerprints match these settings)")
    for name in ("search.json", "search.journal"):
        (out / name).unlink(missing_ok=True)  # each search starts afresh
    kernel = old = None
    if not args.no_kernel:
        for k, v in kernel_settings.items():
            setattr(settings.search, k, v)
        kernel = stage("kernel search", lambda: study(ctx, cands))
        for k, v in defaults.items():
            setattr(settings.search, k, v)
        for name in ("search.json", "search.journal"):
            (out / name).unlink(missing_ok=True)
    new = stage("search (default)", lambda: study(ctx, cands))
    cleaner = protection(ctx, reuse_only=True)
    editor = Editor(chat)
    if kernel is not None:
        old = stage("kernel search, old rule", lambda: old_rule_choice(ctx, cands, kernel, editor))

    def chosen_edit(result: dict, protected):
        record = next(t for t in result["trials"] if t["trial"] == result["chosen"]["trial"])
        edit = KernelEdit.from_candidates(cands, EditParams.from_dict(record["params"]), protected)
        return lambda: editor.applied(edit)

    paper = Orthogonalization(direction.vector)
    conditions = [Condition("original", "original", chat)]
    if not args.no_paper:
        conditions.append(Condition("paper", "paper's edit", chat, lambda: editor.applied(paper)))
    if kernel is not None and old is not None:
        conditions += [
            Condition("kernel_old", "kernel search, old rule (issue 13)", chat, chosen_edit(old, None)),
            Condition("kernel", "kernel search, new rule", chat, chosen_edit(kernel, None)),
        ]
        if kernel["chosen"]["trial"] == old["chosen"]["trial"]:  # the same edit: evaluated once
            conditions = [c for c in conditions if c.name != "kernel"]
            print("  (kernel search: both rules choose the same trial; evaluated once, as kernel_old)")
    conditions.append(Condition("search", "search (default)", chat, chosen_edit(new, cleaner)))
    e = settings.evaluation
    test = stage(
        "test-split evaluation",
        lambda: evaluate(
            conditions,
            {"harmful": ctx.prompts.get("harmful", "test"), "harmless": ctx.prompts.get("harmless", "test")},
            replace(EvalSettings.from_settings(e, []), kl_tokens=16),
            corpus=load_corpus(),
            capability=load_capability("test"),
        ),
    )
    held_out = stage("held-out evaluation", lambda: evaluate_holdout(conditions, settings)) if args.holdout else None
    editor.close()

    scored = min(args.score_prompts, args.n_val)
    print()
    print(
        f"model {args.model}; paper selection over layers {args.layers or 'all'}, positions {args.positions or 'all'} "
        f"(layer {direction.layer}, position {direction.position}); trials scored on {scored}+{scored} "
        f"validation prompts, confirmed on {args.n_val}+{args.n_val}; test split {args.n_test}+{args.n_test}"
    )
    if kernel is not None and old is not None:
        print_front("kernel search (no cleaning, log-odds objective; the new choice rule)", kernel)
        print_front("kernel search with the old choice rule (issue 13: the 4 lowest refusal scores under KL 0.2, fewest refusals)", old)
    print_front("search with its defaults (cleaned directions, margin objective, refinement, second direction)", new)
    for t in (t for t in new["trials"] if t["role"] == "second"):
        print(f"  second trial {t['trial']}: fraction {t['fraction']}, strength {t['strength']}, refusal {t['refusal']:.3f}, KL {t['kl']:.4f}")
    ce, cap = test["ce_loss"]["loss"], test["capability"]["loss"]
    print(f"\ntest split        {'harmful refused':>30s} {'harmless refused':>30s}  KL first  KL multi  corpus CE  capability (Δ%)")
    for c in conditions:
        h, l = test["rates"][c.name]["harmful"], test["rates"][c.name]["harmless"]
        kl = test["kl"].get(c.name)
        kls = f"{kl['first_token']['mean']:8.4f}  {kl['multi_token']['mean']:8.4f}" if kl else "       -         -"
        delta = 100 * (cap[c.name] / cap["original"] - 1)
        print(
            f"  {c.name:14s} {format_rate(h['refused'], h['total']):>30s} {format_rate(l['refused'], l['total']):>30s}  {kls}"
            f"  {ce[c.name]:9.4f}  {cap[c.name]:.4f} ({delta:+.2f}%)"
        )
    capability = test["capability"]
    print(f"  (capability proxy: {capability['items']} problems, {capability['tokens']} solution tokens; corpus {test['ce_loss']['tokens']} tokens)")
    if held_out is not None:
        print_rates(f"held-out set ({held_out['read']})", conditions, held_out)
    print(f"\ntotal {stages.seconds():.0f} s; peak RSS {peak_rss_gb():.2f} GB; run {out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
