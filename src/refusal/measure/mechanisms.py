"""How an adversarial suffix keeps the refusal direction from forming (the paper's §5), as measurements.

Three views of one forward pass, all read at the last prompt position (where the first response
token is predicted), all in float32:

- ``layer_cosines``: the cosine of the residual with the refusal direction at every layer (Fig. 5):
  with a working suffix the harmful prompt's curve stays low, like a harmless prompt's.
- ``decompose``: direct attribution of the final residual's projection on the direction to the
  embeddings, every attention head, every attention bias and every MLP (Fig. 6). The terms add up
  exactly to the projection, post-norm ("sandwich") families included: there the residual receives
  ``norm(y) = k * gain * y`` (``k`` one scalar per position), so every piece of ``y`` goes through
  that same linear map. ``top_heads`` ranks the heads that write the direction.
- ``attention_masses``: how much those heads' last-position query attends to the instruction,
  the suffix and the chat template: the suffix "hijacks" the heads' attention away from the instruction.

``direction_cosines`` and ``compare_directions`` compare stored candidate directions across layers
and across models (the paper's App. J: a chat model against its base model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data.suffixes import REGIONS, SuffixedPrompt
from ..errors import RefusalError, UnsupportedModelError, check_finite
from ..model.architecture import Writer
from ..model.chat import ChatModel
from ..residual.activations import batches, residual_reader
from ..residual.directions import Candidates, unit_vector
from ..residual.hooks import hooked, untuple

if TYPE_CHECKING:
    from transformers import PretrainedConfig


# ---- the direction across layers (Fig. 5) ---------------------------------------------------------
def layer_cosines(chat: ChatModel, prompts: list[list[int]], direction: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """[n_prompts, n_layers + 1] cosine of the last position's residual with `direction`.

    At every decoder-layer input and the final residual (paper Fig. 5); prompts are token id lists.
    """
    unit = unit_vector(direction).to(chat.device)
    rows: list[torch.Tensor] = []
    current: dict[int, torch.Tensor] = {}

    def sink(index: int, x: torch.Tensor) -> None:  # x [batch, 1, d_model] float32
        current[index] = torch.cosine_similarity(x[:, 0], unit.to(x.device)[None], dim=-1).cpu()  # [batch]

    with residual_reader(chat, 1, sink):
        for batch in batches(prompts, batch_size):
            current.clear()
            chat.logits(chat.pad(batch))
            rows.append(torch.stack([current[i] for i in range(chat.n_layers + 1)], dim=1))  # [batch, n_layers + 1]
    out = torch.cat(rows)
    check_finite(out, "residual cosines with the direction")
    return out


def direction_cosines(candidates: Candidates, direction: torch.Tensor, position: int = -1) -> list[float]:
    """Cosine of the candidate difference-in-means direction at each layer with `direction`: where the direction forms.

    Rows 0..n_layers of the candidates, at `position`. A zero candidate gives 0.0 (layer 0: every
    prompt's last token is the same template token, so the means coincide there).
    """
    unit = unit_vector(direction)
    if unit.shape[-1] != candidates.mean_harmful.shape[-1]:
        width = candidates.mean_harmful.shape[-1]
        raise RefusalError(f"the direction has {unit.shape[-1]} dimensions but the candidates {width}; use the same model's files")
    return [_cosine(candidates.direction(layer, position), unit) for layer in range(candidates.n_layers + 1)]


def compare_directions(a: Candidates, b: Candidates, position: int = -1) -> list[float]:
    """Per layer, cosine between two models' candidate directions at the same layer and position (the paper's App. J: chat vs base model)."""
    shape_a, shape_b = (a.n_layers, a.mean_harmful.shape[-1]), (b.n_layers, b.mean_harmful.shape[-1])
    if shape_a != shape_b:
        raise RefusalError(
            f"the candidates differ in shape ({shape_a[0]} layers x {shape_a[1]} wide vs {shape_b[0]} x {shape_b[1]}); "
            "compare a chat model with its own base model"
        )
    return [_cosine(a.direction(layer, position), b.direction(layer, position)) for layer in range(a.n_layers + 1)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two vectors in float32; 0.0 when either is zero."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    check_finite(a, "candidate direction")
    check_finite(b, "candidate direction")
    norms = a.norm() * b.norm()
    return float(a @ b / norms) if norms > 1e-12 else 0.0


# ---- direct attribution to the final residual (Fig. 6) --------------------------------------------
@dataclass
class Decomposition:
    """Direct contributions to the final residual's projection on the unit direction, at the last position, per prompt (float32)."""

    embed: torch.Tensor  # [n_prompts]  the residual entering layer 0 (embeddings incl. any scale / learned positions), projected
    heads: torch.Tensor  # [n_prompts, n_layers, n_heads]  each attention head's output through its slice of the output projection
    attn_bias: torch.Tensor  # [n_prompts, n_layers]  the attention output projection's bias (zeros where none)
    mlp: torch.Tensor  # [n_prompts, n_layers]  each MLP's output (bias included)
    total: torch.Tensor  # [n_prompts]  the final residual (last layer's output, before the final norm) projected

    def summed(self) -> torch.Tensor:
        """The sum of all terms, [n_prompts]; equals ``total`` to float tolerance."""
        return self.embed + self.heads.sum((1, 2)) + self.attn_bias.sum(1) + self.mlp.sum(1)


def check_decomposable(chat: ChatModel) -> None:
    """Refuse a model the decomposition cannot split (one attention and one dense MLP writer per layer), before any work."""
    if len(chat.writers) != 2 * chat.n_layers or any(w.weight.dim() != 2 for w in chat.writers):
        raise UnsupportedModelError(
            f"{type(chat.model).__name__} has mixture-of-experts layers, which `refusal analyze` does not support yet "
            "(the decomposition needs one attention and one dense MLP writer per layer); analyse a dense model"
        )


def decompose(chat: ChatModel, prompts: list[list[int]], direction: torch.Tensor, batch_size: int = 16) -> Decomposition:
    """Split the last position's final-residual projection on `direction` into embeddings, heads, attention biases and MLPs.

    Hooks capture each attention output projection's input (z, the concatenated head outputs),
    each writer's output (and its post-norm's output in sandwich layers), the layer-0 input and
    the last layer's output, at the last position only. Parallel-residual layers (GPT-NeoX) need
    no special case: the writers' outputs are summed either way.
    """
    check_decomposable(chat)
    unit = unit_vector(direction)
    n_heads, head_dim = chat.n_heads, chat.head_dim
    parts: dict[str, list[torch.Tensor]] = {"embed": [], "heads": [], "attn_bias": [], "mlp": [], "total": []}
    for batch in batches(prompts, batch_size):
        seen: dict[str, torch.Tensor] = {}  # name -> [batch, features] float32, last position
        with hooked(*_capture_hooks(chat, seen)):
            chat.logits(chat.pad(batch))
        heads, biases, mlps = [], [], []
        for w in chat.writers:
            v = _effective_direction(w, seen, unit)  # [batch, d_model]: what a piece of this writer's output is projected on
            if w.component == "mlp":
                mlps.append((seen[f"mlp.{w.layer}"] * v).sum(-1).cpu())  # [batch]
                continue
            z = seen[f"z.{w.layer}"].to(v.device)  # [batch, n_heads * head_dim]
            if z.shape[-1] != n_heads * head_dim:
                raise UnsupportedModelError(f"layer {w.layer}'s attention output reads {z.shape[-1]} features, not {n_heads} heads x {head_dim}")
            weight = w.weight.detach().float().to(v.device)
            per_head = (weight if w.rows else weight.T).reshape(n_heads, head_dim, -1)  # [n_heads, head_dim, d_model]: head h's rows of W_O
            read = torch.einsum("hed,bd->bhe", per_head, v)  # [batch, n_heads, head_dim]
            heads.append((z.view(-1, n_heads, head_dim) * read).sum(-1).cpu())  # [batch, n_heads]
            bias = w.bias
            biases.append((v @ bias.detach().float().to(v.device)).cpu() if bias is not None else torch.zeros(len(batch)))  # [batch]
        parts["embed"].append((seen["embed"] @ unit.to(seen["embed"].device)).cpu())
        parts["heads"].append(torch.stack(heads, dim=1))  # [batch, n_layers, n_heads]
        parts["attn_bias"].append(torch.stack(biases, dim=1))  # [batch, n_layers]
        parts["mlp"].append(torch.stack(mlps, dim=1))  # [batch, n_layers]
        parts["total"].append((seen["final"] @ unit.to(seen["final"].device)).cpu())
    out = {name: torch.cat(tensors) for name, tensors in parts.items()}
    for name, tensor in out.items():
        check_finite(tensor, f"direct attribution ({name})")
    return Decomposition(**out)


def _capture_hooks(chat: ChatModel, seen: dict[str, torch.Tensor]) -> tuple[list, list]:
    """(pre, post) hooks that store the last position's tensors into ``seen`` in float32."""

    def store(key: str, pre: bool = False) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen[key] = (args[0] if args else kwargs["hidden_states"])[:, -1].float()

        def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
            seen[key] = untuple(output)[:, -1].float()

        return pre_hook if pre else post_hook

    pre = [(chat.layers[0], store("embed", pre=True))]
    post = [(chat.layers[-1], store("final"))]
    for w in chat.writers:
        post.append((w.module, store(f"{w.component}.{w.layer}")))
        if w.component == "attn":
            pre.append((w.module, store(f"z.{w.layer}", pre=True)))
        if w.post_norm is not None:
            post.append((w.post_norm, store(f"norm.{w.component}.{w.layer}")))
    return pre, post


def _effective_direction(w: Writer, seen: dict[str, torch.Tensor], unit: torch.Tensor) -> torch.Tensor:
    """[batch, d_model] vector v with <piece, v> = the piece's projection on ``unit`` once it reaches the residual.

    Pre-norm writers add their output as is: v = unit. A post-norm maps y to norm(y) = k * gain * y
    with one scalar k per position; k = ||norm(y)|| / ||gain * y||, so v = k * gain * unit.
    """
    y = seen[f"{w.component}.{w.layer}"]  # [batch, d_model]
    if w.post_norm is None or w.gain is None:
        return unit.to(y.device).expand_as(y)
    gain = w.gain.to(y.device)
    normed = seen[f"norm.{w.component}.{w.layer}"].to(y.device)  # [batch, d_model]
    k = normed.norm(dim=-1, keepdim=True) / (gain * y).norm(dim=-1, keepdim=True).clamp_min(1e-30)  # [batch, 1]
    return k * gain * unit.to(y.device)


def top_heads(decomposition: Decomposition, k: int = 8) -> list[tuple[int, int]]:
    """(layer, head) of the k heads with the largest mean attribution toward the direction; ties go to the earlier layer, then head."""
    mean = decomposition.heads.float().mean(0)  # [n_layers, n_heads]
    ranked = sorted((-float(mean[layer, head]), layer, head) for layer in range(mean.shape[0]) for head in range(mean.shape[1]))
    return [(layer, head) for _, layer, head in ranked[: max(k, 0)]]


# ---- where the heads look ------------------------------------------------------------------------
def attention_masses(chat: ChatModel, prompts: list[SuffixedPrompt], heads: list[tuple[int, int]], batch_size: int = 16) -> torch.Tensor:
    """[n_prompts, len(heads), 3] attention of the last position (query) of each listed head on the regions suffixes.REGIONS.

    Pad positions are excluded (their mass, zero up to rounding, is dropped and each row renormalised
    to sum to 1). Prompts without a suffix give suffix mass 0. Attention probabilities need the
    eager implementation, switched on for the call and always restored.
    """
    for layer, head in heads:
        if not (0 <= layer < chat.n_layers and 0 <= head < chat.n_heads):
            raise RefusalError(f"head ({layer}, {head}) is out of range; this model has {chat.n_layers} layers of {chat.n_heads} heads")
    rows: list[torch.Tensor] = []
    with eager_attention(chat):
        for batch in batches(prompts, batch_size):
            inputs = chat.pad([p.ids for p in batch])
            length = inputs["input_ids"].shape[1]
            regions = torch.zeros(len(batch), length, len(REGIONS))  # [batch, key position, region] one-hot; pads stay all-zero
            for i, prompt in enumerate(batch):
                codes = torch.tensor([REGIONS.index(r) for r in prompt.regions])
                regions[i, length - len(codes) :] = torch.nn.functional.one_hot(codes, len(REGIONS)).float()
            with torch.inference_mode():
                out = chat.model(**inputs, use_cache=False, output_attentions=True, logits_to_keep=1)
            if not out.attentions:
                raise UnsupportedModelError(f"{type(chat.model).__name__} returns no attention probabilities under eager attention")
            if not heads:
                rows.append(torch.zeros(len(batch), 0, len(REGIONS)))
                continue
            probs = torch.stack([out.attentions[layer][:, head, -1].float().cpu() for layer, head in heads], dim=1)  # [batch, len(heads), length]
            mass = probs @ regions  # [batch, len(heads), 3]
            rows.append(mass / mass.sum(-1, keepdim=True).clamp_min(1e-30))
    masses = torch.cat(rows)
    check_finite(masses, "attention masses")
    return masses


@contextmanager
def eager_attention(chat: ChatModel) -> Iterator[None]:
    """Within the block the model runs eager attention (which returns probabilities); the previous implementation is restored after."""
    model = chat.model
    if not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError("reading attention probabilities needs model.set_attn_implementation; upgrade transformers (5.x is tested)")
    previous = _implementations(model.config)
    try:
        model.set_attn_implementation("eager")
        yield
    finally:
        model.set_attn_implementation(previous if model.config.sub_configs else previous[""])


def _implementations(config: PretrainedConfig) -> dict:
    """The attention implementation of a config and its sub-configs, as ``set_attn_implementation`` takes them ({"": own, key: nested})."""
    out: dict = {"": config._attn_implementation}
    for key in config.sub_configs:
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = _implementations(sub)
    return out
