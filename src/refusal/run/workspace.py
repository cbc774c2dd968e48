"""What every command starts with: validated settings, the loaded model, the run directory and its prompts.

``start`` validates everything before anything is written (settings, run directory, prompt files,
corpus, model, export target), then opens or creates the run directory; ``reopen`` loads an existing
run with its saved settings. The returned ``Context`` is what the commands (``commands.run``, ``commands.search``,
``commands.evaluate``) take.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint.export import check_overlap, check_target
from ..common.provenance import model_fingerprint
from ..data.prompt_sets import Prompts
from ..model.chat import ChatModel
from ..model.loading import load_skeleton
from ..model.packaged import load_model, resolve_model
from ..settings import EvaluationSettings, Settings
from . import store
from .directory import RunDir
from .known import Reading
from .lock import lock_run
from .makers import prompt_sources


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

    # ---- the run's artifacts (declared in run.artifacts) ------------------------------------------
    def get(self, name: str, make: store.Maker | None = None, remake: bool = False, **given: Any) -> Any:
        """Artifact ``name``: read back while fresh, else made (upstream first), recorded and timed. ``make``: the
        maker of an artifact made above the run layer; ``given``: the inputs the caller knows (``Artifact.needs``)."""
        return store.get(self, name, make, remake, given)

    def require(self, name: str, **given: Any) -> Any:
        """Artifact ``name`` for a command that only reads it: a one-line error if it is missing, stale or foreign."""
        return store.require(self.run, self, name, given)

    def fresh(self, name: str, **given: Any) -> bool:
        return store.is_fresh(self.run, self, name, given)

    def fingerprint(self, name: str, **given: Any) -> str:
        return store.fingerprint(self.run, self, name, given)


# ---- inputs ---------------------------------------------------------------------------------------
def run_prompts(run: RunDir | None, settings: Settings) -> Prompts:
    """The run's prompt lists: from RUN/prompts.json while its sources and data settings are unchanged,
    otherwise read (or fetched) from the sources."""
    if run is not None and store.is_fresh(run, Reading(settings, Prompts({})), "prompts"):
        return store.require(run, Reading(settings, Prompts({})), "prompts")
    caps = {"train": settings.data.n_train, "val": settings.data.n_val, "test": settings.data.n_test}
    return Prompts.load(prompt_sources(settings), settings.data.seed, caps)


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


Check = Callable[[ChatModel, Prompts], object]  # a command's own check of the loaded model and prompts, before any write


def start(
    settings: Settings,
    out: Path,
    overwrite: bool = False,
    export_to: Path | None = None,
    inherit: tuple[str, ...] = (),
    check: Check | None = None,
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
    identity, record = model_identity(chat, run)
    ctx = Context(run, settings, chat, prompts, identity)
    ctx.get("prompts")  # RUN/prompts.json, so a resume or a re-evaluation reads no source again
    run.update(datasets=prompts.summary(), model=record)
    return ctx


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
