"""The full default pipeline on the real default model, stage by stage.

    python benchmarks/real_model.py [--layers 8-18] [--positions -1,-2] [--n-test 32]

Prints, for each stage, wall time and the process's peak RSS so far; the chosen layer/position;
refusal rates (substring judge, with counts and 95% Wilson intervals) before and after ablation,
with activation addition, and for the exported checkpoint; and the first-token KL on harmless
prompts. Not a test: it only measures.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from refusal.cli import _int_list, _join_negative_lists
from refusal.generation import generate
from refusal.interventions import ablate, add
from refusal.judges import refusal_rate
from refusal.model import load_model
from refusal.pipeline import Run, RunConfig, evaluate_quick, export, extract, run_data, select
from refusal.progress import set_quiet
from refusal.scoring import kl_divergence, last_logits, prepare_batches
from refusal.selection import SelectionConfig
from refusal.stats import format_rate


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


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
    config = RunConfig(model=args.model, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                       selection=SelectionConfig(layers=args.layers, positions=args.positions))
    rows = []

    def stage(name, fn):
        start = time.perf_counter()
        value = fn()
        rows.append((name, time.perf_counter() - start, peak_rss_gb()))
        print(f"{name:22s} {rows[-1][1]:8.1f} s   peak RSS {rows[-1][2]:5.2f} GB", flush=True)
        return value

    chat = stage("load model", lambda: load_model(args.model, device="cpu"))
    run = Run.create(out, config, overwrite=True)
    stage("extract", lambda: extract(run, chat))
    selection = stage("select", lambda: select(run, chat))
    stage("export + fidelity", lambda: export(run, chat, out / "model", overwrite=True))
    results = stage("generate (orig/ablated)", lambda: evaluate_quick(run, chat))

    data = run_data(config)
    from refusal.directions import Direction

    direction = Direction.load(out / "direction.safetensors")

    def addition():
        with add(chat, direction.vector, direction.layer):
            return refusal_rate(generate(chat, data["harmless_test"], config.max_new_tokens, config.batch_size))

    added = stage("generate (addition)", addition)

    def first_token_kl():
        batches = prepare_batches(chat, data["harmless_test"], config.batch_size)
        base = last_logits(chat, batches)
        with ablate(chat, direction.vector):
            return kl_divergence(base, last_logits(chat, batches)).mean().item()

    kl = stage("KL (harmless)", first_token_kl)
    edited = load_model(str(out / "model"), device="cpu")
    exported = stage("generate (exported)", lambda: refusal_rate(generate(edited, data["harmful_test"], config.max_new_tokens, config.batch_size)))

    chosen = selection["chosen"]
    rates = results["rates"]
    print()
    print(f"model {args.model}: {chat.n_layers} layers, d_model {chat.d_model}; candidates layers {args.layers[0]}-{args.layers[-1]}, positions {args.positions}")
    print(f"chosen: layer {chosen['layer']}, position {chosen['position']}, bypass {chosen['bypass']:.2f}, induce {chosen['induce']:.2f}, "
          f"kl {chosen['kl']:.3f}{' (FALLBACK: no candidate passed the filters)' if chosen['fallback'] else ''}")
    print(f"harmful refused, original        {format_rate(rates['harmful_original']['refused'], rates['harmful_original']['total'])}")
    print(f"harmful refused, ablated (hooks) {format_rate(rates['harmful_ablated']['refused'], rates['harmful_ablated']['total'])}")
    print(f"harmful refused, exported model  {format_rate(*exported)}")
    print(f"harmless refused, original       {format_rate(rates['harmless_original']['refused'], rates['harmless_original']['total'])}")
    print(f"harmless refused, ablated        {format_rate(rates['harmless_ablated']['refused'], rates['harmless_ablated']['total'])}")
    print(f"harmless refused, addition       {format_rate(*added)}")
    print(f"first-token KL on harmless test prompts under ablation: {kl:.3f}")
    print(f"total {sum(r[1] for r in rows):.0f} s, peak RSS {peak_rss_gb():.2f} GB; run directory {out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
