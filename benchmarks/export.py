"""The streamed export's peak memory and throughput against a plain copy of the same files (issue 16).

    python benchmarks/export.py [--hidden 1536 --layers 28 --intermediate 8960] [--shard-size 500MB] [--work DIR] [--loaded]
                                [--workers N] [--profile]

Builds a random-init Qwen2-architecture checkpoint in bf16 (by default Qwen2-1.5B's shape: 1.5 B
parameters, 3.1 GB) saved in several shards, then measures, each in a fresh process:

- the interpreter's own baseline: ``import refusal, torch, transformers``;
- ``refusal export --streaming``'s path: the model's structure without weights
  (``loading.load_skeleton``) and ``export.export_model`` of the paper's edit along a random direction,
  which rewrites the checkpoint tensor by tensor;
- a plain copy of the same shard files on the same disk, before and after (each timing, the export's
  too, includes writing the data back to the disk: ``os.sync``, which page-cache noise otherwise hides);
- with ``--loaded``, the export with the model loaded (float32 on CPU) and its logits check.

Prints peak RSS (over the baseline, and against the largest shard + 512 MiB bound) and GB/s. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = {
    "baseline": "import refusal, torch, transformers",
    "streamed": (
        "import cProfile, pstats, sys, time, torch\n"
        "import refusal.checkpoint.streaming\n"
        "from refusal.edit.edits import Orthogonalization\n"
        "from refusal.checkpoint.export import export_model\n"
        "from refusal.model.loading import load_skeleton\n"
        "from refusal.common.progress import set_quiet\n"
        "set_quiet(True)\n"
        "cap = int(sys.argv[3]) if sys.argv[3] != '-' else refusal.checkpoint.streaming.FILE_WORKERS\n"
        "refusal.checkpoint.streaming.FILE_WORKERS = refusal.edit.tensor_edit.FILE_WORKERS = cap\n"
        "chat = load_skeleton(sys.argv[1])\n"
        "direction = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(0))\n"
        "profile = cProfile.Profile() if sys.argv[4] == 'profile' else None\n"
        "start = time.perf_counter()\n"
        "profile and profile.enable()\n"
        "info = export_model(chat, Orthogonalization(direction), sys.argv[2], check=False)\n"
        "profile and profile.disable()\n"
        "print('SECONDS', time.perf_counter() - start)\n"
        "profile and pstats.Stats(profile, stream=sys.stdout).sort_stats('tottime').print_stats(14)\n"
        "print('WRITTEN', info['written'])\n"
    ),
    "loaded": (
        "import sys, torch\n"
        "from refusal.edit.edits import Orthogonalization\n"
        "from refusal.checkpoint.export import export_model\n"
        "from refusal.model.packaged import load_model\n"
        "from refusal.common.progress import set_quiet\n"
        "set_quiet(True)\n"
        "chat = load_model(sys.argv[1], device='cpu')\n"
        "direction = torch.randn(chat.d_model, generator=torch.Generator().manual_seed(0))\n"
        "info = export_model(chat, Orthogonalization(direction), sys.argv[2])\n"
        "print('WRITTEN', info['written'], info['fidelity_max_abs_diff'])\n"
    ),
}
# The peak of this process's own memory map (VmHWM): unlike ru_maxrss it is not inherited from the parent across fork/exec.
PEAK = "\nprint('PEAK_KB', next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))\n"


def child(name: str, *args: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in GB, output) of a fresh interpreter running ``CHILD[name]``."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD[name] + PEAK, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_KB"))
    return seconds, peak * 1024 / 1e9, done.stdout


def build(path: Path, hidden: int, layers: int, intermediate: int, shard_size: str, device: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tokenizer  # a word-level tokenizer with a chat template: the export copies it

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(path), max_shard_size=shard_size)
    build_tokenizer().save_pretrained(str(path))


def copy(source: Path, target: Path) -> float:
    """Seconds to copy the shards and write them back to the disk (``os.sync`` included, started clean)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    os.sync()
    start = time.perf_counter()
    for file in sorted(source.glob("*.safetensors")):
        shutil.copyfile(file, target / file.name)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    return seconds


def synced() -> float:
    """Seconds ``os.sync`` takes: the write-back a timing that ends before it leaves out."""
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--intermediate", type=int, default=8960)
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--loaded", action="store_true", help="also time the export with the model loaded (float32, logits check)")
    parser.add_argument("--build-device", default="cpu", help="where the random-init checkpoint is built (cuda is faster at 7B)")
    parser.add_argument("--copies", type=int, default=3, help="plain copies timed: one before the export, the rest after")
    parser.add_argument("--workers", default="-", help="the cap on files rewritten at once (streaming.FILE_WORKERS)")
    parser.add_argument("--profile", action="store_true", help="print the export's profile (main thread only: --workers 1)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="refusal-export-"))
    source = work / "source"
    if not source.exists():
        start = time.perf_counter()
        build(source, args.hidden, args.layers, args.intermediate, args.shard_size, args.build_device)
        print(f"built the checkpoint in {time.perf_counter() - start:.0f} s")
    shards = sorted(source.glob("*.safetensors"))
    sizes = [f.stat().st_size for f in shards]
    total, largest = sum(sizes), max(sizes)
    index = json.loads((source / "model.safetensors.index.json").read_text()) if len(shards) > 1 else {}
    print(
        f"checkpoint: {total / 1e9:.2f} GB bf16 in {len(shards)} shards (largest {largest / 1e9:.2f} GB), {len(index.get('weight_map', {}))} tensors"
    )

    base_s, base_gb, _ = child("baseline")
    print(f"interpreter baseline (import refusal, torch, transformers): peak RSS {base_gb:.2f} GB, {base_s:.1f} s")
    copies = [copy(source, work / "copy")]
    out = work / "streamed"
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    seconds, peak, text = child("streamed", str(source), str(out), str(args.workers), "profile" if args.profile else "-")
    write_back = synced()  # the export's dirty pages reaching the disk, as the copies' timings include theirs
    copies += [copy(source, work / "copy") for _ in range(args.copies - 1)]
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    bound = largest / 1e9 + 0.512 * 1.073741824
    best, middle = min(copies), statistics.median(copies)
    inner = float(next(line.split()[1] for line in text.splitlines() if line.startswith("SECONDS"))) + write_back
    shown = ", ".join(f"{c:.1f}" for c in copies)
    print(f"plain copy of the shards (one before the export, the rest after): {shown} s; median {middle:.1f} s ({total / 1e9 / middle:.2f} GB/s)")
    print(f"streamed export: {inner:.1f} s ({written / 1e9:.2f} GB, {written / 1e9 / inner:.2f} GB/s); {seconds:.1f} s with the interpreter's start")
    print(f"  throughput vs a plain copy: {middle / inner:.0%} of the median one, {best / inner:.0%} of the fastest")
    print(
        f"  peak RSS {peak:.2f} GB = baseline + {peak - base_gb:.2f} GB; bound: largest shard + 512 MiB = {bound:.2f} GB over the baseline "
        f"-> {'within' if peak - base_gb <= bound else 'ABOVE'}"
    )
    print("  " + next(line for line in text.splitlines() if line.startswith("WRITTEN")))
    if args.profile:
        print(text[text.index("SECONDS") : text.index("WRITTEN")])
    shutil.rmtree(out)
    if args.loaded:
        out = work / "loaded"
        seconds, peak, text = child("loaded", str(source), str(out))
        print(f"export with the model loaded (float32 on CPU, logits check): {seconds:.1f} s, peak RSS {peak:.2f} GB")
        print("  " + next(line for line in text.splitlines() if line.startswith("WRITTEN")))
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
