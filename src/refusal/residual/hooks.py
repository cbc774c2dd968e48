"""The one hook primitive: register forward (pre-)hooks for the duration of a ``with`` block.

Registration happens inside ``try`` so that a failure part-way, or an exception in the block,
still removes every hook that was registered. Hook functions never edit tensors in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

PreHook = Callable[[nn.Module, tuple, dict], "tuple[tuple, dict] | None"]
PostHook = Callable[[nn.Module, tuple, object], object]


@contextmanager
def hooked(pre: Sequence[tuple[nn.Module, PreHook]] = (), post: Sequence[tuple[nn.Module, PostHook]] = ()) -> Iterator[None]:
    """Attach pre-hooks (called with args and kwargs) and forward hooks; always detach them."""
    handles = []
    try:
        for module, pre_hook in pre:
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for module, post_hook in post:
            handles.append(module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def get_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual-stream tensor a decoder layer was called with (positional or keyword)."""
    if args:
        return args[0]
    return kwargs["hidden_states"]


def replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) with the decoder layer's hidden-states input replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def untuple(output: object) -> torch.Tensor:
    """The tensor of a module output that may be a tuple (first element) or a tensor."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def retuple(output: object, tensor: torch.Tensor) -> object:
    """``output`` with its main tensor replaced, keeping any other tuple members."""
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor
