"""Generation throughput: refusal's engine against plain ``model.generate`` on the same prompts.

    python benchmarks/generation.py [--model demo] [--n 100] [--batch-size 16] [--max-new-tokens 64]

Measurements on the same model and prompts (harmful and harmless built-in test prompts, half each):
plain ``model.generate`` (greedy) on the same length-sorted batches the engine uses, and
``HFEngine.generate`` (no early stop), alternating ``--repeats`` times; then plain
``model.generate`` with batches in input order, and ``HFEngine`` with early stop at a refusal
phrase (what evaluation uses for verdicts).
New tokens are counted up to and including EOS. Not a test: it only measures and prints.
"""

from __future__ import annotations

import argparse
import time

import torch

from refusal.common.progress import set_quiet
from refusal.data.prompt_sets import load_builtin
from refusal.engines.hf import HFEngine
from refusal.measure.judges import is_refusal
from refusal.model.packaged import load_model


def plain_generate(chat, groups: list[list[str]], max_new_tokens: int) -> tuple[int, float]:
    """New tokens and seconds for model.generate over ``groups`` (greedy, left padding)."""
    tokenizer = chat.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = chat.model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos)
    tokens, start = 0, time.perf_counter()
    for group in groups:
        batch = chat.batch(group)
        with torch.inference_mode():
            out = chat.model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            cut = next((k for k, t in enumerate(row) if t in eos), None)
            tokens += cut + 1 if cut is not None else len(row)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats of the two same-batch measurements")
    args = parser.parse_args()
    set_quiet(True)
    torch.manual_seed(0)
    chat = load_model(args.model, device="cpu")
    prompts = load_builtin("harmful", "test")[: args.n // 2] + load_builtin("harmless", "test")[: args.n - args.n // 2]
    size = args.batch_size
    in_order = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    by_length = sorted(prompts, key=lambda p: len(chat.encode(p)))
    sorted_groups = [by_length[i : i + size] for i in range(0, len(by_length), size)]
    engine = HFEngine(chat, size)
    plain_generate(chat, [prompts[:2]], 4)  # warm-up

    def report(name: str, tokens: int, seconds: float) -> float:
        print(f"{name:32s} {tokens:6d} new tokens in {seconds:7.1f} s = {tokens / seconds:6.1f} tokens/s", flush=True)
        return tokens / seconds

    # The two same-batch measurements alternate, so slow drifts of the machine hit both alike.
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(report("model.generate, sorted batches", *plain_generate(chat, sorted_groups, args.max_new_tokens)))
        ours.append(report("HFEngine", *_engine(engine, prompts, args.max_new_tokens, None)))
    report("model.generate, input order", *plain_generate(chat, in_order, args.max_new_tokens))
    early = _engine(engine, prompts, args.max_new_tokens, is_refusal)
    report("HFEngine, early stop", *early)
    best = lambda xs: max(xs)
    print(
        f"\nHFEngine vs model.generate on the same batches (best of {args.repeats}): {best(ours) / best(plain):.1%} of its tokens/s "
        f"({args.n} prompts, batch {size}, {args.max_new_tokens} new tokens max, {torch.get_num_threads()} threads)"
    )


def _engine(engine: HFEngine, prompts: list[str], max_new_tokens: int, stop) -> tuple[int, float]:
    start = time.perf_counter()
    ids = engine.generate_ids(prompts, max_new_tokens, stop)
    return sum(map(len, ids)), time.perf_counter() - start


if __name__ == "__main__":
    main()
