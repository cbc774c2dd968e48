"""Throughput and memory of the pipeline's stages on one device, for docs/scale.md (issue 16).

    python benchmarks/scale.py --config CONFIG.json --tokenizer DIR [--device cuda] [--dtype bfloat16] [--stages all]

Builds a random-init checkpoint from ``--config`` (a transformers config.json, e.g. the default
model's or a 7B-class one) with the tokenizer of ``--tokenizer``, saved in shards of
``--shard-size``, so no hub access is needed; then loads it with ``refusal.model.loading.load_checkpoint``
and times, on the built-in prompts:

- extract: residual means over every layer for --n-extract harmful + harmless prompts (prompt tokens/s);
- trial: the search's cached objectives, then --trials kernel-edit trials (seconds per trial: apply,
  teacher-forced scoring of --n-score + --n-score prompts, revert);
- generate: greedy generation of --n-generate prompts, --new-tokens tokens each (random weights never
  emit EOS early, so every sequence runs to the limit; new tokens/s);
- export: ``refusal.checkpoint.export.export_model`` of the paper's edit, fidelity check included (seconds,
  peak RSS, peak GPU memory).

Random weights make the refusal numbers meaningless; only times and memory are read. Not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _stages import Stages, peak_rss_gb
from refusal.checkpoint.export import export_model
from refusal.common.progress import set_quiet
from refusal.data.prompt_sets import load_builtin
from refusal.edit.edits import Editor, EditParams, Kernel, KernelEdit, Orthogonalization
from refusal.engines.hf import HFEngine
from refusal.errors import FidelityError
from refusal.model.loading import load_checkpoint
from refusal.residual.activations import mean_activations
from refusal.search.trials import Objectives
from refusal.settings import SearchSettings


def build_checkpoint(config_path: Path, tokenizer_dir: Path, out: Path, dtype: torch.dtype, device: str, shard_size: str) -> int:
    """A random-init model of ``config_path``'s architecture saved to ``out`` with the tokenizer; returns its parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_path))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # small weights keep the residual stream finite in bf16 over many layers
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out), max_shard_size=shard_size)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return n


def diagnose_fidelity(chat, unit: torch.Tensor, exported: Path, figures: dict) -> None:
    """Max |Δlogit| between the export, the hooked ablation in the model's dtype, and both in float32."""
    from transformers import AutoModelForCausalLM

    from refusal.checkpoint.export import FIDELITY_PROMPTS
    from refusal.residual.interventions import ablate

    batch = chat.batch(list(FIDELITY_PROMPTS))
    mask = batch["attention_mask"].bool()
    model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=chat.dtype).to(chat.device).eval()
    with torch.inference_mode():
        logits = {"export": model(**batch, use_cache=False).logits.float()}
    del model
    logits["original"] = chat.logits(batch, last_only=False)
    with ablate(chat, unit):
        logits["hooks"] = chat.logits(batch, last_only=False)
    chat.model.float()
    logits["original_fp32"] = chat.logits(batch, last_only=False)
    with ablate(chat, unit):
        logits["hooks_fp32"] = chat.logits(batch, last_only=False)
    chat.model.to(getattr(torch, figures["dtype"]))
    pairs = [("export", "hooks"), ("export", "hooks_fp32"), ("hooks", "hooks_fp32"), ("original", "original_fp32"), ("export", "original")]
    for a, b in pairs:
        diff = (logits[a] - logits[b]).abs()[mask].max().item()
        figures[f"maxdiff_{a}_vs_{b}"] = round(diff, 4)
        print(
            f"  fidelity diagnosis: max |logit {a} - logit {b}| = {diff:.4f} (logit scale {logits['hooks_fp32'][mask].abs().max().item():.2f})",
            flush=True,
        )


def gpu_peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True, help="a transformers config.json")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a directory with tokenizer.json (and chat_template.jinja)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--shard-size", default="2GB")
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoint and the export go (default: a temporary folder)")
    parser.add_argument("--n-extract", type=int, default=128)
    parser.add_argument("--n-score", type=int, default=32)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--n-generate", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--stages", default="extract,trial,generate,export")
    parser.add_argument("--diagnose-fidelity", action="store_true", help="after the export, compare bf16 logits with float32 ones")
    parser.add_argument("--copy-baseline", action="store_true", help="after the export, time a plain copy of the source shards")
    args = parser.parse_args()
    set_quiet(True)
    stages_wanted = set(args.stages.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="refusal-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    stages = Stages()
    source = work / "source"
    if source.exists():
        shutil.rmtree(source)
    n_params = stages.run("build checkpoint", lambda: build_checkpoint(args.config, args.tokenizer, source, dtype, args.device, args.shard_size))
    shards = sorted(source.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    print(f"checkpoint: {n_params / 1e9:.2f} B parameters, {args.dtype}, {len(shards)} shard(s), {size / 1e9:.2f} GB", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    chat = stages.run("load", lambda: load_checkpoint(source, dtype=args.dtype, device=args.device))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {device_name}; model {chat.n_layers} layers, d_model {chat.d_model}; GPU peak {gpu_peak_gb():.1f} GB", flush=True)
    harmful, harmless = load_builtin("harmful"), load_builtin("harmless")
    figures: dict = {"device": device_name, "params_b": round(n_params / 1e9, 3), "dtype": args.dtype, "checkpoint_gb": round(size / 1e9, 2)}

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    if "extract" in stages_wanted:
        prompts = (harmful + harmless)[: args.n_extract]
        tokens = sum(len(chat.encode(p)) for p in prompts)
        mean_activations(chat, prompts[: args.batch_size], args.batch_size)  # warm-up
        sync()
        t0 = time.perf_counter()
        stages.run("extract", lambda: mean_activations(chat, prompts, args.batch_size))
        sync()
        seconds = time.perf_counter() - t0
        figures["extract_tokens_per_s"] = round(tokens / seconds)
        print(f"  extract: {len(prompts)} prompts, {tokens} prompt tokens, {tokens / seconds:,.0f} tokens/s", flush=True)

    if "trial" in stages_wanted:
        config = SearchSettings()
        config.score_batch_size = args.batch_size
        engine = HFEngine(chat, args.batch_size)
        ids = chat.refusal_token_ids(["I", "As"])
        objectives = stages.run("trial cache", lambda: Objectives(chat, engine, harmful[: args.n_score], harmless[: args.n_score], ids, config))
        unit = torch.nn.functional.normalize(torch.randn(chat.d_model, generator=torch.Generator().manual_seed(1)), dim=0)
        times = []
        with Editor(chat) as editor:
            for k in range(args.trials):
                params = EditParams(layer=chat.n_layers / 2, attn=Kernel(0.5 + 0.1 * k, centre=chat.n_layers / 2, width=4.0), mlp=Kernel(0.8))
                sync()
                t0 = time.perf_counter()
                with editor.applied(KernelEdit(unit, params)):
                    objectives.measure()
                sync()
                times.append(time.perf_counter() - t0)
        steady = times[1:] or times
        figures["trial_seconds"] = round(sum(steady) / len(steady), 3)
        print(f"  trial: {args.n_score}+{args.n_score} prompts, {figures['trial_seconds']:.3f} s per trial (first {times[0]:.3f} s)", flush=True)

    if "generate" in stages_wanted:
        engine = HFEngine(chat, args.batch_size)
        prompts = (harmless * 8)[: args.n_generate]
        engine.generate_ids(prompts[: args.batch_size], 4)  # warm-up
        sync()
        t0 = time.perf_counter()
        out = stages.run("generate", lambda: engine.generate_ids(prompts, args.new_tokens))
        sync()
        seconds = time.perf_counter() - t0
        new = sum(len(x) for x in out)
        figures["generate_tokens_per_s"] = round(new / seconds)
        print(f"  generate: {len(prompts)} prompts at batch {args.batch_size}, {new} new tokens, {new / seconds:,.0f} tokens/s", flush=True)

    if "export" in stages_wanted:
        unit = torch.nn.functional.normalize(torch.randn(chat.d_model, generator=torch.Generator().manual_seed(2)), dim=0)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        rss_before = peak_rss_gb()
        t0 = time.perf_counter()
        try:
            info = stages.run("export", lambda: export_model(chat, Orthogonalization(unit), work / "export", overwrite=True))
        except FidelityError as e:  # recorded, then the export is timed without the check
            print(f"  export: {e}", flush=True)
            figures["fidelity_error"] = str(e)
            t0 = time.perf_counter()
            info = stages.run("export, no check", lambda: export_model(chat, Orthogonalization(unit), work / "export", overwrite=True, check=False))
            info["fidelity_max_abs_diff"] = float("nan")
        seconds = time.perf_counter() - t0
        written = sum(p.stat().st_size for p in (work / "export").glob("*.safetensors"))
        figures.update(export_seconds=round(seconds, 1), export_gb=round(written / 1e9, 2), export_gpu_peak_gb=round(gpu_peak_gb(), 1))
        print(
            f"  export: {seconds:.1f} s, {written / 1e9:.2f} GB written in {len(list((work / 'export').glob('*.safetensors')))} file(s), "
            f"fidelity max |Δlogit| {info['fidelity_max_abs_diff']:.2e}; peak RSS {peak_rss_gb():.1f} GB (before {rss_before:.1f}), "
            f"GPU peak {gpu_peak_gb():.1f} GB",
            flush=True,
        )
        if args.copy_baseline:  # a plain copy of the same files on the same disk: the throughput a streaming export is compared with
            copy = work / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            copy.mkdir()
            t0 = time.perf_counter()
            for shard in shards:
                shutil.copyfile(shard, copy / shard.name)
            copy_seconds = time.perf_counter() - t0
            figures.update(
                copy_seconds=round(copy_seconds, 1),
                copy_gb_per_s=round(size / 1e9 / copy_seconds, 2),
                export_gb_per_s=round(written / 1e9 / seconds, 2),
            )
            print(
                f"  plain copy of the source shards: {copy_seconds:.1f} s "
                f"({size / 1e9 / copy_seconds:.2f} GB/s; export {written / 1e9 / seconds:.2f} GB/s)",
                flush=True,
            )
            shutil.rmtree(copy)
        if args.diagnose_fidelity:
            diagnose_fidelity(chat, unit, work / "export", figures)
    figures["peak_rss_gb"] = round(peak_rss_gb(), 2)
    print("figures " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
