"""Benchmark: the defence on one model: the audit and the monitor, and a hardened model against the original under
our own attacks.

    python benchmarks/defence.py [--model organism-robust] [--out /tmp/bench/defence-organism-robust]
                                 [--attack-budget 2m] [--search-budget 9m] [--skip-search] [--harden-steps 40]
                                 [--harden-budget 30m] [--harden-lr X] [--harden-prompts N] [--eval-every K]
                                 [--layers 8-18] [--positions -1] [--n-test N] [--no-second-attack]

Stages (each reused while fresh, so an interrupted benchmark resumes):
  1-3. `refusal audit` on MODEL -> OUT/original              run (the direction; refusal unedited and ablated, by
                                                             generation), search (--search-budget), attack
                                                             (--attack-budget), monitor (AUROC / TPR at 1% and 5% FPR)
  4. `refusal harden --out OUT/hardened`                   the LoRA, kept within its KL budget; first-token comparison
  5. `refusal run` on OUT/hardened -> OUT/hardened-run      the hardened model's own direction, ablated (generation)
  6. `refusal attack` on OUT/hardened-run                   a suffix optimised against the hardened model, same budget
Prints the monitor's table and the original-vs-hardened table every figure of docs/defence.md comes from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _stages import Stages
from refusal.commands.attack import attack
from refusal.commands.audit import audit
from refusal.commands.harden import harden
from refusal.commands.run import run
from refusal.common.parsing import duration, int_list
from refusal.run.directory import RunDir
from refusal.settings import Settings


def settings_for(args: argparse.Namespace, model: str) -> Settings:
    s = Settings()
    s.model.model = model
    if args.layers is not None:
        s.selection.layers = args.layers
    if args.positions is not None:
        s.selection.positions = args.positions
    if args.n_test is not None:
        s.data.n_test = args.n_test
    s.attack.time_budget = args.attack_budget
    s.search.time_budget = args.search_budget
    return s


def prompt_files(model: str) -> tuple[str, str] | None:
    """An organism's own prompt files (a hardened organism's checkpoint has none; give them explicitly)."""
    from refusal.model.organism import build_organism
    from refusal.model.packaged import ORGANISMS

    if model not in ORGANISMS:
        return None
    path = build_organism(ORGANISMS[model][0])
    return str(path / "harmful.jsonl"), str(path / "harmless.jsonl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism-robust")
    p.add_argument("--out", type=Path, default=None, help="default: /tmp/bench/defence-<model>")
    p.add_argument("--attack-budget", type=duration, default=120.0)
    p.add_argument("--search-budget", type=duration, default=540.0)
    p.add_argument("--skip-search", action="store_true", help="leave the search out of the audit (its part is then null)")
    p.add_argument("--harden-steps", type=int, default=40)
    p.add_argument("--harden-budget", type=duration, default=1800.0)
    p.add_argument("--harden-lr", type=float, default=None)
    p.add_argument("--harden-prompts", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--layers", type=int_list, default=None)
    p.add_argument("--positions", type=int_list, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--no-second-attack", action="store_true", help="skip stage 6 (the attack on the hardened model)")
    args = p.parse_args()
    out = args.out or Path(f"/tmp/bench/defence-{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    original, hardened_dir, hardened_run = out / "original", out / "hardened", out / "hardened-run"

    settings = settings_for(args, args.model)
    files = prompt_files(args.model)
    if files is not None:
        settings.data.harmful, settings.data.harmless = files
    stages = Stages()
    audited = stages.run("refusal audit", lambda: audit(settings, original, skip=("search",) if args.skip_search else ())).audit
    run_dir = RunDir.open(original)
    report, attacked, monitored = (run_dir.read(name) for name in ("report", "attack", "monitor"))
    options = {"harden_steps": args.harden_steps, "harden_time_budget": args.harden_budget}
    options |= {k: v for k, v in {"harden_lr": args.harden_lr, "harden_prompts": args.harden_prompts, "eval_every": args.eval_every}.items() if v}
    hardened = stages.run("refusal harden", lambda: harden(original, hardened_dir, options, overwrite=True)).hardening

    again = settings_for(args, str(hardened_dir))
    if files is not None:
        again.data.harmful, again.data.harmless = files
    ran_h = stages.run("refusal run (hardened)", lambda: run(again, hardened_run, export_model_dir=False))
    attacked_h = None
    if not args.no_second_attack:
        attacked_h = stages.run("refusal attack (hardened)", lambda: attack(again, hardened_run, inherit=("model", "data", "evaluation"))).attack

    chosen = run_dir.read("selection")["chosen"]
    print(f"\nmodel {args.model}; direction layer {chosen['layer']} position {chosen['position']}")
    b = audited["brittleness"]
    print(f"\naudit: brittleness {b['score']} ({b['level']}); detectable {b.get('detectable')}")
    for name, part in b["parts"].items():
        print(f"  {name:9s} {part}")
    if audited.get("edit"):
        print(f"  the search's edit: {audited['edit']}")
    print(f"\nmonitor (test split vs harmless; * = default score {monitored['score']}):")
    for name, label in monitored["conditions"].items():
        for score, e in (monitored["test"].get(name) or {}).items():
            mark = "*" if score == monitored["score"] else " "
            print(f"  {label:40s} {score + mark:18s} AUROC {e['auroc']:.3f}  TPR@1% {e['tpr@1%']:.2f}  TPR@5% {e['tpr@5%']:.2f}")

    t = hardened["training"]
    print(f"\nhardening: {t['steps']} steps ({t['stopped_by']}, {t['seconds']} s), kept step {t['kept']['step']}; settings {hardened['settings']}")
    print("validation checkpoints:", [(h["step"], round(h["refused_ablated"], 2), round(h["kl"], 4)) for h in t["history"]])
    rate = lambda report, cond, kind="harmful": report["rates"][cond][kind]  # noqa: E731
    fmt = lambda e: f"{e['refused']:3d}/{e['total']} {e['rate']:6.1%}"  # noqa: E731
    c = hardened["comparison"]
    rows = [
        ("harmful refused (generation)", rate(report, "original"), rate(ran_h.report, "original")),
        ("harmful refused, own direction ablated (generation)", rate(report, "ablated"), rate(ran_h.report, "ablated")),
    ]
    if attacked_h is not None:
        rows.append(("harmful refused under the best suffix (generation)", attacked["refusal"]["suffix"], attacked_h["refusal"]["suffix"]))
    rows.append(("harmless refused (generation)", rate(report, "original", "harmless"), rate(ran_h.report, "original", "harmless")))
    print(f"\n  {'':52s} {'original':>14s}   {'hardened':>14s}")
    for label, a, b in rows:
        print(f"  {label:52s} {fmt(a):>14s}   {fmt(b):>14s}")
    cap = [c[m]["capability"] for m in ("original", "hardened")]
    first_token = [
        ("harmless first-token KL vs original (test)", "kl", "{:14.4f}"),
        ("refused, own direction ablated (first token)", "refused_ablated", "{:14.1%}"),
    ]
    for label, key, form in first_token:
        print(f"  {label:52s} " + "   ".join(form.format(c[m][key]) for m in ("original", "hardened")))
    print(f"  {'capability proxy loss (test)':52s} " + "   ".join(f"{'—':>14s}" if x is None else f"{x:14.4f}" for x in cap))
    print(f"  cosine of the two directions: {c['direction_cosine']:.3f}")
    print("\nstages:")
    for name, seconds, rss in stages.rows:
        print(f"  {name:26s} {seconds:8.1f} s   peak RSS {rss:.2f} GB")
    print("timings:", json.dumps(json.loads((original / "run.json").read_text())["timings"]))


if __name__ == "__main__":
    main()
