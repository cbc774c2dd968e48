"""refusal: find, prove, edit and measure the refusal direction in open chat LLMs.

The public API mirrors the pipeline: load a model, compute candidate directions from harmful and
harmless instructions, select one, then ablate/add it with hooks or apply an ``Edit`` to the weights
and export a checkpoint; evaluate conditions against the original. Whole commands are library
functions too: ``refusal.pipeline.run`` and ``refusal.search_run.search`` take a ``Settings`` tree.
"""

__version__ = "0.1.0"

from .activations import collect_activations, mean_activations
from .data import load_builtin, load_prompts
from .directions import Candidates, Direction, compute_candidates
from .edits import Edit, Editor, EditParams, Kernel, KernelEdit, Orthogonalization, edited, orthogonalized
from .errors import FidelityError, RefusalError, UnsupportedModelError
from .evaluation import Condition, EvalSettings, evaluate
from .export import export_model, fidelity_check
from .generation import Engine, HFEngine, generate
from .interventions import ablate, add
from .judges import is_refusal
from .model import ChatModel, wrap_model
from .models import load_model
from .scoring import kl_divergence, refusal_score
from .selection import score_candidates, select_direction
from .settings import Settings
from .weights import orthogonalize_weights

__all__ = [
    "Candidates",
    "ChatModel",
    "Condition",
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
    "Orthogonalization",
    "RefusalError",
    "Settings",
    "UnsupportedModelError",
    "ablate",
    "add",
    "collect_activations",
    "compute_candidates",
    "edited",
    "evaluate",
    "export_model",
    "fidelity_check",
    "generate",
    "is_refusal",
    "kl_divergence",
    "load_builtin",
    "load_model",
    "load_prompts",
    "mean_activations",
    "orthogonalize_weights",
    "orthogonalized",
    "refusal_score",
    "run",
    "score_candidates",
    "search",
    "select_direction",
    "wrap_model",
]
