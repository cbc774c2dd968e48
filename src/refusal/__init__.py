"""refusal: find, prove, edit and measure the refusal direction in open chat LLMs.

The public API mirrors the pipeline: load a model, compute candidate directions from harmful and
harmless instructions, select one, then ablate/add it with hooks or orthogonalize the weights and
export a checkpoint; evaluate an edit against the original; apply parametrised edits and revert them.
"""

__version__ = "0.1.0"

from .activations import collect_activations, mean_activations
from .data import load_builtin, load_prompts
from .directions import Candidates, Direction, compute_candidates
from .edits import Edit, Editor, EditParams, Kernel, KernelEdit, Orthogonalization, edited, orthogonalized
from .errors import FidelityError, RefusalError, UnsupportedModelError
from .evaluation import Condition, EvalSettings, evaluate
from .export import export_model, fidelity_check
from .generation import HFEngine, generate
from .interventions import ablate, add
from .judges import is_refusal
from .model import ChatModel, wrap_model
from .models import load_model
from .scoring import kl_divergence, refusal_score
from .selection import SelectionConfig, score_candidates, select_direction
from .weights import orthogonalize_weights

__all__ = [
    "Candidates",
    "ChatModel",
    "Condition",
    "Direction",
    "EditParams",
    "EvalSettings",
    "FidelityError",
    "HFEngine",
    "Kernel",
    "Edit",
    "Editor",
    "KernelEdit",
    "Orthogonalization",
    "edited",
    "evaluate",
    "RefusalError",
    "SelectionConfig",
    "UnsupportedModelError",
    "ablate",
    "add",
    "collect_activations",
    "compute_candidates",
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
    "score_candidates",
    "select_direction",
    "wrap_model",
]
