"""Activation-space interventions as context managers that always remove their hooks.

``ablate`` erases a direction from the residual stream: projected out of every decoder layer's
input and out of every attention and MLP output (``projection.project_out``), in one of two forms that
differ only on post-norm layers (Gemma 2/3, OLMo 2; docs/method.md): ``writers`` (the default) projects
each writer's raw output along its gain-adjusted direction before the post-norm, which a weight edit
equals exactly; ``residual`` projects the direction itself out of what each block adds to the stream
(the post-norm's output), as the paper's hooks do on its pre-norm models: not a weight edit there, since
the norm rescales. ``add`` adds the (unnormalised) direction to one layer's input at every position.
Projections run in float32 and are cast back to the model dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import RefusalError
from ..model.architecture import Writer
from ..model.chat import ChatModel
from .directions import unit_vector
from .hooks import get_hidden, hooked, replace_hidden, retuple, untuple
from .projection import project_out

ABLATION_FORMS = ("writers", "residual")


@contextmanager
def ablate(chat: ChatModel, direction: torch.Tensor, form: str = "writers") -> Iterator[None]:
    """Within the block the model cannot represent ``direction`` in its residual stream; ``form`` (``ABLATION_FORMS``)
    says where a post-norm block's output is projected: before the norm along the gain-adjusted direction
    (``writers``, what the weight edit equals) or after it along the direction (``residual``)."""
    if form not in ABLATION_FORMS:
        raise RefusalError(f"unknown ablation form {form!r}; choose one of {', '.join(ABLATION_FORMS)}")
    unit = unit_vector(direction)

    def layer_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return replace_hidden(args, kwargs, project_out(get_hidden(args, kwargs), unit))

    def writer_hook(u: torch.Tensor) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            return retuple(output, project_out(untuple(output), u))

        return hook

    pre = [(layer, layer_hook) for layer in chat.layers]
    if form == "writers":
        post = [(w.module, writer_hook(w.direction(unit))) for w in chat.writers]
    else:  # what each block adds to the residual: the post-norm's output where there is one (each module hooked once)
        added = {id(m): m for m in (w.post_norm if w.post_norm is not None else w.module for w in chat.writers)}
        post = [(module, writer_hook(unit)) for module in added.values()]
    with hooked(pre=pre, post=post):
        yield


@contextmanager
def ablate_between_layers(chat: ChatModel, direction: torch.Tensor) -> Iterator[None]:
    """Within the block ``direction`` is projected out of the residual stream between decoder layers (every
    layer's input and the last layer's output), whatever the layers' linear modules are: hooks on the decoder
    layers themselves, so it also holds while adapters (LoRA) wrap the blocks' output projections."""
    unit = unit_vector(direction)

    def layer_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return replace_hidden(args, kwargs, project_out(get_hidden(args, kwargs), unit))

    def last_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return retuple(output, project_out(untuple(output), unit))

    with hooked(pre=[(layer, layer_hook) for layer in chat.layers], post=[(chat.layers[-1], last_hook)]):
        yield


@contextmanager
def damp_outputs(
    chat: ChatModel, steps: Sequence[tuple[torch.Tensor | Callable[[Writer], torch.Tensor], Callable[[Writer], float]]]
) -> Iterator[None]:
    """Within the block, for each (unit, strength) step in order, every residual writer's output (the embeddings'
    too) loses ``strength(writer)`` times its component along ``unit`` (behind a post-norm, the gain-adjusted
    direction ``ablate``'s writer hooks use): out - s (out . u) u. The hooked equivalent of a weight edit with
    those strengths, since a writer's output is linear in its weight and bias (``edits.KernelEdit.hooks``). A step's
    unit may be a function of the writer (one direction per target layer)."""

    def writer_hook(units: list[tuple[torch.Tensor, float]]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            out = untuple(output)
            for u, s in units:
                out = project_out(out, u, s)
            return retuple(output, out)

        return hook

    post = []
    for writer in (*chat.embeddings, *chat.writers):
        units = [
            (writer.direction(unit_vector(unit if isinstance(unit, torch.Tensor) else unit(writer))), s)
            for unit, strength in steps
            if (s := strength(writer)) != 0
        ]
        if units:
            post.append((writer.module, writer_hook(units)))
    with hooked(post=post):
        yield


@contextmanager
def add(chat: ChatModel, direction: torch.Tensor, layer: int, coeff: float = 1.0) -> Iterator[None]:
    """Within the block ``coeff * direction`` is added to decoder layer ``layer``'s input, all positions."""
    if not 0 <= layer < chat.n_layers:
        raise RefusalError(f"layer {layer} is out of range for activation addition; use 0 .. {chat.n_layers - 1}")
    vector = coeff * direction.detach().float()

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = get_hidden(args, kwargs)
        return replace_hidden(args, kwargs, (hidden.float() + vector.to(hidden.device)).to(hidden.dtype))

    with hooked(pre=[(chat.layers[layer], hook)]):
        yield
