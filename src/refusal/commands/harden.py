"""``refusal harden --run RUN --out DIR``: a LoRA that keeps refusal when the refusal direction is erased, merged
into a normal checkpoint, and measured beside the original.

    reopen(RUN)                      the run's model, prompts and refusal direction (selection.json; none: one line)
    harden.targets.training_data     the model's own refusals (harmful train prompts) and completions (harmless ones)
    harden.training.train            refusal-feature adversarial training of a peft LoRA, a KL budget on harmless
                                     validation prompts; resumable from RUN/harden.state.safetensors
    harden.comparison.compare        original vs hardened on the test split: refusal with each model's own
                                     direction ablated, over-refusal, harmless KL, the capability proxy
    RUN/harden.json, RUN/harden.safetensors (the merged LoRA as tensor deltas)
    DIR                              the merged checkpoint (streamed export, fidelity-checked, refusal.json)

Reused while fresh (same model, prompts, direction and hardening settings); more --harden-steps or a longer
--harden-time-budget continue the training where it stopped.
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.export import check_target
from ..common.progress import log
from ..common.provenance import digest, timestamp
from ..data.prompt_sets import load_capability
from ..edit.tensor_deltas import TensorDeltas
from ..engines.factory import make_engine, make_forward
from ..errors import RefusalError
from ..harden.comparison import compare
from ..harden.lora import lora_attached
from ..harden.state import load_state, save_state
from ..harden.targets import training_data
from ..harden.training import Plan, train
from ..measure.judges import refusal_phrases
from ..residual.directions import Direction
from ..run.artifacts import ARTIFACTS
from ..run.directory import RunDir
from ..run.files import write_json
from ..run.workspace import Context, reopen
from ..settings import HardenSettings
from .run import export

# What the training's course depends on (its step count and time budget only say how far it goes).
STOPPING = ("harden_steps", "harden_time_budget")
FILE = "harden.safetensors"  # the merged LoRA's tensors (``TensorDeltas.stored``), beside harden.json


@dataclass
class HardenResult:
    path: Path
    out: Path
    hardening: dict  # harden.json
    export: dict

    def summary(self) -> dict:
        h = self.hardening
        return {
            "run": str(self.path),
            "out": str(self.out),
            "steps": h["training"]["steps"],
            "kept": h["training"]["kept"],
            "comparison": h["comparison"],
            "fidelity_max_abs_diff": self.export.get("fidelity_max_abs_diff"),
        }


def plan(s: HardenSettings, direction: Direction, seed: int) -> Plan:
    return Plan(
        steps=s.harden_steps,
        batch_size=s.harden_batch_size,
        learning_rate=s.harden_lr,
        ablate_probability=s.ablate_probability,
        kl_weight=s.kl_weight,
        max_kl=s.harden_max_kl,
        refresh_every=s.refresh_every,
        eval_every=s.eval_every,
        layer=direction.layer,
        position=direction.position,
        seed=seed,
        time_budget=s.harden_time_budget,
    )


def training_fingerprint(ctx: Context, prompts: dict) -> str:
    s = ctx.settings
    return digest(
        {
            "model": ctx.model_id,
            "prompts": prompts,
            "selection": ctx.run.entry("selection").get("fingerprint"),
            "settings": {k: v for k, v in s.to_dict()["harden"].items() if k not in STOPPING},
            "refusal": [s.evaluation.refusal_tokens, s.evaluation.refusal_phrases],
            "model_settings": [s.model.dtype, s.model.chat_template],
            "seed": s.data.seed,
        }
    )


def build_hardening(ctx: Context, direction: Direction) -> dict:
    """Train (resuming), keep the best adapter within the KL budget, compare: harden.json's content; writes
    RUN/harden.safetensors."""
    chat, s, run = ctx.chat, ctx.settings, ctx.run
    h, seed = s.harden, s.data.seed
    limit = h.harden_prompts
    prompts = {k: {"train": ctx.prompts.get(k, "train")[:limit], "val": ctx.prompts.get(k, "val")} for k in ("harmful", "harmless")}
    phrases = refusal_phrases(s.evaluation.refusal_phrases)
    log("harden: the model's own responses to the train prompts")
    with closing(make_engine(chat, s.evaluation, None, "own responses")) as engine:
        data, summary = training_data(chat, engine, prompts, h.response_tokens, phrases)
    refusal_ids = chat.refusal_token_ids(s.evaluation.refusal_tokens)
    capability = load_capability("test")[: s.evaluation.capability_items] if s.evaluation.capability_items > 0 else []
    forward = make_forward(chat, s)
    fingerprint = training_fingerprint(ctx, prompts)
    state_path = run.path / "harden.state.safetensors"
    begin = time.perf_counter()
    with lora_attached(chat, h.lora_rank, h.lora_alpha, h.lora_modules, seed) as adapter:
        final = train(
            chat,
            adapter,
            data,
            plan(h, direction, seed),
            refusal_ids,
            forward,
            load_state(state_path, fingerprint),
            lambda state: save_state(state_path, state, fingerprint),
        )
        adapter.load_state(final["best"]["adapter"])
        deltas = adapter.deltas()
    ctx.timed("harden_training", begin)
    kept = final["best"]["checkpoint"]
    edit = TensorDeltas(deltas, note={"lora": {"rank": h.lora_rank, "alpha": h.lora_alpha, "modules": h.lora_modules}, "kept_step": kept["step"]})
    described = {**edit.describe(), "file": None if edit.inline() else FILE}
    if not edit.inline():
        save_deltas(edit, run.path / FILE)
    log("harden: comparing the hardened model with the original on the test split")
    begin = time.perf_counter()
    test = {k: [chat.encode(x) for x in ctx.prompts.get(k, "test")] for k in ("harmful", "harmless")}
    train_ids = {k: [x.prompt for x in getattr(data, k)] for k in ("harmful", "harmless")}
    comparison = compare(chat, forward, edit, train_ids, test, direction.layer, direction.position, refusal_ids, capability, s.evaluation.batch_size)
    ctx.timed("harden_comparison", begin)
    stopped = "steps" if final["step"] >= h.harden_steps else "time budget"
    if kept["step"] == 0:
        log(f"harden: no checkpoint within --harden-max-kl {h.harden_max_kl:g} improved on the original; the edit is empty (B = 0)")
    return {
        "format_version": ARTIFACTS["harden"].format_version,
        "created": timestamp(),
        "model": run.info.get("model", {}),
        "direction": {"layer": direction.layer, "position": direction.position},
        "settings": s.to_dict()["harden"],
        "data": summary,
        "training": {"steps": final["step"], "stopped_by": stopped, "seconds": round(final["elapsed"], 1), "kept": kept, "history": final["history"]},
        "edit": described,
        "comparison": comparison,
    }


def hardened_edit(run: RunDir, hardening: dict) -> TensorDeltas:
    """The merged LoRA of harden.json, its deltas read from RUN/harden.safetensors (refused if their digest differs)."""
    return TensorDeltas.from_description(hardening["edit"], run.path)


def save_deltas(edit: TensorDeltas, path: Path) -> None:
    """The deltas' tensors as ``TensorDeltas.from_description`` reads them, written atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(edit.stored(), str(tmp))
    tmp.replace(path)


def harden(path: Path, out: Path, options: dict[str, Any] | None = None, overwrite: bool = False) -> HardenResult:
    """``refusal harden --run RUN --out DIR``: train (or reuse) the hardening, export it to DIR, return both."""
    begin = time.perf_counter()
    run = RunDir.open(path)
    if not run.file("selection").is_file() or not run.file("selection", 1).is_file():
        raise RefusalError(f"{path} has no refusal direction (selection.json); run `refusal run --out {path}` first")
    source = run.info.get("model", {}).get("path") or run.settings.model.model
    check_target(out, source, overwrite)
    if Path(out).expanduser().resolve() == run.path.resolve() or run.path.resolve() in Path(out).expanduser().resolve().parents:
        raise RefusalError(f"export target {out} is inside the run directory {path}; choose a directory outside it")
    settings = run.settings
    for name, value in (options or {}).items():
        setattr(settings.harden, name, value)
    settings.validate()  # bad options: one line, nothing written
    ctx = reopen(path)
    ctx.settings = settings
    _, direction = ctx.require("selection")

    def make(*_: object) -> dict:
        data = build_hardening(ctx, direction)
        write_json(run.file("harden"), data)
        run.update(settings=settings.to_dict())  # the options are kept once the hardening worked
        return data

    hardening = ctx.get("harden", make=make)
    edit = hardened_edit(ctx.run, hardening)
    extra = {"hardening": {k: hardening[k] for k in ("settings", "training", "comparison", "direction")}}
    extra["hardening"]["training"] = {k: v for k, v in hardening["training"].items() if k != "history"}
    info = export(ctx, edit, Path(out), "harden", overwrite, extra)
    ctx.timed("harden_total", begin)
    return HardenResult(ctx.run.path, Path(out), hardening, info)
