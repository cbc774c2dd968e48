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
        project_out(embedding.weight, unit, 1.0, vectors_are_rows=True)
    for writer in chat.writers:
        module = writer.module
        u = writer.direction(unit).to(module.weight.device)
        project_out(module.weight, u, 1.0, vectors_are_rows=_is_conv1d(module))  # Conv1D [in, out]; Linear [out, in]
        if getattr(module, "bias", None) is not None:
            project_out_bias(module.bias, u, 1.0)


@torch.no_grad()
def project_out(matrix: torch.Tensor, u: torch.Tensor, strength: float, vectors_are_rows: bool, norms: torch.Tensor | None = None) -> None:
    """In place: every vector ``matrix`` writes into the residual stream (its rows if
    ``vectors_are_rows``, else its columns) loses ``strength`` times its component along unit u,
    then, if ``norms`` is given, is rescaled to that norm. Float32 in place (a rank-1 update, no
    copy of the matrix); other dtypes through a float32 copy."""
    m = matrix if matrix.dtype == torch.float32 else matrix.float()
    u = u.to(m.device, torch.float32)
    if vectors_are_rows:  # [n, d_model]
        m.addr_(m @ u, u, alpha=-strength)
    else:  # [d_model, n]
        m.addr_(u, u @ m, alpha=-strength)
    if norms is not None:
        dim = 1 if vectors_are_rows else 0
        m.mul_((norms.to(m.device) / m.norm(dim=dim).clamp_min(1e-12)).unsqueeze(dim))
    if m is not matrix:
        matrix.copy_(m.to(matrix.dtype))


@torch.no_grad()
def project_out_bias(bias: torch.Tensor, u: torch.Tensor, strength: float) -> None:
    """In place: b <- b - strength * (b . u) u, computed in float32."""
    b32 = bias.float()
    u = u.to(b32.device, torch.float32)
    bias.copy_((b32 - strength * (b32 @ u) * u).to(bias.dtype))


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
