"""What every command starts with: validated settings, the loaded model, the run directory and its prompts.

``start`` validates everything before anything is written (settings, run directory, prompt files,
corpus, model, export target), then opens or creates the run directory; ``reopen`` loads an existing
run with its saved settings. The returned ``Context`` is what the stages (``pipeline``, ``search_run``,
``assess``) take.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.export import check_overlap, check_target
from ..common.provenance import model_fingerprint, source_fingerprint
from ..data.prompt_sets import Prompts, builtin_hash, resolve_source
from ..errors import RefusalError
from ..model.chat import ChatModel
from ..model.loading import load_skeleton
from ..model.packaged import load_model, packaged_prompts, resolve_model
from ..settings import EvaluationSettings, Settings
from .directory import ARTIFACTS, RunDir, write_json
from .lock import lock_run


@dataclass
class Context:
    """What every stage of one command needs: the run directory, the settings, the model, the prompts."""

    run: RunDir
    settings: Settings
    chat: ChatModel
    prompts: Prompts
    model_id: str  # the model's content hash (a hub id where there is no local file)
    timings: dict = field(default_factory=dict)

    def timed(self, stage: str, start: float) -> None:
        self.timings[stage] = round(time.perf_counter() - start, 2)
        self.run.record_time(stage, time.perf_counter() - start)


# ---- inputs ---------------------------------------------------------------------------------------
def prompt_sources(settings: Settings) -> dict[str, str]:
    packaged = packaged_prompts(settings.model.model)
    return {kind: resolve_source(getattr(settings.data, kind), kind, packaged) for kind in ("harmful", "harmless")}


def _source_identity(spec: str) -> str:
    return "builtin:" + builtin_hash() if spec == "builtin" else source_fingerprint(spec)


def run_prompts(run: RunDir | None, settings: Settings) -> Prompts:
    """The run's prompt lists: from RUN/prompts.json while its sources and data settings are unchanged,
    otherwise read (or fetched) from the sources."""
    sources = prompt_sources(settings)
    if run is not None and run.fresh("prompts", settings, _prompt_inputs(sources)):
        return Prompts(_read_prompts(run))
    caps = {"train": settings.data.n_train, "val": settings.data.n_val, "test": settings.data.n_test}
    return Prompts.load(sources, settings.data.seed, caps)


def save_prompts(run: RunDir, settings: Settings, prompts: Prompts) -> None:
    """Write RUN/prompts.json (unless it is fresh), so a resume or a re-evaluation reads no source again."""
    sources = prompt_sources(settings)
    inputs = _prompt_inputs(sources)
    if not run.fresh("prompts", settings, inputs):
        write_json(run.file("prompts"), {"format_version": ARTIFACTS["prompts"].format_version, "sources": sources, "prompts": prompts.lists})
        run.record("prompts", settings, inputs)
    run.update(datasets=prompts.summary())


def validation_inputs(prompts: Prompts) -> dict:
    """What the paper's selection reads besides the candidates: the validation prompts' hashes."""
    return {"harmful_val": prompts.hash("harmful", "val"), "harmless_val": prompts.hash("harmless", "val")}


def _prompt_inputs(sources: dict[str, str]) -> dict:
    return {kind: _source_identity(spec) for kind, spec in sources.items()}


def _read_prompts(run: RunDir) -> dict:
    data = run.read("prompts")
    lists = data.get("prompts")
    if not isinstance(lists, dict) or any(not isinstance(lists.get(k), dict) for k in ("harmful", "harmless")):
        raise RefusalError(f"{run.file('prompts')} has the wrong shape; delete it and re-run `refusal run --out {run.path}`")
    return lists


def model_identity(chat: ChatModel, run: RunDir | None) -> tuple[str, dict]:
    """(content hash or hub id, the run.json "model" record) of the loaded model."""
    known = run.info.get("model", {}).get("fingerprint") if run is not None else None
    fingerprint = model_fingerprint(chat.path, known)
    identity = fingerprint["sha256"] or chat.path
    record = {
        "source": chat.source,
        "path": chat.path,
        "sha256": fingerprint["sha256"],
        "fingerprint": fingerprint,
        "class": type(chat.model).__name__,
        "dtype": str(chat.dtype).replace("torch.", ""),
        "n_layers": chat.n_layers,
        "d_model": chat.d_model,
        "post_instruction_tokens": chat.tokenizer.convert_ids_to_tokens(chat.post_instruction_ids),
    }
    return identity, record


def start(
    settings: Settings,
    out: Path,
    overwrite: bool = False,
    export_to: Path | None = None,
    inherit: tuple[str, ...] = (),
    check: Callable[[ChatModel, Prompts], object] | None = None,
) -> Context:
    """Validate everything (settings, run directory, prompts, corpus, model, export target, and ``check(model, prompts)``,
    e.g. a suffix file) before anything is written; then open or create the run directory. The settings groups
    in ``inherit`` (those the command does not take, e.g. the selection for `refusal search`) are kept from a
    run being resumed."""
    settings.validate()
    RunDir.check_target(out, overwrite)
    if (Path(out) / "run.json").is_file():
        lock_run(out)  # another process writing this run: one line now, before any work
    existing = RunDir(out) if (Path(out) / "run.json").is_file() and not overwrite else None
    for group in inherit if existing is not None else ():
        setattr(settings, group, getattr(existing.settings, group))  # type: ignore[union-attr]
    prompts = run_prompts(existing, settings)  # bad prompt files fail here, before anything is written
    if settings.evaluation.ce_tokens > 0:
        from ..data.prompt_sets import load_corpus

        load_corpus(settings.evaluation.corpus)
    if settings.evaluation.refusal_phrases:
        from ..measure.judges import load_phrases

        load_phrases(settings.evaluation.refusal_phrases)
    chat = load(settings)
    settings.selection.validate(chat.n_layers, chat.n_post)
    chat.refusal_token_ids(settings.evaluation.refusal_tokens)
    check_overlap(out, chat.path, "run directory")  # run files never go into the model's own directory
    if export_to is not None:
        check_target(export_to, chat.path, overwrite=True)
    check_prompt_context(chat, prompts, settings.evaluation)
    if check is not None:
        check(chat, prompts)
    lock_run(out)
    run = RunDir.create(out, settings, overwrite)
    save_prompts(run, settings, prompts)
    identity, record = model_identity(chat, run)
    run.update(model=record)
    return Context(run, settings, chat, prompts, identity)


def check_prompt_context(chat: ChatModel, prompts: Prompts, e: EvaluationSettings, splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    """Every prompt fits the model's context: the train prompts as they are, the validation and test prompts (which
    are generated from: completions and the KL's greedy tokens) with ``--max-new-tokens`` or ``--kl-tokens`` more."""
    new_tokens, name = max((e.max_new_tokens, "--max-new-tokens"), (e.kl_tokens, "--kl-tokens"))
    for split in splits:
        both = [*prompts.get("harmful", split), *prompts.get("harmless", split)]
        chat.check_context(both, 0 if split == "train" else new_tokens, new_name=name)


def load(settings: Settings) -> ChatModel:
    m = settings.model
    return load_model(
        m.model, dtype=m.dtype, device=m.device, device_map=m.device_map, trust_remote_code=m.trust_remote_code, chat_template=m.chat_template
    )


def reopen(path: Path, weights: bool = True) -> Context:
    """An existing run with its saved settings, for commands that read it (select, export, search --run);
    ``weights=False`` opens the model's structure only (``loading.load_skeleton``), for the streamed export."""
    run = RunDir.open(path)
    lock_run(path)  # the commands that reopen a run write to it (select, export, analyze)
    settings = run.settings
    m = settings.model
    location = run.info.get("model", {}).get("path") or resolve_model(m.model)  # where the run found it (a hub snapshot too)
    chat = load(settings) if weights else load_skeleton(location, m.trust_remote_code, m.chat_template, m.model)
    prompts = run_prompts(run, settings)
    identity, record = model_identity(chat, run)
    return Context(run, settings, chat, prompts, identity)


def default_run_path(model: str, suffix: str = "") -> Path:
    """runs/<model name><suffix>: where `refusal run` (suffix '') and `refusal search` ('-search') write without --out."""
    return Path("runs") / ((Path(model.rstrip("/")).name.replace(".", "-") or "model") + suffix)
