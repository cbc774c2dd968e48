"""Benchmark: a universal adversarial suffix on the default model and what it does to the refusal direction (paper §5).

    python benchmarks/attack.py [--out /tmp/bench/attack-demo] [--budget 20m] [--layers 8-18] [--positions -1]
                                [--attack-prompts 4] [--candidates 64] [--suffix-length 20] [--attack-floor -3]

Stages (each reused while fresh, so an interrupted benchmark resumes):
  1. `refusal run` (no export): the direction, chosen over --layers x --positions, and the report
  2. `refusal attack`: GCG on --attack-prompts harmful train prompts within --budget; the suffix against a
     random suffix of the same length on the harmful test split (generation + substring judge, Wilson intervals)
  3. `refusal analyze`: per-layer cosine (Fig. 5), top heads and their attention (Fig. 6), decomposition check
Prints every figure docs/attack.md quotes, the loss curve, wall time per stage and peak RSS.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _stages import Stages
from refusal.commands.analyze import analyze
from refusal.commands.attack import attack
from refusal.commands.run import run
from refusal.common.parsing import duration, int_list
from refusal.settings import Settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench/attack-demo"))
    p.add_argument("--model", default="demo")
    p.add_argument("--budget", type=duration, default=1200.0, help="attack time budget (default 20m)")
    p.add_argument("--layers", type=int_list, default=list(range(8, 19)))
    p.add_argument("--positions", type=int_list, default=[-1])
    p.add_argument("--attack-prompts", type=int, default=4)
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--suffix-length", type=int, default=20)
    p.add_argument("--attack-floor", type=float, default=-3.0)
    args = p.parse_args()

    settings = Settings()
    settings.model.model = args.model
    settings.selection.layers, settings.selection.positions = args.layers, args.positions
    stages = Stages()
    ran = stages.run("refusal run", lambda: run(settings, args.out, export_model_dir=False))
    settings.attack.time_budget = args.budget
    settings.attack.attack_prompts, settings.attack.candidates = args.attack_prompts, args.candidates
    settings.attack.suffix_length, settings.attack.attack_floor = args.suffix_length, args.attack_floor
    result = stages.run("refusal attack", lambda: attack(settings, args.out, inherit=("model", "data", "evaluation"))).attack
    analysis = stages.run("refusal analyze", lambda: analyze(args.out, {})).mechanisms

    print(f"\nmodel {args.model}; direction layer {ran.chosen['layer']} position {ran.chosen['position']}  (fallback: {ran.chosen['fallback']})")
    opt = result["optimisation"] or {}
    print(f"suffix ({len(result['suffix_ids'])} tokens, {opt.get('steps')} steps in {opt.get('seconds')} s): {result['suffix']!r}")
    curve = opt.get("loss_curve") or []
    every = max(1, len(curve) // 20)
    print("loss curve (mean refusal log-odds over the train prompts, floored; every", every, "steps):", [round(x, 2) for x in curve[::every]])
    print(f"\nharmful test prompts refused ({result['n_test']}; substring judge, 95% Wilson interval; mean first-token refusal log-odds)")
    for name, label in result["conditions"].items():
        e = result["refusal"][name]
        score = result["refusal_score"][name]
        print(f"  {label:34s} {e['refused']:3d}/{e['total']}  {e['rate']:6.1%}  [{e['low']:.1%}, {e['high']:.1%}]  {score:+.2f}")

    print("\ncosine with the direction at the last position (mean over prompts), per layer:")
    print("  layer " + " ".join(f"{x:6d}" for x in analysis["layers"]))
    for group, label in analysis["groups"].items():
        print(f"  {group:15s}" + " ".join(f"{x:6.3f}" for x in analysis["cosine"][group]["mean"]) + f"   {label}")
    for group, gap in analysis["gap_closed"].items():
        print(f"  gap closed by {group}: {gap['mean_from_direction_layer']:.1%} (mean over layers from the direction's)")
    print("\ntop heads by direct attribution (harmful / + suffix / + random) and attention of the last position on instruction, suffix, template:")
    for h in analysis["heads"]:
        a = h["attribution"]
        shares = "  ".join(f"{g}: " + "/".join(f"{v:.2f}" for v in h["attention"][g].values()) for g in h["attention"])
        print(f"  L{h['layer']:>2}H{h['head']:<2}  {a['harmful']:+.3f} {a['harmful_suffix']:+.3f} {a['harmful_random']:+.3f}   {shares}")
    print("\ndecomposition (means over prompts) and its largest error:")
    for group, d in analysis["decomposition"].items():
        print(f"  {group:15s} " + "  ".join(f"{k} {v:+.3f}" if k != "max_abs_error" else f"{k} {v:.2e}" for k, v in d.items()))
    print("\nstages:")
    for name, seconds, rss in stages.rows:
        print(f"  {name:18s} {seconds:8.1f} s   peak RSS {rss:.2f} GB")
    print("run timings:", json.dumps(json.loads((args.out / "run.json").read_text())["timings"]))


if __name__ == "__main__":
    main()
