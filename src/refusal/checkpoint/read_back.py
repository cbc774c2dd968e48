"""An export read back into the loaded model by tensor name: what lets the fidelity check and the evaluation run
an export without loading a second copy of the model (issue 16).

- ``exported_in_place``: within a block the model's edited tensors (every writer's, and any other the edit
  names: ``edited_names``) hold the export's values (copied in under a ``weights.Snapshot``, restored bit for
  bit after): the export's fidelity check.
- ``ExportSwap``: the export's edited tensors read once and held beside the model; within ``swapped()`` they
  replace the model's by exchanging the parameters' storage, so entering and leaving costs nothing: the
  evaluation's "edited" condition, entered once per batch.

Fused experts stored one matrix per expert are stacked back (``streaming.expert_keys``). A tensor the export
lacks raises ``streaming.NamesDiffer``: it was not written from this model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from ..common.safetensors_files import tensor_locations
from ..edit.deltas import named_tensor
from ..edit.weights import Snapshot, embeddings_tied
from ..errors import RefusalError
from ..model.chat import ChatModel
from .streaming import NamesDiffer, expert_keys


def edited_names(chat: ChatModel, exported: Path) -> list[str]:
    """The tensors an export of ``chat`` may have changed: every writer weight and bias, and the tensors its
    refusal.json's edit names (a ``tensor_deltas`` edit's), in that order, each once."""
    names = [n for w in (*chat.embeddings, *chat.writers) for n in (w.weight_name, w.bias_name) if n is not None]
    info = Path(exported) / "refusal.json"
    if info.is_file():
        described = json.loads(info.read_text(encoding="utf-8")).get("edit") or {}
        names += [n for n in described.get("tensors", {}) if n not in set(names)]
    return names


def exported_tensors(chat: ChatModel, exported: Path, names: Iterable[str] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(the model's tensor, the export's tensor of that name as stored) for each of ``names`` (default
    ``edited_names``), each checkpoint file opened once; a tensor of another shape is refused: the export is not
    of this model."""
    from safetensors import safe_open

    locations = tensor_locations(exported)
    writers = {w.weight_name: w for w in (*chat.embeddings, *chat.writers)}
    with ExitStack() as files:
        opened: dict[Path, Any] = {}

        def read(key: str) -> torch.Tensor:
            file = locations[key][0]
            if file not in opened:
                opened[file] = files.enter_context(safe_open(str(file), framework="pt"))
            return opened[file].get_tensor(key)

        for name in edited_names(chat, exported) if names is None else names:
            tensor = named_tensor(chat, name)
            writer = writers.get(name)
            if name in locations:
                value = read(name)
            elif writer is not None and tensor.dim() == 3 and (keys := expert_keys(name, tensor.shape[0], locations)) is not None:
                value = torch.stack([m.T if writer.rows else m for m in map(read, keys)])  # one Linear weight [d_model, in] per expert
            else:
                raise NamesDiffer(f"the export has no tensor {name}; it was not written from this model")
            if value.shape != tensor.shape:
                shapes = f"{tuple(value.shape)}, the model's {tuple(tensor.shape)}"
                raise RefusalError(f"the export's {name} has shape {shapes}; it was not written from this model")
            yield tensor, value


@contextmanager
def exported_in_place(chat: ChatModel, exported: Path, names: Iterable[str] | None = None) -> Iterator[None]:
    """Within the block each tensor of ``chat`` named in ``names`` (default: ``edited_names``) holds its value from
    the checkpoint at ``exported`` (read by name, per expert where it is stored so), cast to the model's dtype;
    afterwards restored bit for bit.
    The export's logits without a second copy of the model (``export.fidelity_check``)."""
    snapshot = Snapshot(chat)
    try:
        for tensor, value in exported_tensors(chat, exported, names):
            snapshot.save(tensor)
            with torch.no_grad():
                tensor.copy_(value.to(tensor.device, tensor.dtype))
        yield
    finally:
        snapshot.restore()


class ExportSwap:
    """The writer tensors of an export of ``chat``'s checkpoint, read once and held beside the model; within
    ``swapped()`` the model's writer parameters hold them instead of their own, by exchanging the parameters'
    storage (no copy, no disk read), and get their own back afterwards. The evaluation's "edited" condition
    without a second copy of the model: the extra memory is the writers' tensors only. A tied embedding is
    untied within the block, the unembedding keeping the original matrix, as the export untied it."""

    def __init__(self, chat: ChatModel, exported: Path, names: Iterable[str] | None = None):
        self.chat = chat
        # (parameter, the tensor it gets next); the edited tensors (``edited_names`` by default) are parameters
        self.pairs = [(tensor, value.to(tensor.device, tensor.dtype)) for tensor, value in exported_tensors(chat, exported, names)]

    def _swap(self) -> None:
        for i, (parameter, value) in enumerate(self.pairs):
            self.pairs[i] = (parameter, parameter.data)
            parameter.data = value

    @contextmanager
    def swapped(self) -> Iterator[None]:
        tied = embeddings_tied(self.chat)
        output = self.chat.model.get_output_embeddings()
        embedding = self.chat.model.get_input_embeddings().weight
        try:
            if tied:  # a Parameter of its own over the original matrix, before the embedding's storage changes
                output.weight = torch.nn.Parameter(embedding.data, requires_grad=False)
            self._swap()
            yield
        finally:
            self._swap()
            if tied:
                output.weight = embedding
