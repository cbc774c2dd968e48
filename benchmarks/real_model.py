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
from refusal.cli.main import join_negative_lists
from refusal.commands.evaluate import evaluate_run
from refusal.commands.run import candidates, export, selection
from refusal.common.parsing import int_list
from refusal.common.progress import set_quiet
from refusal.edit.edits import Orthogonalization
from refusal.engines.hf import generate
from refusal.measure.judges import refusal_rate
from refusal.measure.stats import format_rate
from refusal.residual.interventions import ablate, add
from refusal.run.workspace import start
from refusal.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--layers", type=int_list, default=int_list("8-18"))
    parser.add_argument("--positions", type=int_list, default=[-1, -2])
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(join_negative_lists(sys.argv[1:]))
    set_quiet(True)
    out = args.out or Path(tempfile.mkdtemp(prefix="refusal-bench-")) / "run"
    settings = Settings()
    settings.model.model, settings.model.device = args.model, "cpu"
    settings.data.n_train, settings.data.n_val, settings.data.n_test = args.n_train, args.n_val, args.n_test
    settings.selection.layers, settings.selection.positions = args.layers, args.positions
    stages = Stages()
    stage = stages.run

    ctx = stage("load model", lambda: start(settings, out, overwrite=True))
    chat = ctx.chat
    cands = stage("extract", lambda: candidates(ctx))
    chosen_record, direction = stage("select", lambda: selection(ctx))
    stage("export + fidelity", lambda: export(ctx, Orthogonalization(direction.vector), out / "model", "selection"))
    report = stage("evaluate (report)", lambda: evaluate_run(ctx, cands, chosen_record, direction, edited=True))

    # An independent recount: full-length generation (no early stop) with the plain helper, so the
    # report's numbers can be checked against a second path through the code.
    harmful, harmless = ctx.prompts.get("harmful", "test"), ctx.prompts.get("harmless", "test")
    e = settings.evaluation

    def recount():
        counts = {("original", "harmful"): refusal_rate(generate(chat, harmful, e.max_new_tokens, e.batch_size))}
        with ablate(chat, direction.vector):
            counts["ablated", "harmful"] = refusal_rate(generate(chat, harmful, e.max_new_tokens, e.batch_size))
        with add(chat, direction.vector, direction.layer):
            counts["added", "harmless"] = refusal_rate(generate(chat, harmless, e.max_new_tokens, e.batch_size))
        return counts

    counts = stage("recount (full length)", recount)

    selection_record = chosen_record
    chosen = selection_record["chosen"]
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
