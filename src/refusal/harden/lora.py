"""LoRA adapters (peft) on a loaded chat model, and their merge as tensor deltas.

    with lora_attached(chat, rank, alpha, modules) as adapter:   peft's LoRA layers injected into chat.model in place;
        ... train adapter.parameters() ...                       removed again on exit, the base weights untouched
        deltas = adapter.deltas()                                checkpoint tensor name -> LowRank(B, A, alpha / rank)

The merge W + (alpha / rank) · B @ A is what peft's ``merge_and_unload`` computes; as ``LowRank`` deltas it goes
through the same in-memory edit, streamed export and read-back as every other edit (``edit.tensor_deltas``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..edit.deltas import LowRank, TensorDelta
from ..errors import RefusalError
from ..model.chat import ChatModel
from ..settings import LORA_MODULES

ADAPTER = "default"  # peft's adapter name


def target_modules(chat: ChatModel, modules: str) -> dict[str, str]:
    """Module name (in ``chat.model``) -> checkpoint weight name of each linear layer the adapter trains."""
    if modules not in LORA_MODULES:
        raise RefusalError(f"unknown LoRA module choice {modules!r}; use one of {', '.join(LORA_MODULES)}")
    names = {id(module): name for name, module in chat.model.named_modules()}
    if modules == "writers":
        found = {names[id(w.module)]: w.weight_name for w in chat.writers if isinstance(w.module, nn.Linear) and id(w.module) in names}
    else:
        inside = [names[id(layer)] for layer in chat.layers]
        found = {
            name: f"{name}.weight"
            for name, module in chat.model.named_modules()
            if isinstance(module, nn.Linear) and any(name.startswith(prefix + ".") for prefix in inside)
        }
    if not found:
        raise RefusalError(f"{chat.source} has no nn.Linear layers for --lora-modules {modules} (fused experts or Conv1D); try --lora-modules all")
    return found


@dataclass
class Adapter:
    """The injected LoRA: its trainable parameters, a switch to run the base model, and its merge."""

    peft_model: Any  # a peft.PeftModel
    weights: dict[str, str]  # module name -> checkpoint weight name

    def parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.peft_model.named_parameters() if "lora_" in name]

    def disabled(self) -> AbstractContextManager:
        """Context: the base model alone (the original's outputs, for the KL term)."""
        return self.peft_model.disable_adapter()

    def layers(self) -> dict[str, Any]:
        """Module name (in chat.model) -> its peft LoRA layer."""
        from peft.tuners.lora import LoraLayer

        out: dict[str, Any] = {}
        for name, module in self.peft_model.named_modules():
            if isinstance(module, LoraLayer):
                out[name.removeprefix("base_model.model.")] = module
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The adapter's A and B matrices, float32 on the CPU, keyed "<module>:A" / "<module>:B"."""
        out = {}
        for name, layer in self.layers().items():
            out[f"{name}:A"] = layer.lora_A[ADAPTER].weight.detach().float().cpu().contiguous().clone()
            out[f"{name}:B"] = layer.lora_B[ADAPTER].weight.detach().float().cpu().contiguous().clone()
        return out

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        layers = self.layers()
        if {f"{n}:{p}" for n in layers for p in "AB"} != set(state):
            raise RefusalError("the saved LoRA state names other layers than this adapter's; start the hardening again (--overwrite)")
        for name, layer in layers.items():
            for part, linear in (("A", layer.lora_A[ADAPTER]), ("B", layer.lora_B[ADAPTER])):
                linear.weight.copy_(state[f"{name}:{part}"].to(linear.weight))

    def deltas(self) -> dict[str, TensorDelta]:
        """Checkpoint weight name -> W += scale · B @ A, the merge of each LoRA layer (float32 factors)."""
        out: dict[str, TensorDelta] = {}
        for name, layer in self.layers().items():
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight  # [r, in], [out, r]
            scale = float(layer.scaling[ADAPTER])
            out[self.weights[name]] = LowRank(b.detach().float().cpu().clone(), a.detach().float().cpu().clone(), scale)
        return out


@contextmanager
def lora_attached(chat: ChatModel, rank: int, alpha: int, modules: str, seed: int) -> Iterator[Adapter]:
    """peft's LoRA layers (rank ``rank``, scale ``alpha / rank``, B = 0 so the model starts unchanged) in
    ``chat.model``'s ``modules``; always removed on exit (unmerged: the base weights are never changed)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RefusalError("hardening trains a LoRA with peft, which is not installed; pip install 'refusal[harden]' (or pip install peft)") from None
    weights = target_modules(chat, modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=sorted(weights))
    grads = {name: p.requires_grad for name, p in chat.model.named_parameters()}
    peft_model = None
    try:
        with torch.random.fork_rng(devices=[]):  # A's initialisation is seeded without touching the caller's generator
            torch.manual_seed(seed)
            peft_model = get_peft_model(chat.model, config)
        yield Adapter(peft_model, weights)
    finally:
        if peft_model is not None:
            peft_model.unload()  # the LoRA layers replaced by their base layers again, nothing merged
        else:  # injection failed part-way: put back whatever base layers were already wrapped
            _unwrap(chat.model)
        for name, p in chat.model.named_parameters():
            p.requires_grad_(grads.get(name, p.requires_grad))


def _unwrap(model: nn.Module) -> None:
    """Replace every peft LoRA layer inside ``model`` by its base layer (after a failed injection)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
