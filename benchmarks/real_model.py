"""The full default pipeline on the real default model, stage by stage.

    python benchmarks/real_model.py [--layers 8-18] [--positions -1,-2] [--n-test 32]

Prints, for each stage, wall time and the process's peak RSS so far; the chosen layer/position;
the report's refusal rates (substring judge, with counts and 95% Wilson intervals): original,
ablated, activation addition and the exported checkpoint, next to an independent full-length
recount; KL on harmless prompts (first token and multi-token) and cross-entropy on the built-in
corpus. Not a test: it only measures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from _stages import Stages, peak_rss_gb
from refusal.cli import _int_list, _join_negative_lists
from refusal.directions import Direction
from refusal.generation import generate
from refusal.interventions import ablate, add
from refusal.judges import refusal_rate
from refusal.models import load_model
from refusal.pipeline import Run, RunConfig, evaluate, export, extract, run_data, select
from refusal.progress import set_quiet
from refusal.selection import SelectionConfig
from refusal.stats import format_rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--layers", type=_int_list, default=_int_list("8-18"))
    parser.add_argument("--positions", type=_int_list, default=[-1, -2])
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(_join_negative_lists(sys.argv[1:]))
    set_quiet(True)
    out = args.out or Path(tempfile.mkdtemp(prefix="refusal-bench-")) / "run"
    config = RunConfig(
        model=args.model,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        selection=SelectionConfig(layers=args.layers, positions=args.positions),
    )
    stages = Stages()
    stage = stages.run

    chat = stage("load model", lambda: load_model(args.model, device="cpu"))
    run = Run.create(out, config, overwrite=True)
    stage("extract", lambda: extract(run, chat))
    selection = stage("select", lambda: select(run, chat))
    stage("export + fidelity", lambda: export(run, chat, out / "model", overwrite=True))
    report = stage("evaluate (report)", lambda: evaluate(run, chat))

    # An independent recount: full-length generation (no early stop) with the plain helper, so the
    # report's numbers can be checked against a second path through the code.
    data = run_data(config)
    direction = Direction.load(out / "direction.safetensors")

    def recount():
        counts = {("original", "harmful"): refusal_rate(generate(chat, data["harmful_test"], config.max_new_tokens, config.batch_size))}
        with ablate(chat, direction.vector):
            counts["ablated", "harmful"] = refusal_rate(generate(chat, data["harmful_test"], config.max_new_tokens, config.batch_size))
        with add(chat, direction.vector, direction.layer):
            counts["added", "harmless"] = refusal_rate(generate(chat, data["harmless_test"], config.max_new_tokens, config.batch_size))
        return counts

    counts = stage("recount (full length)", recount)

    chosen = selection["chosen"]
    rates = report["rates"]
    print()
    print(
        f"model {args.model}: {chat.n_layers} layers, d_model {chat.d_model}; "
        f"candidates layers {args.layers[0]}-{args.layers[-1]}, positions {args.positions}"
    )
    print(
        f"chosen: layer {chosen['layer']}, position {chosen['position']}, bypass {chosen['bypass']:.2f}, induce {chosen['induce']:.2f}, "
        f"kl {chosen['kl']:.3f}{' (FALLBACK: no candidate passed the filters)' if chosen['fallback'] else ''}"
    )
    print("refusal rates from RUN/report/report.json (substring judge, early stop), 95% Wilson intervals:")
    for name, by_kind in rates.items():
        for kind, r in by_kind.items():
            extra = f"   recount without early stop: {counts[name, kind][0]}/{counts[name, kind][1]}" if (name, kind) in counts else ""
            print(f"  {kind + ', ' + name:18s} {format_rate(r['refused'], r['total'])}{extra}")
    for name, kl in report["kl"].items():
        print(
            f"KL on harmless test prompts ({name}): first token {kl['first_token']['mean']:.4f}, "
            f"mean over the first {kl['multi_token']['tokens']} completion tokens {kl['multi_token']['mean']:.4f}"
        )
    ce = report["ce_loss"]
    print(f"cross-entropy on {ce['tokens']} tokens of the built-in corpus (nats/token): " + ", ".join(f"{k} {v:.4f}" for k, v in ce["loss"].items()))
    print(f"total {stages.seconds():.0f} s, peak RSS {peak_rss_gb():.2f} GB; run directory {out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
