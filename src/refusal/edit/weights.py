"""Weight edits' machinery: remove a direction from the residual writers, and undo it exactly.

For unit direction u, every matrix that writes into the residual stream becomes W - s u u^T W
(the embeddings: E - s E u u^T, row-wise), and every bias b becomes b - s u u^T b, with a strength
s per writer (1 everywhere: the paper's orthogonalization, which equals ``ablate`` exactly: nothing
can add a component along u, so every layer input and the final residual have none).

Tied embeddings are untied before the token embedding is edited: otherwise the unembedding would
change too, and the edit would no longer equal hooked ablation. ``Snapshot`` is the one
snapshot-and-revert mechanism: it saves a tensor the first time an edit touches it (nothing else
is copied) and copies it back bit for bit, re-tying what it untied.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from ..errors import RefusalError
from ..model.architecture import HFModel, Writer
from ..model.chat import ChatModel
from ..residual.directions import unit_vector
from ..residual.hooks import hooked, retuple, untuple
from ..residual.projection import project_out, project_out_coordinates


def _text_configs(model: HFModel) -> list:
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


class Snapshot:
    """The originals of the tensors edits touched; ``restore`` copies them back bit for bit.

    ``save(t)`` must be called before ``t`` is changed; the first call clones it, later ones only
    mark it touched. The tied token embedding is untied instead of cloned: the unembedding's new
    copy is the original (no edit touches the unembedding). ``restore(keep=True)`` reverts the
    tensors touched since the last restore and keeps the copies (and cached norms) for the next
    edit; ``restore()`` also re-ties what was untied and frees the copies.
    """

    def __init__(self, chat: ChatModel, hook_experts: bool = False):
        self.chat = chat
        self.originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.touched: set[int] = set()
        self.untied = False
        self.cached_norms: dict[tuple[int, bool], torch.Tensor] = {}
        self.hook_experts = hook_experts  # fused experts edited by an output hook instead of a copy of every expert
        self.hooks = ExitStack()

    def hook_output(self, module: nn.Module, unit: torch.Tensor, strength: float) -> None:
        """Until ``restore``, ``module``'s output loses ``strength`` times its component along ``unit``: for fused
        experts the same as editing every expert's matrix (one direction and strength per layer, and the output
        is the experts' weighted sum), without copying them."""

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            return retuple(output, project_out(untuple(output), unit, strength))

        self.hooks.enter_context(hooked(post=[(module, hook)]))

    def save(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        if key not in self.originals:
            if tensor is self.chat.model.get_input_embeddings().weight and untie_embeddings(self.chat):
                self.untied = True
                original = self.chat.model.get_output_embeddings().weight.detach()
            else:
                original = tensor.detach().clone()
            self.originals[key] = (tensor, original)
        self.touched.add(key)

    def original(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.originals[id(tensor)][1]

    def norms(self, tensor: torch.Tensor, rows: bool) -> torch.Tensor:
        """Float32 norms of the original written vectors (rows or columns), computed once per tensor."""
        key = (id(tensor), rows)
        if key not in self.cached_norms:
            self.cached_norms[key] = self.original(tensor).float().norm(dim=-1 if rows else -2)
        return self.cached_norms[key]

    @torch.no_grad()
    def restore(self, keep: bool = False) -> None:
        self.hooks.close()
        self.hooks = ExitStack()
        for key in self.touched:
            tensor, original = self.originals[key]
            tensor.copy_(original)
        self.touched.clear()
        if not keep:
            if self.untied:
                retie_embeddings(self.chat)
                self.untied = False
            self.originals.clear()
            self.cached_norms.clear()


@torch.no_grad()
def remove_direction(
    chat: ChatModel,
    unit: torch.Tensor | Callable[[Writer], torch.Tensor],
    strength: Callable[[Writer], float] | None = None,
    snapshot: Snapshot | None = None,
    norms: str = "none",
) -> None:
    """In place: every writer (embeddings, then attention and MLP outputs) loses ``strength(writer)`` (default 1)
    times its component along ``unit`` (one for all, or ``unit(writer)``; gain-adjusted after post-norms), biases
    too; writers at strength 0 are not touched. ``norms``: "written_norms" rescales every written vector to its
    original norm, "coordinate_norms" keeps each residual coordinate's weights' norm (``project_out_coordinates``;
    biases are projected only). Every tensor is saved into ``snapshot`` before it changes; without one the edit
    is permanent."""
    for writer in (*chat.embeddings, *chat.writers):
        s = 1.0 if strength is None else strength(writer)
        if s == 0:
            continue
        weight, bias = writer.weight, writer.bias
        if weight.device.type == "meta":  # offloaded by accelerate (its value lives elsewhere), or a skeleton's
            raise RefusalError(
                f"{writer.weight_name} has no weights in memory (offloaded by --device-map, or a model structure only); "
                "edits in place need every writer in GPU or CPU memory: give the placement more memory, or export with --streaming"
            )
        u = writer.direction(unit if isinstance(unit, torch.Tensor) else unit(writer))
        if snapshot is not None and snapshot.hook_experts and weight.dim() == 3 and norms == "none":
            snapshot.hook_output(writer.module, u, s)
            continue
        if snapshot is not None:
            for tensor in (weight, bias):
                if tensor is not None:
                    snapshot.save(tensor)
        elif writer.component == "embed":
            untie_embeddings(chat)
        project_tensor(weight, u, s, writer.rows, norms, snapshot)
        if bias is not None:
            project_tensor(bias, u, s, rows=True, norms="none")


@torch.no_grad()
def project_tensor(tensor: torch.Tensor, u: torch.Tensor, strength: float, rows: bool, norms: str = "none", snapshot: Snapshot | None = None) -> None:
    """In place: ``tensor``'s written vectors (rows, or columns) lose ``strength`` times their component along ``u``;
    ``norms`` as in ``remove_direction``, the kept norms being the original's (``snapshot``, where it saved ``tensor``)."""
    kept_rows = rows if norms == "written_norms" else not rows  # the axis whose norms are kept
    kept = None
    if norms != "none":
        kept = snapshot.norms(tensor, kept_rows) if snapshot is not None else tensor.float().norm(dim=-1 if kept_rows else -2)
    if kept is not None and norms == "coordinate_norms":
        project_out_coordinates(tensor, u, strength, rows=rows, norms=kept)
    else:
        project_out(tensor, u, strength, rows=rows, norms=kept, in_place=True)


def orthogonalize_weights(chat: ChatModel, direction: torch.Tensor) -> None:
    """Edit the model in place, permanently, so that it cannot write ``direction`` into its residual stream.

    Unties tied embeddings first (see module docstring). ``edits.orthogonalized`` is the revertible form.
    """
    remove_direction(chat, unit_vector(direction))
