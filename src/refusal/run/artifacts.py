"""Every artifact of a run directory, declared once: its files, what it is made from, how it is made and read back.

An ``Artifact`` says which files it owns (the first proves it exists), its format version, the settings it depends
on (dotted paths into the settings tree), ``inputs`` (the content hashes of its external inputs: the model, prompt
splits, ...), ``upstream`` (the artifacts it is made from), ``make`` and ``load``. From these the machinery
(``run.store``; ``Context.get`` / ``Context.require``) fingerprints it, reuses it while fresh, remakes it when stale
and refuses it to readers otherwise. The makers of prompts, candidates, selection and protection are in
``run.makers``; search, model, report, attack, analysis, monitor, audit and harden are made by the commands above this
layer, which pass
their maker to ``Context.get``. A new artifact is one more declaration here.

``inputs`` and ``upstream`` take the run's ``Known`` (settings, prompts, model hash) and ``given``: what the caller
knows that the run does not (the edit an export applies, the attack's suffix, the search summary a report shows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..common.provenance import digest
from ..data.prompt_sets import dataset_hash, load_self_questions
from ..report.schema import FORMAT_VERSION as REPORT_FORMAT
from .known import NO_GIVEN, Known, RunFiles, Workspace
from .makers import (
    PROMPTS_FORMAT,
    SELECTION_FORMAT,
    candidate_inputs,
    load_candidates,
    load_prompts,
    load_protection,
    load_selection,
    make_candidates,
    make_prompts,
    make_protection,
    make_selection,
    prompt_inputs,
    protection_inputs,
    validation_inputs,
)

Given = Mapping[str, Any]
IsFresh = Callable[[str], bool]  # whether another artifact of the same run is fresh now


def _nothing(known: Known, given: Given) -> dict:
    return {}


def _none(known: Known, given: Given, fresh: IsFresh) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Artifact:
    name: str
    files: tuple[str, ...]  # relative to the run directory; the first is the one that proves the artifact exists
    stage: str  # the command that makes it
    format_version: str
    settings: tuple[str, ...]  # dotted paths into the settings tree: a group ("selection") or one setting ("evaluation.refusal_tokens")
    inputs: Callable[[Known, Given], dict] = _nothing  # its external inputs' content hashes
    upstream: Callable[[Known, Given, IsFresh], tuple[str, ...]] = _none  # the artifacts it is made from
    make: Callable[[Workspace, dict[str, Any], str], Any] | None = None  # (context, upstream values, fingerprint); None: the caller's
    load: Callable[[RunFiles], Any] | None = None  # None: the JSON of its first file
    command: str = "refusal run --out {run}"  # what makes it again (in the errors of commands that only read it)
    timing: str | None = ""  # its key in run.json's timings ("": the stage; None: the maker records its own)
    needs: tuple[str, ...] = ()  # the ``given`` keys its inputs read: as another's upstream it is checked by its record alone
    scratch: tuple[str, ...] = ()  # files its maker resumes from (they carry their own fingerprint): kept when it is remade
    resumable: bool = False  # recorded before it is made, and made on every get: it resumes from its own files (the study)
    noted: Callable[[dict, dict], dict] | None = None  # (inputs, upstream fingerprints) -> fields kept in its run.json record

    def read(self, run: RunFiles) -> Any:
        return self.load(run) if self.load is not None else run.read(self.name)


# ---- the inputs of the artifacts made above the run layer -------------------------------------------------------
def paper_upstream(fresh: IsFresh) -> tuple[str, ...]:
    """The study's first trial is the paper's selected direction where the run has a fresh selection."""
    return ("candidates", "selection") if fresh("selection") else ("candidates",)


def study_inputs(known: Known, given: Given = NO_GIVEN) -> dict:
    """What the study's trials read besides the upstream artifacts: the validation prompts, and the questions
    and harmless train prompts a second direction is made of."""
    p = known.prompts
    return {
        "harmful_val": p.hash("harmful", "val"),
        "harmless_val": p.hash("harmless", "val"),
        "harmless_train": p.hash("harmless", "train"),
        "self_questions": dataset_hash(load_self_questions()),
    }


def _study_upstream(known: Known, given: Given, fresh: IsFresh) -> tuple[str, ...]:
    """The paper trial's upstream, and the protected activations when the search cleans its directions."""
    return paper_upstream(fresh) + (("protection",) if known.settings.search.protect_prompts else ())


def report_inputs(known: Known, given: Given) -> dict:
    """The test splits and the search's summary (``given["search"]``) the report shows."""
    search = given.get("search")
    return {"test": [known.prompts.hash(k, "test") for k in ("harmful", "harmless")], "search": digest(search) if search else None}


def attack_inputs(known: Known, given: Given) -> dict:
    """The model, the held-out prompts and the two suffixes (``given``: suffix, random, source)."""
    return {"model": known.model_id, "harmful_test": known.prompts.hash("harmful", "test"), **{k: given[k] for k in ("suffix", "random", "source")}}


def analysis_inputs(known: Known, given: Given) -> dict:
    """The model, the test splits, the suffixes, the base model, the refused prompts and the attack's rates."""
    test = [known.prompts.hash(k, "test") for k in ("harmful", "harmless")]
    return {"model": known.model_id, "test": test, **{k: given[k] for k in ("suffix", "random", "base", "refused", "attack")}}


def harden_inputs(known: Known, given: Given) -> dict:
    """The model and every split it is trained, checkpointed and compared on."""
    p = known.prompts
    return {"model": known.model_id, **{f"{k}_{s}": p.hash(k, s) for k in ("harmful", "harmless") for s in ("train", "val", "test")}}


def monitor_inputs(known: Known, given: Given) -> dict:
    """The model, every split it is trained, calibrated and measured on, and the suffixes (``given["suffix"]``: the
    attack's, None without one; ``given["random"]``: the random suffix of the same length)."""
    p = known.prompts
    splits = {f"{k}_{s}": p.hash(k, s) for k in ("harmful", "harmless") for s in ("train", "val", "test")}
    return {"model": known.model_id, **splits, "suffix": given["suffix"], "random": given["random"]}


def audit_inputs(known: Known, given: Given) -> dict:
    """The model, the test splits it measures the search's choice on (``given["choice"]``: its trial and edit, None when
    the search is left out; the choice rule can change it without a new study), and the stages left out (``given["skip"]``)."""
    test = [known.prompts.hash(k, "test") for k in ("harmful", "harmless")]
    return {"model": known.model_id, "test": test, "skip": list(given["skip"]), "choice": given["choice"]}


def audit_upstream(known: Known, given: Given, fresh: IsFresh) -> tuple[str, ...]:
    """The direction and the report, and each stage not left out: the search, the attack, the monitor."""
    return ("selection", "report", *(s for s in ("search", "attack", "monitor") if s not in given["skip"]))


ARTIFACTS = {
    a.name: a
    for a in (
        Artifact(
            "prompts", ("prompts.json",), "extract", PROMPTS_FORMAT, ("data",), prompt_inputs, make=make_prompts, load=load_prompts, timing=None
        ),
        Artifact(
            "candidates",
            ("candidates.safetensors",),
            "extract",
            "1",
            ("model.dtype", "model.chat_template"),
            candidate_inputs,
            make=make_candidates,
            load=load_candidates,
        ),
        Artifact(
            "selection",
            ("selection.json", "direction.safetensors", "selection.partial.jsonl"),
            "select",
            SELECTION_FORMAT,
            ("selection", "evaluation.refusal_tokens"),
            validation_inputs,
            lambda known, given, fresh: ("candidates",),
            make=make_selection,
            load=load_selection,
            scratch=("selection.partial.jsonl",),
        ),
        # The study: what changes a trial's values (its stopping rule, confirmation and choice are redone on every call).
        Artifact(
            "search",
            ("search.json", "search.journal"),
            "search",
            "1",
            tuple(
                f"search.{k}"
                for k in (
                    "variants",
                    "refusal_measure",
                    "refusal_positions",
                    "refusal_floor",
                    "search_kl_tokens",
                    "source_positions",
                    "min_layer_fraction",
                    "max_layer_fraction",
                    "anchors",
                    "protect_prompts",
                    "score_prompts",
                )
            )
            + ("data.seed", "evaluation.refusal_tokens"),
            study_inputs,
            _study_upstream,
            command="refusal search --out {run}",
            timing=None,
            resumable=True,
        ),
        Artifact(
            "protection",
            ("protection.safetensors",),
            "search",
            "1",
            ("model.dtype", "model.chat_template", "search.source_positions"),
            protection_inputs,
            make=make_protection,
            load=load_protection,
            command="refusal search --out {run}",
            timing="protection",
        ),
        # The export's edit (``given["edit"]``: its description) of the selection or the search (``given["source"]``).
        Artifact(
            "model",
            ("model",),
            "export",
            "1",
            (),
            lambda known, given: {"edit": given["edit"]},
            lambda known, given, fresh: (given["source"],),
            load=lambda run: run.file("model"),
            needs=("edit", "source"),
        ),
        # Made from the upstream artifacts it shows (``given["upstream"]``: the selection, the search, the export).
        Artifact(
            "report",
            ("report",),
            "evaluate",
            REPORT_FORMAT,
            ("evaluation",),
            report_inputs,
            lambda known, given, fresh: tuple(given["upstream"]),
            needs=("search", "upstream"),
            timing=None,
        ),
        # The suffix's evaluation on held-out prompts; the optimisation resumes from attack.state.json (its own fingerprint).
        Artifact(
            "attack",
            ("attack.json", "attack.state.json"),
            "attack",
            "1",
            ("evaluation.max_new_tokens", "evaluation.refusal_phrases", "evaluation.refusal_tokens", "evaluation.batch_size", "data.seed"),
            attack_inputs,
            needs=("suffix", "random", "source"),
            command="refusal attack --out {run}",
            timing="attack_evaluation",
            scratch=("attack.state.json",),
        ),
        Artifact(
            "analysis",
            ("analysis.json",),
            "analyze",
            "1",
            ("analysis.base", "analysis.top_heads", "analysis.analysis_prompts", "evaluation.batch_size"),
            analysis_inputs,
            lambda known, given, fresh: ("candidates", "selection"),
            needs=("suffix", "random", "base", "refused", "attack"),
            command="refusal analyze --run {run}",
            noted=lambda inputs, ups: {"selection": ups["selection"], "test": inputs["test"]},
        ),
        # The monitor's directions, probe and thresholds (safetensors) and its figures on the test split (json).
        Artifact(
            "monitor",
            ("monitor.json", "monitor.safetensors"),
            "monitor",
            "1",
            ("data.seed", "model.dtype", "model.chat_template"),
            monitor_inputs,
            lambda known, given, fresh: ("selection", "attack") if given["suffix"] is not None else ("selection",),
            needs=("suffix", "random"),
            command="refusal monitor --run {run}",
            noted=lambda inputs, ups: {"selection": ups["selection"], "test": [inputs["harmful_test"], inputs["harmless_test"]]},
        ),
        # The hardening's merged LoRA (tensor deltas) and its comparison with the original; the training resumes from
        # harden.state.safetensors (its own fingerprint).
        Artifact(
            "harden",
            ("harden.json", "harden.safetensors", "harden.state.safetensors"),
            "harden",
            "1",
            ("harden", "data.seed", "model.dtype", "model.chat_template", "evaluation.refusal_tokens", "evaluation.refusal_phrases")
            + ("evaluation.capability_items", "evaluation.batch_size"),
            harden_inputs,
            lambda known, given, fresh: ("selection",),
            command="refusal harden --run {run} --out DIR",
            scratch=("harden.state.safetensors",),
        ),
        # The brittleness audit: read from the stages' artifacts, with the search's choice measured on the test split.
        Artifact(
            "audit",
            ("audit.json",),
            "audit",
            "1",
            ("evaluation",),
            audit_inputs,
            audit_upstream,
            needs=("skip", "choice"),
            command="refusal audit --out {run}",
        ),
    )
}
