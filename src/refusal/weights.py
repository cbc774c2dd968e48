"""Weight orthogonalization: make the model unable to write the refusal direction, permanently.

For unit direction u, every matrix that writes into the residual stream becomes W - u u^T W
(the embeddings: E - E u u^T, row-wise), and every bias b becomes b - u u^T b. Computed in
float32 and cast back. This equals ``ablate`` exactly: nothing can add a component along u, so
every layer input and the final residual have none.

Tied embeddings are untied first: otherwise the unembedding would change too, and the edit would
no longer equal hooked ablation. ``orthogonalized`` applies the edit and reverts it bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .directions import unit_vector
from .model import ChatModel


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out] (y = x W + b)."""
    return type(module).__name__ == "Conv1D"


def _text_configs(model: nn.Module) -> list:
    config = model.config
    configs = [config]
    if hasattr(config, "get_text_config"):
        text = config.get_text_config()
        if text is not config:
            configs.append(text)
    return configs


def embeddings_tied(chat: ChatModel) -> bool:
    out = chat.model.get_output_embeddings()
    return out is not None and out.weight is chat.model.get_input_embeddings().weight


def untie_embeddings(chat: ChatModel) -> bool:
    """Give the unembedding its own copy of the tied matrix; True if they were tied."""
    if not embeddings_tied(chat):
        return False
    out = chat.model.get_output_embeddings()
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    for config in _text_configs(chat.model):
        config.tie_word_embeddings = False
    return True


def retie_embeddings(chat: ChatModel) -> None:
    out = chat.model.get_output_embeddings()
    out.weight = chat.model.get_input_embeddings().weight
    for config in _text_configs(chat.model):
        config.tie_word_embeddings = True


@torch.no_grad()
def orthogonalize_weights(chat: ChatModel, direction: torch.Tensor) -> None:
    """Edit the model in place so that it cannot write ``direction`` into its residual stream.

    Unties tied embeddings first (see module docstring). Use ``orthogonalized`` for a revertible edit.
    """
    unit = unit_vector(direction)
    untie_embeddings(chat)
    for embedding in chat.embeddings:
        w = embedding.weight
        w32 = w.float()
        u = unit.to(w.device)
        w.copy_((w32 - torch.outer(w32 @ u, u)).to(w.dtype))
    for writer in chat.writers:
        module = writer.module
        u = writer.direction(unit).to(module.weight.device)
        w32 = module.weight.float()
        if _is_conv1d(module):  # [in, out]
            edited = w32 - torch.outer(w32 @ u, u)
        else:  # nn.Linear [out, in]
            edited = w32 - torch.outer(u, u @ w32)
        module.weight.copy_(edited.to(module.weight.dtype))
        bias = getattr(module, "bias", None)
        if bias is not None:
            b32 = bias.float()
            bias.copy_((b32 - (b32 @ u) * u).to(bias.dtype))


def _edited_tensors(chat: ChatModel) -> list[torch.Tensor]:
    tensors = [e.weight for e in chat.embeddings]
    for writer in chat.writers:
        tensors.append(writer.module.weight)
        if getattr(writer.module, "bias", None) is not None:
            tensors.append(writer.module.bias)
    return tensors


@contextmanager
def orthogonalized(chat: ChatModel, direction: torch.Tensor) -> Iterator[None]:
    """Within the block the weights are orthogonalized; afterwards they are restored bit for bit."""
    tensors = _edited_tensors(chat)
    saved = [t.detach().clone() for t in tensors]
    was_tied = embeddings_tied(chat)
    try:
        orthogonalize_weights(chat, direction)
        yield
    finally:
        with torch.no_grad():
            for tensor, original in zip(tensors, saved):
                tensor.copy_(original)
        if was_tied:
            retie_embeddings(chat)
