"""Read the residual stream at the post-instruction positions.

Index ``l`` in ``[0, n_layers)`` is the input of decoder layer ``l``; index ``n_layers`` is the
final residual (output of the last layer, before the final norm). Positions are the last
``n_post`` tokens of every (left-padded) prompt, i.e. the template tokens after the instruction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..common.progress import track
from ..errors import check_finite
from ..model.chat import ChatModel
from .hooks import get_hidden, hooked, untuple


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@contextmanager
def residual_reader(chat: ChatModel, n_positions: int, sink: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """While active, every forward pass calls ``sink(index, x)`` with x [batch, n_positions, d_model] in float32."""

    def pre(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            sink(index, get_hidden(args, kwargs)[:, -n_positions:].float())

        return hook

    def final(module: nn.Module, args: tuple, output: Any) -> None:
        sink(chat.n_layers, untuple(output)[:, -n_positions:].float())

    with hooked(pre=[(layer, pre(i)) for i, layer in enumerate(chat.layers)], post=[(chat.layers[-1], final)]):
        yield


def mean_activations(chat: ChatModel, instructions: list[str], batch_size: int = 16, description: str = "activations") -> torch.Tensor:
    """Mean residual activation per (layer, position) in float32: [n_layers + 1, n_post, d_model].

    Sums accumulate in float64 batch by batch, so memory does not grow with the prompt count.
    """
    n_post = chat.n_post
    total = torch.zeros(chat.n_layers + 1, n_post, chat.d_model, dtype=torch.float64)

    def sink(index: int, x: torch.Tensor) -> None:
        total[index] += x.sum(0).double().cpu()

    with residual_reader(chat, n_post, sink):
        for batch in track(batches(instructions, batch_size), description):
            chat.logits(chat.batch(batch))
    mean = (total / len(instructions)).float()
    check_finite(mean, f"mean activations ({description})")
    return mean


def collect_activations(chat: ChatModel, instructions: list[str], batch_size: int = 16) -> torch.Tensor:
    """Per-prompt activations [n_prompts, n_layers + 1, n_post, d_model] in float32 (small sets only)."""
    n_post = chat.n_post
    rows: list[torch.Tensor] = []
    current: dict[int, torch.Tensor] = {}

    def sink(index: int, x: torch.Tensor) -> None:
        current[index] = x.cpu()

    with residual_reader(chat, n_post, sink):
        for batch in batches(instructions, batch_size):
            current.clear()
            chat.logits(chat.batch(batch))
            rows.append(torch.stack([current[i] for i in range(chat.n_layers + 1)], dim=1))
    return torch.cat(rows)
