"""Seconds per candidate of the paper's selection (``selection.score_candidates``) on the default model.

    python benchmarks/selection.py [--model demo] [--candidates FILE] [--layers 10,14,18] [--positions -1]
                                   [--n-val 32] [--batch-size 32] [--reference 2]

Scores every requested candidate (default: all that are not pruned) on the built-in validation
prompts and prints the seconds per candidate. ``--reference N`` also times the straightforward
computation (three full passes per candidate: bypass, kl, induce) on the first N candidates in the
same process, so both numbers come from the same machine state, and prints the largest score
difference. Without ``--candidates`` they are extracted from 128 train prompts per class first.
Not a test: it only measures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from _stages import Stages
from refusal.cli.main import join_negative_lists
from refusal.common.parsing import int_list
from refusal.common.progress import set_quiet
from refusal.data.prompt_sets import load_builtin
from refusal.direction.selection import score_candidates
from refusal.model.packaged import load_model
from refusal.residual.activations import mean_activations
from refusal.residual.directions import Candidates, compute_candidates
from refusal.residual.interventions import ablate, add
from refusal.residual.scoring import kl_divergence, last_logits, prepare_batches, refusal_score
from refusal.settings import SelectionSettings


def reference(chat, cands: Candidates, harmful: list[str], harmless: list[str], ids: list[int], record: dict, batch_size: int) -> dict:
    """The straightforward scores of one candidate: three full passes over the validation prompts."""
    harmful_b, harmless_b = prepare_batches(chat, harmful, batch_size), prepare_batches(chat, harmless, batch_size)
    baseline = last_logits(chat, harmless_b)  # computed once per selection before; not timed below
    direction = cands.direction(record["layer"], record["position"])
    start = time.perf_counter()
    with ablate(chat, direction):
        bypass = refusal_score(last_logits(chat, harmful_b), ids)
        kl = kl_divergence(baseline, last_logits(chat, harmless_b))
    with add(chat, direction, record["layer"]):
        induce = refusal_score(last_logits(chat, harmless_b), ids)
    scores = {"bypass": bypass.mean().item(), "induce": induce.mean().item(), "kl": kl.mean().item()}
    return {**scores, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--candidates", type=Path, default=None)
    parser.add_argument("--layers", type=int_list, default=None)
    parser.add_argument("--positions", type=int_list, default=None)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reference", type=int, default=0, help="also time the three full passes on this many candidates")
    args = parser.parse_args(join_negative_lists(sys.argv[1:]))
    set_quiet(True)
    stages = Stages()
    chat = stages.run("load model", lambda: load_model(args.model))
    if args.candidates:
        cands = Candidates.load(args.candidates)
    else:
        train = {kind: load_builtin(kind, "train")[:128] for kind in ("harmful", "harmless")}
        means = stages.run("extract", lambda: [mean_activations(chat, train[kind]) for kind in ("harmful", "harmless")])
        cands = compute_candidates(means[0], means[1], {"created": "benchmark"})
    harmful, harmless = load_builtin("harmful", "val")[: args.n_val], load_builtin("harmless", "val")[: args.n_val]
    ids = chat.refusal_token_ids()
    config = SelectionSettings(layers=args.layers, positions=args.positions)
    records = stages.run("selection", lambda: score_candidates(chat, cands, harmful, harmless, ids, config, batch_size=args.batch_size))
    scored = [r for r in records if r["bypass"] is not None]
    print(f"\n{len(scored)} candidates, {stages.seconds('selection') / max(1, len(scored)):.1f} s per candidate (setup included)")
    print(f"torch threads: {torch.get_num_threads()}")
    if args.reference:
        old = [reference(chat, cands, harmful, harmless, ids, r, args.batch_size) for r in scored[: args.reference]]
        diff = max(abs(o[k] - r[k]) for o, r in zip(old, scored) for k in ("bypass", "induce", "kl"))
        print(f"three full passes: {sum(o['seconds'] for o in old) / len(old):.1f} s per candidate; largest score difference {diff:.2e}")


if __name__ == "__main__":
    main()
