"""What the hardening learns from: the original model's own responses to the run's train prompts.

    harmful train prompts   -> greedy completions, kept where the substring judge calls them refusals: the
                               refusals the adapter must keep giving with the direction erased
    harmless train prompts  -> greedy completions: the behaviour the KL term keeps

Self-distillation needs no refusal texts from elsewhere, and keeps the model's own refusal style.
"""

from __future__ import annotations

from ..engines.hf import Engine
from ..errors import RefusalError
from ..measure.judges import is_refusal
from ..model.chat import ChatModel
from .training import Example, TrainingData


def own_responses(engine: Engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """The model's greedy responses (ids, cut after EOS), at least one token each."""
    return [ids or [0] for ids in engine.generate_ids(prompts, tokens)]


def training_data(
    chat: ChatModel,
    engine: Engine,
    prompts: dict[str, dict[str, list[str]]],
    tokens: int,
    phrases: tuple[str, ...],
) -> tuple[TrainingData, dict]:
    """The examples and validation prompts from ``prompts[kind][split]``, and a summary (counts, one sample each)."""
    encode = lambda texts: [chat.encode(x) for x in texts]  # noqa: E731
    harmful, harmless = encode(prompts["harmful"]["train"]), encode(prompts["harmless"]["train"])
    refusals = own_responses(engine, harmful, tokens)
    texts = engine.decode(refusals)
    kept = [Example(p, r) for p, r, t in zip(harmful, refusals, texts) if is_refusal(t, phrases)]
    if not kept:
        raise RefusalError(
            f"the model refuses none of the {len(harmful)} harmful train prompts (substring judge, {tokens} tokens): "
            "there is no refusal to harden; check --refusal-phrases or the model"
        )
    completions = own_responses(engine, harmless, tokens)
    data = TrainingData(
        harmful=kept,
        harmless=[Example(p, c) for p, c in zip(harmless, completions)],
        val_harmful=encode(prompts["harmful"]["val"]),
        val_harmless=encode(prompts["harmless"]["val"]),
    )
    summary = {
        "harmful_train": len(harmful),
        "refused_train": len(kept),
        "harmless_train": len(harmless),
        "val": {"harmful": len(data.val_harmful), "harmless": len(data.val_harmless)},
        "response_tokens": tokens,
        "sample_refusal": next(t for t, p in zip(texts, harmful) if is_refusal(t, phrases)),
    }
    return data, summary
