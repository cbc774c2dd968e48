"""``refusal generate``: greedy completions of a few prompts, with a run's direction ablated or added by hooks.

The run's model is used (``run.given.run_model``) and its direction only while fresh, both checked before any
model is loaded; the prompts with ``max_new_tokens`` must fit the model's context. The engine is the
evaluation group's (``--batch-size``, ``--engine``): vLLM serves the model without hooks only.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, closing, nullcontext
from pathlib import Path

from ..common.progress import log
from ..engines.factory import make_engine
from ..errors import RefusalError
from ..residual.interventions import ABLATION_FORMS, ablate, add
from ..run.directory import RunDir
from ..run.given import fresh_direction, run_model
from ..run.workspace import load
from ..settings import Settings


def generate_completions(
    settings: Settings,
    prompts: list[str],
    ablate_run: Path | None = None,
    add_run: Path | None = None,
    model_options: dict | None = None,
    ablation_form: str = "writers",
) -> list[str]:
    """``refusal generate``: greedy completions, with a run's direction ablated (in ``ablation_form``) or added (hooks) if asked (the run's
    model unless ``model_options``, the model options given on the command line, name the same one). The tree gives the
    tokens generated (``evaluation.max_new_tokens``) and the scale of an added direction (``hooks.coeff``)."""
    max_new_tokens, coeff = settings.evaluation.max_new_tokens, settings.hooks.coeff
    if ablation_form not in ABLATION_FORMS:
        raise RefusalError(f"unknown ablation form {ablation_form!r}; choose one of {', '.join(ABLATION_FORMS)}")
    if not 1 <= max_new_tokens <= 4096:
        raise RefusalError(f"--max-new-tokens must be between 1 and 4096 (got {max_new_tokens})")
    settings.hooks.validate()
    settings.evaluation.validate()
    direction = None
    if ablate_run or add_run:  # the run's model (or the same one), and its direction while fresh: before anything is loaded
        run = RunDir.open(ablate_run or add_run)  # type: ignore[arg-type]
        direction = fresh_direction(run, run_model(settings, run, model_options, "--ablate" if ablate_run else "--add"))
    chat = load(settings)
    if chat.max_positions is not None and max_new_tokens > chat.max_positions:
        raise RefusalError(f"--max-new-tokens {max_new_tokens} is more than the model's context of {chat.max_positions} tokens")
    chat.check_context(prompts, max_new_tokens)
    if direction is not None and direction.vector.shape[-1] != chat.d_model:
        raise RefusalError(
            f"the direction of {ablate_run or add_run} has {direction.vector.shape[-1]} numbers, the model {chat.d_model}; give a run of this model"
        )
    context: AbstractContextManager = nullcontext()
    if direction is not None:
        context = ablate(chat, direction.vector, ablation_form) if ablate_run else add(chat, direction.vector, direction.layer, coeff)
    path = chat.path if direction is None else None  # hooks: transformers (vLLM would not run them)
    if path is None and settings.evaluation.engine == "vllm":
        log("--engine vllm serves a checkpoint as it is; with --ablate or --add (hooks) transformers generates")
    with closing(make_engine(chat, settings, path)) as engine, context:
        return engine.generate(prompts, max_new_tokens)
