"""`refusal harden`'s command line: the run, the target directory, the harden group's options; the call and its table."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_arguments, given
from .printing import console


def add_harden_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("harden", help="train a LoRA so that refusal survives the direction's ablation, merge it -> DIR, RUN/harden.json")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="directory for the hardened checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_arguments(p, ("harden",))


def cmd_harden(args: argparse.Namespace) -> dict:
    from ..commands.harden import harden

    result = harden(args.run, args.out, given(args, "harden"), overwrite=args.overwrite)
    if not args.quiet and not args.json:
        print_hardening(result.hardening, result.out)
    return result.summary()


HARDENING_ROWS = {
    "refused": "harmful refused",
    "refused_ablated": "harmful refused, own direction ablated",
    "refused_original_direction_ablated": "harmful refused, original's direction ablated",
    "over_refusal": "harmless refused",
    "kl": "harmless first-token KL vs original",
    "capability": "capability proxy loss",
}


def print_hardening(h: dict, out: object) -> None:
    t, c = h["training"], h["comparison"]
    kept = t["kept"]
    console.print(
        f"\n[bold]hardening[/] {t['steps']} steps ({t['stopped_by']}, {t['seconds']:.0f} s); kept step {kept['step']}: validation refused "
        f"with the direction ablated {kept['refused_ablated']:.0%}, harmless KL {kept['kl']:.4f} (budget {h['settings']['harden_max_kl']:g})",
        highlight=False,
    )
    n = c["n"]
    console.print(f"  test split, first-token scores ({n['harmful']} harmful, {n['harmless']} harmless)   original  hardened", highlight=False)
    for key, label in HARDENING_ROWS.items():
        cells = []
        for name in ("original", "hardened"):
            value = c[name][key]
            cells.append("       —" if value is None else f"{value:8.1%}" if "refused" in key or key == "over_refusal" else f"{value:8.4f}")
        console.print(f"  {label:58s} {cells[0]}  {cells[1]}", highlight=False)
    console.print(f"  cosine of the two models' directions: {c['direction_cosine']:.3f}", highlight=False)
    console.print(f"  the hardened checkpoint: {out} (measure it end to end: refusal run --model {out}; refusal attack)", highlight=False)
