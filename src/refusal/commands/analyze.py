"""``refusal analyze --run RUN``: how a suffix suppresses the refusal direction (the paper's §5) -> RUN/analysis.json.

    reopen(RUN); candidates + selection      reused while fresh, else computed as `refusal run` would
    the suffix                               RUN/attack.json (fresh) or --suffix-file; a random one of the same length
    per-layer cosine (Fig. 5)                harmful, harmful + suffix, harmful + random suffix, harmless: mean ± std
    direct attribution (Fig. 6)              top heads by their output on the direction, with and without the suffixes,
                                             and their attention on instruction / suffix / template tokens
    decomposition                            embedding + heads + attention biases + MLPs = the final projection
    the direction across layers              and against a second model's (--base), the paper's App. J
    -> RUN/analysis.json, and the report's "Mechanisms" section (RUN/report, made if missing)

All on the test split (``--analysis-prompts`` caps it): the harmful prompts are those the model refuses without a
suffix, as in the paper (the substring judge on greedy generations: attack.json's, or made here for a --suffix-file;
how many of how many go into analysis.json; none refused is an error before anything is written). The attack's
rates (no suffix, suffix, random suffix) from attack.json go into the report beside the measurements.
Directions and projections in float32.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..common.progress import log
from ..common.provenance import model_fingerprint, timestamp
from ..data.suffixes import REGIONS, SuffixedPrompt, random_suffix, read_suffix_file, split_prompt
from ..edit.edits import Orthogonalization
from ..engines.factory import make_engine
from ..errors import RefusalError
from ..measure.judges import judge_refusals, refusal_phrases
from ..measure.mechanisms import attention_masses, check_decomposable, compare_directions, decompose, direction_cosines, layer_cosines, top_heads
from ..model.packaged import load_model, resolve_model
from ..report.render import write_report
from ..residual.activations import mean_activations
from ..residual.directions import Candidates, Direction, compute_candidates
from ..run.artifacts import ARTIFACTS
from ..run.directory import RunDir
from ..run.files import write_json
from ..run.workspace import Context, reopen
from .attack import CONDITIONS, fresh_attack
from .evaluate import evaluate_run, fresh_report
from .run import candidates, selection

GROUPS = {
    "harmful": "harmful",
    "harmful_suffix": "harmful + adversarial suffix",
    "harmful_random": "harmful + random suffix",
    "harmless": "harmless",
}
HARMFUL_GROUPS = ("harmful", "harmful_suffix", "harmful_random")


@dataclass
class AnalyzeResult:
    path: Path
    mechanisms: dict
    timings: dict

    def summary(self) -> dict:
        m = self.mechanisms
        return {
            "run": str(self.path),
            "gap_closed": m["gap_closed"],
            "top_heads": [[h["layer"], h["head"]] for h in m["heads"]],
            "decomposition_max_error": max(d["max_abs_error"] for d in m["decomposition"].values()),
            "timings": self.timings,
        }


# ---- the measurements --------------------------------------------------------------------------------
def _mean_std(values: torch.Tensor) -> dict:
    """Per-column mean and standard deviation of [n, ...] values, as lists."""
    std = values.std(0) if values.shape[0] > 1 else torch.zeros_like(values[0])
    return {"mean": values.mean(0).tolist(), "std": std.tolist()}


def gap_closed(cosine: dict, layers: list[int], group: str) -> dict:
    """Fraction of the harmful - harmless cosine gap that ``group`` removes, per layer and averaged from the direction's layer on."""
    harmful, harmless, other = (torch.tensor(cosine[g]["mean"]) for g in ("harmful", "harmless", group))
    gap = harmful - harmless
    per_layer = torch.where(gap.abs() > 1e-6, (harmful - other) / gap, torch.zeros_like(gap))
    tail = per_layer[layers[0] :] if layers else per_layer
    return {"per_layer": per_layer.tolist(), "mean_from_direction_layer": float(tail.mean())}


def measure(
    ctx: Context, cands: Candidates, direction: Direction, suffix: list[int], baseline: list[int], base: Candidates | None, refused: dict
) -> dict:
    """The mechanisms section of the report: every number the figures show, on the refused harmful prompts (``refused_prompts``)."""
    chat, s = ctx.chat, ctx.settings
    cap, batch = s.analysis.analysis_prompts, s.evaluation.batch_size
    test = ctx.prompts.get("harmful", "test")
    harmful, harmless = [test[i] for i in refused["indices"]][:cap], ctx.prompts.get("harmless", "test")[:cap]
    prompts: dict[str, list[SuffixedPrompt]] = {
        "harmful": [split_prompt(chat, x) for x in harmful],
        "harmful_suffix": [split_prompt(chat, x, suffix) for x in harmful],
        "harmful_random": [split_prompt(chat, x, baseline) for x in harmful],
        "harmless": [split_prompt(chat, x) for x in harmless],
    }
    unit = direction.vector.float() / direction.vector.float().norm()
    cosine = {g: _mean_std(layer_cosines(chat, [p.ids for p in ps], unit, batch)) for g, ps in prompts.items()}
    log("analyze: per-layer cosine done; decomposing the projection")
    parts = {g: decompose(chat, [p.ids for p in prompts[g]], unit, batch) for g in HARMFUL_GROUPS}
    heads = top_heads(parts["harmful"], s.analysis.top_heads)
    masses = {g: attention_masses(chat, prompts[g], heads, batch) for g in HARMFUL_GROUPS}  # [n, k, 3]
    layers = list(range(direction.layer, chat.n_layers + 1))
    return {
        "created": timestamp(),
        "direction": {"layer": direction.layer, "position": direction.position},
        "suffix": {"text": chat.tokenizer.decode(suffix), "ids": suffix, "random_text": chat.tokenizer.decode(baseline), "random_ids": baseline},
        "n_prompts": {"harmful": len(harmful), "harmless": len(harmless)},
        "refused": {"refused": len(refused["indices"]), "of": len(test), "used": len(harmful), "judge": refused["judge"]},
        "groups": GROUPS,
        "layers": list(range(chat.n_layers + 1)),  # decoder-layer inputs, then the final residual
        "cosine": cosine,
        "gap_closed": {g: gap_closed(cosine, layers, g) for g in ("harmful_suffix", "harmful_random")},
        "heads": [
            {
                "layer": layer,
                "head": head,
                "attribution": {g: float(parts[g].heads[:, layer, head].mean()) for g in HARMFUL_GROUPS},
                "attention": {g: {r: float(masses[g][:, i, j].mean()) for j, r in enumerate(REGIONS)} for g in HARMFUL_GROUPS},
            }
            for i, (layer, head) in enumerate(heads)
        ],
        "decomposition": {
            g: {
                "total": float(d.total.mean()),
                "embed": float(d.embed.mean()),
                "heads": float(d.heads.sum((1, 2)).mean()),
                "top_heads": float(sum(d.heads[:, layer, head] for layer, head in heads).mean()),  # type: ignore[union-attr]
                "attn_bias": float(d.attn_bias.sum(1).mean()),
                "mlp": float(d.mlp.sum(1).mean()),
                "max_abs_error": float((d.summed() - d.total).abs().max()),
            }
            for g, d in parts.items()
        },
        "direction_across_layers": direction_cosines(cands, unit, direction.position),
        "base": None if base is None else {"model": s.analysis.base, "cosine": compare_directions(cands, base, direction.position)},
    }


def check_base(ctx: Context) -> None:
    """``--base``'s depth and width from its config.json, before any work (a hub id or a .gguf file is checked once loaded)."""
    source, chat = ctx.settings.analysis.base, ctx.chat
    config = Path(resolve_model(source)).expanduser() / "config.json" if source is not None else None
    if config is None or not config.is_file():
        return
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # loading it says what is wrong
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    width = next((text[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(text.get(k), int)), chat.d_model)
    layers = next((text[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(text.get(k), int)), chat.n_layers)
    if (width, layers) != (chat.d_model, chat.n_layers):
        raise RefusalError(
            f"--base {source} has {layers} layers of width {width}, the run's model {chat.n_layers} of {chat.d_model}; "
            "give the base model of the same architecture"
        )


def base_candidates(ctx: Context) -> Candidates | None:
    """Difference-in-means directions of ``--base`` on the run's train prompts, formatted with the run model's chat template."""
    source = ctx.settings.analysis.base
    if source is None:
        return None
    chat, m, batch = ctx.chat, ctx.settings.model, ctx.settings.evaluation.batch_size
    with tempfile.TemporaryDirectory() as tmp:  # load_model takes the template as a file
        template = Path(tmp) / "chat_template.jinja"
        template.write_text(chat.chat_template or chat.tokenizer.chat_template, encoding="utf-8")
        base = load_model(
            source, dtype=m.dtype, device=m.device, device_map=m.device_map, trust_remote_code=m.trust_remote_code, chat_template=template
        )
    if base.d_model != chat.d_model or base.n_layers != chat.n_layers:
        raise RefusalError(
            f"--base {source} has {base.n_layers} layers of width {base.d_model}, the run's model {chat.n_layers} of {chat.d_model}; "
            "give the base model of the same architecture"
        )
    harmful = mean_activations(base, ctx.prompts.get("harmful", "train"), batch, "base: harmful activations")
    harmless = mean_activations(base, ctx.prompts.get("harmless", "train"), batch, "base: harmless activations")
    return compute_candidates(harmful, harmless, {"model": source})


# ---- the command ---------------------------------------------------------------------------------
def the_suffix(ctx: Context) -> tuple[list[int], list[int], str, dict | None]:
    """(suffix ids, random ids of the same length, where the suffix came from, attack.json or None)."""
    file = ctx.settings.analysis.suffix_file
    if file is not None:
        _, ids = read_suffix_file(ctx.chat, file)
        return ids, random_suffix(ctx.chat, len(ids), ctx.settings.data.seed), f"file {file}", None
    attack = fresh_attack(ctx)
    return attack["suffix_ids"], attack["random_suffix_ids"], "attack.json", attack


def refused_prompts(ctx: Context, attack: dict | None) -> dict:
    """Which harmful test prompts the model refuses without a suffix (the paper analyses those): attack.json's judged
    generations, else generated and judged here the same way. A one-line error when it refuses none."""
    test, e = ctx.prompts.get("harmful", "test"), ctx.settings.evaluation
    done = (attack or {}).get("completions", {}).get("none")
    if done is not None and [c.get("instruction") for c in done] == test:
        flags, judge = [bool(c.get("refused")) for c in done], "attack.json: substring judge on greedy generations without a suffix"
    else:
        phrases = refusal_phrases(e.refusal_phrases)
        with closing(make_engine(ctx.chat, ctx.settings, None, "analyze: which harmful test prompts are refused")) as engine:
            flags = judge_refusals(engine, [split_prompt(ctx.chat, x).ids for x in test], e.max_new_tokens, phrases).refused
        judge = "substring judge on greedy generations without a suffix"
    indices = [i for i, r in enumerate(flags) if r]
    if not indices:
        raise RefusalError(
            f"the model refuses none of the {len(test)} harmful test prompts (judged on its greedy generations); the analysis "
            "measures how a suffix suppresses refusal and needs refused prompts: use a model that refuses, or other --harmful prompts"
        )
    return {"indices": indices, "judge": judge}


def attack_rates(attack: dict | None) -> dict | None:
    """attack.json's held-out rates for the report: per condition the judged count, rate and interval, and the log-odds."""
    if attack is None:
        return None
    keys = ("refused", "total", "rate", "low", "high")
    return {
        "conditions": dict(CONDITIONS),
        "n_test": attack.get("n_test"),
        "refusal": {name: {k: attack["refusal"][name].get(k) for k in keys} for name in CONDITIONS if name in attack.get("refusal", {})},
        "refusal_score": {name: attack.get("refusal_score", {}).get(name) for name in CONDITIONS},
    }


def analyze(path: Path, options: dict) -> AnalyzeResult:
    """``refusal analyze --run RUN``: the mechanisms analysis, written to RUN/analysis.json and the run's report."""
    begin = time.perf_counter()
    run = RunDir.open(path)
    settings = run.settings
    for name, value in options.items():
        setattr(settings.analysis, name, value)
    settings.validate()
    if settings.analysis.suffix_file is None and not run.file("attack").is_file():
        raise RefusalError(f"{path} has no attack.json; run `refusal attack --out {path}` first, or pass --suffix-file FILE")
    ctx = reopen(path)
    ctx.settings = settings
    suffix, baseline, source, attack = the_suffix(ctx)  # a bad suffix fails here, before anything is written
    check_decomposable(ctx.chat)  # a mixture-of-experts model, and a --base of another shape, fail here too
    check_base(ctx)
    refused = refused_prompts(ctx, attack)  # so does a model that refuses none of the prompts
    cands = candidates(ctx)
    chosen, direction = selection(ctx)
    base_id = model_fingerprint(resolve_model(ctx.settings.analysis.base))["sha256"] if ctx.settings.analysis.base else None
    given: dict[str, Any] = {
        "suffix": suffix,
        "random": baseline,
        "base": base_id or ctx.settings.analysis.base,
        "refused": refused,
        "attack": attack_rates(attack),
    }

    def make(*_: object) -> dict:
        mechanisms = measure(ctx, cands, direction, suffix, baseline, base_candidates(ctx), refused)
        mechanisms["suffix"]["source"] = source
        mechanisms["attack"] = given["attack"]
        data = {"format_version": ARTIFACTS["analysis"].format_version, "mechanisms": mechanisms}
        write_json(run.file("analysis"), data)
        run.update(settings=settings.to_dict())  # the analysis options are kept once they worked (a bad --base changes nothing)
        return data

    mechanisms = ctx.get("analysis", make=make, **given)["mechanisms"]
    report = fresh_report(ctx)  # a stale report (another selection, model or test split) is made again, not patched
    if report is not None:
        report["mechanisms"] = mechanisms
        write_report(report, run.file("report"))
    else:  # with the run's export while it is made from this direction, as `refusal run` reports it
        exported = ctx.fresh("model", edit=Orthogonalization(direction.vector).describe(), source="selection")
        evaluate_run(ctx, cands, chosen, direction, edited=exported)
    ctx.timed("analyze_total", begin)
    return AnalyzeResult(ctx.run.path, mechanisms, ctx.run.info.get("timings", {}))
