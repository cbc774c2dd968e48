"""Where the refusal method's parts live in a transformers causal LM, found once per model.

The decoder layers (whose inputs are the residual stream) are the one ``ModuleList`` with a known
path suffix; the residual writers are each layer's attention and MLP output projections (known
attribute paths) plus the embeddings. Each ``Writer`` records, once, how its weight stores the
vectors it writes (rows or columns) and its parameters' names in the checkpoint. Nothing here is
hard-coded per family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..errors import UnsupportedModelError

# A transformers PreTrainedModel / tokenizer. Typed loosely: their attributes reach mypy through
# nn.Module.__getattr__ (Tensor | Module) and untyped tokenizer classes.
HFModel = Any
Tokenizer = Any

SUPPORTED_FAMILIES = (
    "Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, GPT-2, GPT-NeoX, OLMo 2; MoE: Qwen2-MoE, Qwen3-MoE, Mixtral, GPT-OSS"
)

# Where the decoder layers live, by the suffix of their ModuleList's name.
_LAYER_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
)
# Residual-stream writers inside one decoder layer, tried in order.
_ATTN_OUT = ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attention.dense", "attn.out_proj", "self_attn.out_proj")
_MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "mlp.fc_out", "fc2")
# Mixture-of-experts layers: the experts module (fused 3-D parameters, or a ModuleList of MLPs) and
# shared experts that add into the residual beside them.
_MOE_EXPERTS = ("mlp.experts", "block_sparse_moe.experts", "feed_forward.experts")
_EXPERT_OUT = ("down_proj", "w2", "fc2")  # the fused parameter, or each expert's output Linear
_SHARED_OUT = ("mlp.shared_expert.down_proj", "mlp.shared_experts.down_proj", "feed_forward.shared_expert.down_proj")
# Extra embeddings added straight into the residual stream (learned positions).
_POSITION_EMBEDDINGS = ("wpe", "embed_positions")


@dataclass
class Writer:
    """A weight that writes into the residual stream: an embedding, or a layer's attention or MLP output.

    ``rows`` is the weight's orientation, found once here: True when the written vectors are its
    rows (``nn.Embedding`` [vocab, d_model], GPT-2's ``Conv1D`` [in, d_model]), False when they are its
    columns (``nn.Linear`` [d_model, in]). A mixture-of-experts layer's fused expert parameter is
    3-D, one matrix per expert ([experts, d_model, in] with columns, [experts, in, d_model] with
    rows); ``weight_attr``/``bias_attr`` name the module's parameters (``weight`` for a Linear,
    ``down_proj`` for fused experts). ``weight_name``/``bias_name`` are their names in
    ``model.state_dict()``. ``gain`` is set when a normalisation with elementwise gains sits
    between the module and the residual add (Gemma 2/3, OLMo 2 "post-norms"): the module's output is
    then orthogonal to the residual direction u after the norm exactly when it is orthogonal to
    gain * u before it; ``post_norm`` is that norm module. Embeddings count as layer 0.
    """

    module: nn.Module
    component: str  # "embed", "attn" or "mlp"
    layer: int
    gain: torch.Tensor | None = None
    rows: bool = False
    weight_name: str = ""
    bias_name: str | None = None
    post_norm: nn.Module | None = None
    weight_attr: str = "weight"
    bias_attr: str = "bias"

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, getattr(self.module, self.weight_attr))

    @property
    def bias(self) -> torch.Tensor | None:
        return cast(torch.Tensor, getattr(self.module, self.bias_attr)) if self.bias_name is not None else None

    def direction(self, unit: torch.Tensor) -> torch.Tensor:
        """The unit direction to remove from this module's raw output (float32)."""
        if self.gain is None:
            return unit
        u = self.gain.to(unit.device) * unit
        return u / u.norm().clamp_min(1e-12)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    found: Any = module
    for part in path.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found


def find_decoder_layers(model: HFModel) -> nn.ModuleList:
    """The decoder layers: the one ModuleList whose name ends with a known suffix."""
    override = getattr(model, "refusal_layers_path", None)
    if override:
        layers = _get(model, override)
        if isinstance(layers, nn.ModuleList):
            return layers
        raise UnsupportedModelError(f"refusal_layers_path {override!r} is not a ModuleList in {type(model).__name__}")
    matches = [
        m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and any(name == p or name.endswith("." + p) for p in _LAYER_PATHS)
    ]
    if len(matches) != 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: {'no' if not matches else 'more than one'} decoder layer list found "
            f"(looked for {', '.join(_LAYER_PATHS)}). Supported: {SUPPORTED_FAMILIES}; "
            "or set model.refusal_layers_path to the dotted path of its layers"
        )
    return matches[0]


def _norm_gain(norm: nn.Module, d_model: int) -> torch.Tensor:
    """Elementwise gain of an RMS-style norm, up to scale: its output on the all-ones vector."""
    weight = next(norm.parameters())
    with torch.no_grad():
        gain = norm(torch.ones(1, d_model, dtype=weight.dtype, device=weight.device)).float()[0]
    return gain.cpu()


def _orientation(module: nn.Module, d_model: int, where: str) -> bool:
    """True when ``module``'s weight stores the vectors it writes as rows, False as columns; decided once, here."""
    if isinstance(module, nn.Embedding):
        return True
    if isinstance(module, nn.Linear):
        return False
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):  # GPT-2: y = x W + b with W [in, out]
        return True
    shape = tuple(getattr(module, "weight", torch.empty(0)).shape)
    if len(shape) == 2 and shape[0] != shape[1] and d_model in shape:
        return shape[1] == d_model
    raise UnsupportedModelError(f"{where} ({type(module).__name__}, weight {shape}) has no known orientation; supported: {SUPPORTED_FAMILIES}")


def _writer(module: nn.Module, component: str, layer: int, names: dict[int, str], d_model: int, post_norm: nn.Module | None = None) -> Writer:
    name = names[id(module)]
    bias = getattr(module, "bias", None)
    return Writer(
        module=module,
        component=component,
        layer=layer,
        gain=_norm_gain(post_norm, d_model) if post_norm is not None else None,
        post_norm=post_norm,
        rows=_orientation(module, d_model, name),
        weight_name=f"{name}.weight",
        bias_name=f"{name}.bias" if isinstance(bias, torch.Tensor) else None,
    )


def _expert_writers(layer: nn.Module, i: int, names: dict[int, str], d_model: int) -> list[Writer]:
    """The writers of a mixture-of-experts layer: the experts' output projections (one fused 3-D parameter, or
    one Linear per expert) and any shared expert's; empty for a dense layer. The router is a reader, untouched."""
    experts = next((m for m in (_get(layer, p) for p in _MOE_EXPERTS) if m is not None), None)
    if experts is None:
        return []
    writers = []
    if isinstance(experts, nn.ModuleList):
        for expert in experts:
            module = next((m for m in (_get(expert, p) for p in _EXPERT_OUT) if m is not None), None)
            if module is None:
                raise UnsupportedModelError(
                    f"an expert of layer {i} ({type(expert).__name__}) has no output projection (looked for {', '.join(_EXPERT_OUT)})"
                )
            writers.append(_writer(module, "mlp", i, names, d_model))
    else:
        attr = next((a for a in _EXPERT_OUT if isinstance(getattr(experts, a, None), torch.Tensor)), None)
        if attr is None:
            raise UnsupportedModelError(
                f"the experts of layer {i} ({type(experts).__name__}) have no fused output projection (looked for {', '.join(_EXPERT_OUT)})"
            )
        weight = getattr(experts, attr)
        rows = _orientation_3d(tuple(weight.shape), d_model, f"{names[id(experts)]}.{attr}")
        bias = f"{attr}_bias" if isinstance(getattr(experts, f"{attr}_bias", None), torch.Tensor) else None
        name = names[id(experts)]
        writers.append(
            Writer(
                experts,
                "mlp",
                i,
                rows=rows,
                weight_name=f"{name}.{attr}",
                bias_name=f"{name}.{bias}" if bias else None,
                weight_attr=attr,
                bias_attr=bias or "bias",
            )
        )
    shared = next((m for m in (_get(layer, p) for p in _SHARED_OUT) if m is not None), None)
    if shared is not None:
        writers.append(_writer(shared, "mlp", i, names, d_model))
    return writers


def _orientation_3d(shape: tuple, d_model: int, where: str) -> bool:
    """Fused experts [experts, d_model, in] write columns (False); [experts, in, d_model] write rows (True)."""
    if len(shape) == 3 and shape[1] != shape[2] and d_model in shape[1:]:
        return shape[2] == d_model
    raise UnsupportedModelError(f"{where} (fused experts, shape {shape}) has no known orientation; supported: {SUPPORTED_FAMILIES}")


def find_writers(model: HFModel, layers: nn.ModuleList, d_model: int) -> list[Writer]:
    """Attention and MLP output projections of every layer (every expert's in a mixture-of-experts layer), with
    post-norm gains where present."""
    names = {id(m): n for n, m in model.named_modules()}
    writers: list[Writer] = []
    for i, layer in enumerate(layers):
        # A post-feedforward norm marks the "sandwich" layout (Gemma 2/3, OLMo 2): there the
        # post_attention_layernorm normalises the attention output before the residual add.
        sandwich = hasattr(layer, "post_feedforward_layernorm")
        experts = _expert_writers(layer, i, names, d_model)
        for component, paths, post in (("attn", _ATTN_OUT, "post_attention_layernorm"), ("mlp", _MLP_OUT, "post_feedforward_layernorm")):
            if component == "mlp" and experts:
                if sandwich:
                    raise UnsupportedModelError(f"layer {i} mixes experts with a post-feedforward norm, which is not supported")
                writers.extend(experts)
                continue
            module = next((m for m in (_get(layer, p) for p in paths) if m is not None), None)
            if module is None:
                raise UnsupportedModelError(
                    f"{type(model).__name__} is not supported: layer {i} ({type(layer).__name__}) has no {component} output projection "
                    f"(looked for {', '.join(paths)}). Supported: {SUPPORTED_FAMILIES}"
                )
            writers.append(_writer(module, component, i, names, d_model, getattr(layer, post) if sandwich else None))
    return writers


def find_embeddings(model: HFModel) -> list[Writer]:
    """The token embedding plus any learned position embedding that adds into the residual (component "embed")."""
    names = {id(m): n for n, m in model.named_modules()}
    token = model.get_input_embeddings()
    d_model = token.weight.shape[1]
    modules = [token]
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for name in _POSITION_EMBEDDINGS:
        module = getattr(base, name, None)
        if isinstance(module, nn.Embedding) and module.weight.shape[1] == d_model:
            modules.append(module)
    return [_writer(m, "embed", 0, names, d_model) for m in modules]
