"""Choose one direction among the candidates, as in the paper (Arditi et al., 2024, section 2.3).

Each candidate r[l, p] gets three scores on validation prompts:
- bypass: mean refusal score on harmful prompts with r ablated everywhere (lower is better);
- induce: mean refusal score on harmless prompts with r added at layer l (must be > threshold);
- kl: mean KL(original || ablated) of the last-position next-token distribution on harmless prompts.
Candidates in the last ``prune_layer_fraction`` of layers, with kl above ``kl_threshold`` or induce
below ``induce_threshold`` are filtered; the lowest bypass among the rest wins. If none pass, the
lowest-bypass candidate outside the pruned layers is chosen and marked as a fallback.

Speed (``scoring.LastPosition``; the scores are those of full passes, up to float rounding): the chat
template's common prefix runs once per hooked pass and every batch continues its cache; prompts are
batched by length to cut padding (bypass and kl share one ablated pass over both prompt sets); and
induce replays the original model's outputs of the layers before l (recorded once with the kl
baseline) instead of running them. A candidate so costs less than with full passes, for the same scores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..common.progress import log, track
from ..errors import RefusalError
from ..model.chat import ChatModel
from ..residual.directions import Candidates
from ..residual.interventions import ablate, add
from ..residual.scoring import LastPosition, kl_divergence, refusal_score
from ..settings import SelectionSettings


def max_layer(n_layers: int, prune_layer_fraction: float) -> int:
    """First layer index that is pruned (the paper drops the last 20% of layers)."""
    return n_layers - int(n_layers * prune_layer_fraction)


def score_candidates(
    chat: ChatModel,
    candidates: Candidates,
    harmful_val: list[str],
    harmless_val: list[str],
    refusal_ids: list[int],
    config: SelectionSettings,
    batch_size: int = 32,
    cache_path: Path | None = None,
    cache_key: str | None = None,
) -> list[dict]:
    """Bypass, induce and KL for every requested candidate; one record per (layer, position).

    With ``cache_path``, each finished candidate is appended there with ``cache_key`` (the fingerprint of
    everything the scores depend on), and a rerun with the same key skips them (so an interrupted
    selection resumes where it stopped); lines with another key are ignored.
    """
    config.validate(candidates.n_layers, candidates.n_post)
    first_pruned = max_layer(candidates.n_layers, config.prune_layer_fraction)
    layers = config.layers if config.layers is not None else list(range(candidates.n_layers))
    positions = config.positions if config.positions is not None else list(range(-candidates.n_post, 0))

    fingerprint = cache_key or json.dumps([candidates.metadata.get("created"), harmful_val, harmless_val, refusal_ids], sort_keys=True)
    done = _read_cache(cache_path, fingerprint)

    records: list[dict[str, Any]] = []
    todo: list[dict[str, Any]] = []
    for layer in layers:
        for position in positions:
            record: dict[str, Any] = {"layer": layer, "position": position, "bypass": None, "induce": None, "kl": None, "filtered": []}
            norm = candidates.direction(layer, position).norm().item()
            record["norm"] = norm
            if layer >= first_pruned:
                record["filtered"].append(f"layer in the last {config.prune_layer_fraction:.0%} of layers (not scored)")
            elif norm < 1e-6:
                record["filtered"].append("zero direction: harmful and harmless means coincide (not scored)")
            elif (layer, position) in done:
                record.update(done[(layer, position)])
            else:
                todo.append(record)
            records.append(record)

    if todo:  # both ablated passes share their batches and prefix; induce replays the layers before l
        both, harmless = LastPosition(chat, harmful_val + harmless_val, batch_size), LastPosition(chat, harmless_val, batch_size)
        baseline_harmless = harmless.record(max(r["layer"] for r in todo))
    for record in track(todo, "scoring candidates"):
        direction = candidates.direction(record["layer"], record["position"])
        with ablate(chat, direction):
            ablated = both.logits()
            bypass = refusal_score(ablated[: len(harmful_val)], refusal_ids)
            kl = kl_divergence(baseline_harmless, ablated[len(harmful_val) :])
        with add(chat, direction, record["layer"]):
            induce = refusal_score(harmless.logits(start=record["layer"]), refusal_ids)
        record.update(bypass=bypass.mean().item(), induce=induce.mean().item(), kl=kl.mean().item())
        _append_cache(cache_path, fingerprint, record)

    for record in records:
        if record["bypass"] is None:
            continue
        values = (record["bypass"], record["induce"], record["kl"])
        if not all(math.isfinite(v) for v in values):
            record["filtered"].append("a score is NaN/inf")
            continue
        if record["kl"] > config.kl_threshold:
            record["filtered"].append(f"kl {record['kl']:.4f} > {config.kl_threshold}")
        if record["induce"] < config.induce_threshold:
            record["filtered"].append(f"induce {record['induce']:.3f} < {config.induce_threshold}")
    return records


def select_direction(records: list[dict]) -> dict:
    """The chosen candidate from scored records: {layer, position, bypass, induce, kl, fallback, reason}."""
    passing = [r for r in records if r["bypass"] is not None and not r["filtered"]]
    if passing:
        best = min(passing, key=lambda r: (r["bypass"], r["layer"], r["position"]))
        return {**_public(best), "fallback": False, "reason": f"lowest bypass score among {len(passing)} candidate(s) passing the filters"}
    scored = [r for r in records if r["bypass"] is not None and math.isfinite(r["bypass"]) and not any("NaN" in f for f in r["filtered"])]
    if not scored:
        raise RefusalError("no candidate could be scored; widen --layers/--positions or lower --prune-layer-fraction")
    best = min(scored, key=lambda r: (r["bypass"], r["layer"], r["position"]))
    reason = (
        f"FALLBACK: none of {len(scored)} scored candidates passed the KL and induce filters; "
        "chose the lowest bypass score regardless (loosen --kl-threshold / --induce-threshold to change this)"
    )
    log(f"[yellow]warning:[/] {reason}")
    return {**_public(best), "fallback": True, "reason": reason}


def _public(record: dict) -> dict:
    return {k: record[k] for k in ("layer", "position", "bypass", "induce", "kl")}


def _read_cache(path: Path | None, fingerprint: str) -> dict:
    if path is None or not path.exists():
        return {}
    done = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if entry.get("fingerprint") == fingerprint:
            done[(entry["layer"], entry["position"])] = {k: entry[k] for k in ("bypass", "induce", "kl")}
    if done:
        log(f"resuming selection: {len(done)} candidate(s) already scored")
    return done


def _append_cache(path: Path | None, fingerprint: str, record: dict) -> None:
    if path is None:
        return
    entry = {"fingerprint": fingerprint, **_public(record)}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
