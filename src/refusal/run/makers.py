"""How the run layer's artifacts are made and read back: the prompt lists, the candidates, the paper's selection,
the protected activations. Each maker computes, writes its files into the run directory and returns the value
``load`` returns; freshness, removal, recording and timing are the machinery's (``run.store``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..common.progress import log
from ..common.provenance import source_fingerprint, timestamp
from ..data.prompt_sets import Prompts, builtin_hash, dataset_hash, load_capability, resolve_source
from ..direction.cleaning import Protection, protect
from ..direction.selection import score_candidates, select_direction
from ..errors import RefusalError
from ..model.packaged import packaged_prompts
from ..residual.activations import mean_activations
from ..residual.directions import Candidates, Direction, compute_candidates
from ..settings import Settings
from .files import write_json
from .known import NO_GIVEN, Known, RunFiles, Workspace

PROMPTS_FORMAT = "1"
SELECTION_FORMAT = "1"


# ---- prompts ---------------------------------------------------------------------------------------------
def prompt_sources(settings: Settings) -> dict[str, str]:
    packaged = packaged_prompts(settings.model.model)
    return {kind: resolve_source(getattr(settings.data, kind), kind, packaged) for kind in ("harmful", "harmless")}


def source_identity(spec: str) -> str:
    return "builtin:" + builtin_hash() if spec == "builtin" else source_fingerprint(spec)


def prompt_inputs(known: Known, given: Mapping[str, Any]) -> dict:
    """The prompt sources' content hashes (the data settings are the rest)."""
    return {kind: source_identity(spec) for kind, spec in prompt_sources(known.settings).items()}


def make_prompts(ctx: Workspace, upstream: dict, fingerprint: str) -> Prompts:
    """RUN/prompts.json: the lists the run uses, so a resume or a re-evaluation reads no source again."""
    sources = prompt_sources(ctx.settings)
    write_json(ctx.run.file("prompts"), {"format_version": PROMPTS_FORMAT, "sources": sources, "prompts": ctx.prompts.lists})
    return ctx.prompts


def load_prompts(run: RunFiles) -> Prompts:
    lists = run.read("prompts").get("prompts")
    if not isinstance(lists, dict) or any(not isinstance(lists.get(k), dict) for k in ("harmful", "harmless")):
        raise RefusalError(f"{run.file('prompts')} has the wrong shape; delete it and re-run `refusal run --out {run.path}`")
    return Prompts(lists)


# ---- candidates ------------------------------------------------------------------------------------------
def candidate_inputs(known: Known, given: Mapping[str, Any]) -> dict:
    """The candidates' external inputs: the model's content hash and the train splits."""
    p = known.prompts
    return {"model": known.model_id, "harmful_train": p.hash("harmful", "train"), "harmless_train": p.hash("harmless", "train")}


def make_candidates(ctx: Workspace, upstream: dict, fingerprint: str) -> Candidates:
    """Difference-in-means candidates from the train splits."""
    chat, batch, inputs = ctx.chat, ctx.settings.evaluation.batch_size, candidate_inputs(ctx, {})
    log(f"post-instruction tokens: {chat.tokenizer.convert_ids_to_tokens(chat.post_instruction_ids)}")
    mean_harmful = mean_activations(chat, ctx.prompts.get("harmful", "train"), batch, "harmful activations")
    mean_harmless = mean_activations(chat, ctx.prompts.get("harmless", "train"), batch, "harmless activations")
    result = compute_candidates(
        mean_harmful,
        mean_harmless,
        {
            "created": timestamp(),
            "model": ctx.model_id,
            "harmful_train_sha256": inputs["harmful_train"],
            "harmless_train_sha256": inputs["harmless_train"],
            "rows": "decoder-layer inputs 0..n_layers-1, then the final residual",
            "positions": "negative offsets -n_post..-1",
        },
    )
    result.save(ctx.run.file("candidates"))
    return result


def load_candidates(run: RunFiles) -> Candidates:
    return Candidates.load(run.file("candidates"))


# ---- the paper's selection ---------------------------------------------------------------------------------
def validation_inputs(known: Known, given: Mapping[str, Any] = NO_GIVEN) -> dict:
    """What the paper's selection reads besides the candidates: the validation prompts' hashes."""
    return {"harmful_val": known.prompts.hash("harmful", "val"), "harmless_val": known.prompts.hash("harmless", "val")}


def make_selection(ctx: Workspace, upstream: dict, fingerprint: str) -> tuple[dict, Direction]:
    """The paper's selection: every candidate's scores (resumed from selection.partial.jsonl), the choice, its direction."""
    chat, s, run, cands = ctx.chat, ctx.settings, ctx.run, upstream["candidates"]
    partial = run.file("selection", 2)
    refusal_ids = chat.refusal_token_ids(s.evaluation.refusal_tokens)
    records = score_candidates(
        chat,
        cands,
        ctx.prompts.get("harmful", "val"),
        ctx.prompts.get("harmless", "val"),
        refusal_ids,
        s.selection,
        batch_size=s.evaluation.batch_size,
        cache_path=partial,
        cache_key=fingerprint,
    )
    chosen = select_direction(records)
    result = {
        "format_version": SELECTION_FORMAT,
        "created": timestamp(),
        "settings": s.to_dict()["selection"],
        "refusal_tokens": chat.tokenizer.convert_ids_to_tokens(refusal_ids),
        "chosen": chosen,
        "candidates": records,
    }
    direction = Direction(
        cands.direction(chosen["layer"], chosen["position"]),
        chosen["layer"],
        chosen["position"],
        {
            "model": ctx.model_id,
            "fallback": chosen["fallback"],
            "harmful_train_sha256": cands.metadata.get("harmful_train_sha256"),
            "harmless_train_sha256": cands.metadata.get("harmless_train_sha256"),
        },
    )
    write_json(run.file("selection"), result)
    direction.save(run.file("selection", 1))
    partial.unlink(missing_ok=True)
    log(
        f"chosen direction: layer {chosen['layer']}, position {chosen['position']} (bypass {chosen['bypass']:.3f}, induce {chosen['induce']:.3f}, "
        f"kl {chosen['kl']:.4f}){' [yellow]FALLBACK[/]' if chosen['fallback'] else ''}"
    )
    return result, direction


def load_selection(run: RunFiles) -> tuple[dict, Direction]:
    return run.read("selection"), Direction.load(run.file("selection", 1))


# ---- the search's protected activations ------------------------------------------------------------------------
def protected_prompts(known: Known) -> list[str]:
    """The prompts the search's directions are cleaned against: harmless train prompts, then the built-in code/math problems."""
    n = known.settings.search.protect_prompts
    return known.prompts.get("harmless", "train")[:n] + [item.prompt for item in load_capability("train")] if n else []


def protection_inputs(known: Known, given: Mapping[str, Any]) -> dict:
    return {"model": known.model_id, "protected": dataset_hash(protected_prompts(known))}


def make_protection(ctx: Workspace, upstream: dict, fingerprint: str) -> Protection:
    """The protected prompts' activations the search cleans its directions against."""
    prompts = protected_prompts(ctx)
    meta = {"created": timestamp(), "model": ctx.model_id, "protected_sha256": dataset_hash(prompts), "n_prompts": len(prompts)}
    result = protect(ctx.chat, prompts, ctx.settings.search.source_positions, ctx.settings.evaluation.batch_size, meta)
    result.save(ctx.run.file("protection"))
    return result


def load_protection(run: RunFiles) -> Protection:
    return Protection.load(run.file("protection"))
