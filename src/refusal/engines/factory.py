"""The one place an engine is chosen: transformers (``HFEngine``) or vLLM, and the forward passes beside them.

``make_engine`` decides what every command used to decide for itself: ``HFEngine`` with the evaluation's
``batch_size``, or ``VLLMEngine`` when ``--engine vllm`` is set and the model runs from a checkpoint on disk
(``path``: the original's directory, or an export). Hooked and in-place conditions pass no path, since vLLM
holds its own copy of the weights and would not see their edit. ``make_forward`` gives the forward-pass seam
(``forward.HFForward``) with the same batch size. Close an engine when done (``contextlib.closing``).
"""

from __future__ import annotations

from pathlib import Path

from ..model.chat import ChatModel
from ..settings import EvaluationSettings, Settings
from .forward import Forward, HFForward
from .hf import Engine, HFEngine
from .vllm import VLLMEngine


def make_engine(chat: ChatModel, settings: Settings | EvaluationSettings, path: str | Path | None = None, description: str = "generating") -> Engine:
    """``chat``'s generation engine: vLLM on the checkpoint at ``path`` with ``--engine vllm``, else transformers.

    Pass the whole tree when the engine may be vLLM: its dtype and seed come from the model and data groups
    (with the evaluation group alone they are "auto" and 0). ``VLLMEngine`` refuses a ``path`` that is not a
    checkpoint directory, and a machine without the vllm package, with one line each."""
    e = settings.evaluation if isinstance(settings, Settings) else settings
    if e.engine != "vllm" or path is None:
        return HFEngine(chat, e.batch_size, description=description)
    dtype, seed = (settings.model.dtype, settings.data.seed) if isinstance(settings, Settings) else ("auto", 0)
    return VLLMEngine(chat, path, e.tensor_parallel, e.vllm_memory, dtype, seed=seed)


def make_forward(chat: ChatModel, settings: Settings | EvaluationSettings) -> Forward:
    """``chat``'s forward passes (logits and residuals at chosen positions), batched by the evaluation's ``batch_size``."""
    e = settings.evaluation if isinstance(settings, Settings) else settings
    return HFForward(chat, e.batch_size)
