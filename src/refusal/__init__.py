"""refusal: find, prove, edit and measure the refusal direction in open chat LLMs.

The public API mirrors the pipeline: load a model, compute candidate directions from harmful and
harmless instructions, select one, then ablate/add it with hooks or apply an ``Edit`` to the weights
and export a checkpoint; evaluate conditions against the original. Whole commands are library
functions too: ``refusal.pipeline.run``, ``refusal.search_run.search``, ``refusal.attack_run.attack``
take a ``Settings`` tree and ``refusal.analyze.analyze`` a run directory. The paper's §5: optimise an
adversarial suffix (``optimize_suffix``) and measure what it does to the direction (``layer_cosines``,
``decompose``, ``attention_masses``) on prompts split into regions (``split_prompt``). Lower-damage
edits: directions ridge-cleaned against protected prompts' activations (``protect``, ``Protection``,
``EditParams(clean=...)``) and a capability proxy (``load_capability``, ``capability_loss``).
"""

__version__ = "0.1.0"

from .activations import collect_activations, mean_activations
from .attack import AttackState, optimize_suffix
from .cleaning import Protection, protect
from .data import load_builtin, load_capability, load_prompts
from .directions import Candidates, Direction, compute_candidates
from .edits import Edit, Editor, EditParams, Kernel, KernelEdit, Orthogonalization, edited, orthogonalized
from .errors import FidelityError, RefusalError, UnsupportedModelError
from .evaluation import Condition, EvalSettings, capability_loss, evaluate
from .export import export_model, fidelity_check
from .generation import Engine, HFEngine, generate
from .interventions import ablate, add
from .judges import is_refusal
from .mechanisms import Decomposition, attention_masses, decompose, layer_cosines, top_heads
from .model import ChatModel, wrap_model
from .models import load_model
from .scoring import kl_divergence, refusal_score
from .selection import score_candidates, select_direction
from .settings import Settings
from .suffix_scoring import Objective
from .suffixes import SuffixedPrompt, split_prompt
from .weights import orthogonalize_weights

__all__ = [
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
    "HFEngine",
    "Kernel",
    "KernelEdit",
    "Objective",
    "Orthogonalization",
    "Protection",
    "RefusalError",
    "Settings",
    "SuffixedPrompt",
    "UnsupportedModelError",
    "ablate",
    "add",
    "attention_masses",
    "capability_loss",
    "collect_activations",
    "compute_candidates",
    "decompose",
    "edited",
    "evaluate",
    "export_model",
    "fidelity_check",
    "generate",
    "is_refusal",
    "kl_divergence",
    "layer_cosines",
    "load_builtin",
    "load_capability",
    "load_model",
    "load_prompts",
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
