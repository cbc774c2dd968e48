"""refusal: find, prove, edit and measure the refusal direction in open chat LLMs.

The public API mirrors the pipeline: load a model, compute candidate directions from harmful and
harmless instructions, select one, then ablate/add it with hooks or apply an ``Edit`` to the weights
and export a checkpoint; evaluate conditions against the original. Whole commands are library
functions too: ``refusal.commands.run.run``, ``refusal.commands.search.search`` and
``refusal.commands.attack.attack`` take a ``Settings`` tree and ``refusal.commands.analyze.analyze`` a
run directory. The paper's §5: optimise an adversarial suffix (``optimize_suffix``) and measure what it
does to the direction (``layer_cosines``, ``decompose``, ``attention_masses``) on prompts split into
regions (``split_prompt``). Lower-damage edits: directions ridge-cleaned against protected prompts'
activations (``protect``, ``Protection``, ``EditParams(clean=...)``) and a capability proxy
(``load_capability``, ``capability_loss``). A monitor that flags harmful requests from activations before
generation (``Monitor``, ``monitored``, ``fit_monitor``; ``auroc``). How brittle a model's refusal is, in one
call (``audit``, returning an ``AuditResult``; the summary from numbers alone: ``brittleness``). Hardening: a peft
LoRA trained in the model (``lora_attached``, ``Adapter``: its merge as ``LowRank`` tensor deltas), the command
``refusal.commands.harden.harden``.


Importing the package loads nothing heavy: each name is imported from its module on first use, so
``import refusal`` and ``refusal --version`` never load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name and the module (below refusal) that defines it.
_API = {
    "ablate": "residual.interventions",
    "add": "residual.interventions",
    "Added": "edit.deltas",
    "AttackState": "attack.gcg",
    "attention_masses": "measure.mechanisms",
    "Candidates": "residual.directions",
    "capability_loss": "measure.evaluation",
    "ChatModel": "model.chat",
    "collect_activations": "residual.activations",
    "compute_candidates": "residual.directions",
    "Condition": "measure.evaluation",
    "decompose": "measure.mechanisms",
    "Decomposition": "measure.mechanisms",
    "Direction": "residual.directions",
    "Edit": "edit.edits",
    "edit_from_dict": "edit.described",
    "edited": "edit.edits",
    "Editor": "edit.edits",
    "EditParams": "edit.edits",
    "Engine": "engines.hf",
    "EvalSettings": "measure.evaluation",
    "evaluate": "measure.evaluation",
    "export_model": "checkpoint.export",
    "fidelity_check": "checkpoint.export",
    "FidelityError": "errors",
    "Forward": "engines.forward",
    "generate": "engines.hf",
    "HFEngine": "engines.hf",
    "HFForward": "engines.forward",
    "is_refusal": "measure.judges",
    "Kernel": "edit.edits",
    "Monitor": "measure.monitor",
    "monitored": "measure.monitor",
    "fit_monitor": "measure.monitor",
    "auroc": "measure.detection",
    "audit": "commands.audit",
    "AuditResult": "commands.audit",
    "brittleness": "measure.brittleness",
    "KernelEdit": "edit.edits",
    "kl_divergence": "residual.scoring",
    "layer_cosines": "measure.mechanisms",
    "load_builtin": "data.prompt_sets",
    "LowRank": "edit.deltas",
    "lora_attached": "harden.lora",
    "Adapter": "harden.lora",
    "load_capability": "data.prompt_sets",
    "load_model": "model.packaged",
    "load_prompts": "data.prompt_sets",
    "make_engine": "engines.factory",
    "make_forward": "engines.factory",
    "mean_activations": "residual.activations",
    "Objective": "attack.suffix_scoring",
    "optimize_suffix": "attack.gcg",
    "Orthogonalization": "edit.edits",
    "orthogonalize_weights": "edit.weights",
    "orthogonalized": "edit.edits",
    "protect": "direction.cleaning",
    "Protection": "direction.cleaning",
    "refusal_score": "residual.scoring",
    "RefusalError": "errors",
    "score_candidates": "direction.selection",
    "select_direction": "direction.selection",
    "Settings": "settings",
    "split_prompt": "data.suffixes",
    "SuffixedPrompt": "data.suffixes",
    "TensorDeltas": "edit.tensor_deltas",
    "top_heads": "measure.mechanisms",
    "UnsupportedModelError": "errors",
    "wrap_model": "model.chat",
}

__all__ = [
    "Adapter",
    "Added",
    "AttackState",
    "Candidates",
    "ChatModel",
    "Condition",
    "Decomposition",
    "Direction",
    "Edit",
    "EditParams",
    "Editor",
    "Engine",
    "EvalSettings",
    "FidelityError",
    "Forward",
    "HFEngine",
    "HFForward",
    "Kernel",
    "KernelEdit",
    "LowRank",
    "Monitor",
    "Objective",
    "Orthogonalization",
    "Protection",
    "RefusalError",
    "Settings",
    "SuffixedPrompt",
    "TensorDeltas",
    "UnsupportedModelError",
    "ablate",
    "add",
    "attention_masses",
    "capability_loss",
    "collect_activations",
    "compute_candidates",
    "decompose",
    "edit_from_dict",
    "edited",
    "evaluate",
    "export_model",
    "fidelity_check",
    "generate",
    "is_refusal",
    "kl_divergence",
    "layer_cosines",
    "monitored",
    "fit_monitor",
    "auroc",
    "audit",
    "AuditResult",
    "brittleness",
    "load_builtin",
    "load_capability",
    "load_model",
    "load_prompts",
    "lora_attached",
    "make_engine",
    "make_forward",
    "mean_activations",
    "optimize_suffix",
    "orthogonalize_weights",
    "orthogonalized",
    "protect",
    "refusal_score",
    "score_candidates",
    "select_direction",
    "split_prompt",
    "top_heads",
    "wrap_model",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for (PEP 562)."""
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # the same names, for type checkers and editors
    from .attack.gcg import AttackState, optimize_suffix
    from .attack.suffix_scoring import Objective
    from .checkpoint.export import export_model, fidelity_check
    from .commands.audit import AuditResult, audit
    from .data.prompt_sets import load_builtin, load_capability, load_prompts
    from .data.suffixes import SuffixedPrompt, split_prompt
    from .direction.cleaning import Protection, protect
    from .direction.selection import score_candidates, select_direction
    from .edit.deltas import Added, LowRank
    from .edit.described import edit_from_dict
    from .edit.edits import Edit, Editor, EditParams, Kernel, KernelEdit, Orthogonalization, edited, orthogonalized
    from .edit.tensor_deltas import TensorDeltas
    from .edit.weights import orthogonalize_weights
    from .engines.factory import make_engine, make_forward
    from .engines.forward import Forward, HFForward
    from .engines.hf import Engine, HFEngine, generate
    from .errors import FidelityError, RefusalError, UnsupportedModelError
    from .harden.lora import Adapter, lora_attached
    from .measure.brittleness import brittleness
    from .measure.detection import auroc
    from .measure.evaluation import Condition, EvalSettings, capability_loss, evaluate
    from .measure.judges import is_refusal
    from .measure.mechanisms import Decomposition, attention_masses, decompose, layer_cosines, top_heads
    from .measure.monitor import Monitor, fit_monitor, monitored
    from .model.chat import ChatModel, wrap_model
    from .model.packaged import load_model
    from .residual.activations import collect_activations, mean_activations
    from .residual.directions import Candidates, Direction, compute_candidates
    from .residual.interventions import ablate, add
    from .residual.scoring import kl_divergence, refusal_score
    from .settings import Settings
