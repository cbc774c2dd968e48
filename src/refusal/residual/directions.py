"""Candidate refusal directions (difference in means) and how they are stored.

``candidates.safetensors`` holds ``directions``, ``mean_harmful`` and ``mean_harmless``, each
[n_layers + 1, n_post, d_model] (row ``n_layers`` is the final residual). ``direction.safetensors``
holds one ``direction`` [d_model] with its layer and position in the metadata. Positions are
negative offsets from the end of the prompt (-1 is the last template token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import RefusalError, check_finite

FORMAT_VERSION = "1"


@dataclass
class Candidates:
    mean_harmful: torch.Tensor
    mean_harmless: torch.Tensor
    metadata: dict = field(default_factory=dict)

    @property
    def directions(self) -> torch.Tensor:
        return self.mean_harmful - self.mean_harmless

    @property
    def n_layers(self) -> int:
        """Decoder layers (the tensors carry one more row: the final residual)."""
        return self.mean_harmful.shape[0] - 1

    @property
    def n_post(self) -> int:
        return self.mean_harmful.shape[1]

    def direction(self, layer: int, position: int) -> torch.Tensor:
        """Raw (unnormalised) candidate at decoder-layer input ``layer`` and negative ``position``."""
        if not -self.n_post <= position < 0:
            raise RefusalError(f"position {position} is out of range; use -1 .. -{self.n_post}")
        if not 0 <= layer <= self.n_layers:
            raise RefusalError(f"layer {layer} is out of range; use 0 .. {self.n_layers}")
        return self.directions[layer, self.n_post + position].clone()

    def save(self, path: Path) -> None:
        tensors = {
            "directions": self.directions.contiguous(),
            "mean_harmful": self.mean_harmful.contiguous(),
            "mean_harmless": self.mean_harmless.contiguous(),
        }
        save_tensors(tensors, self.metadata, path)

    @classmethod
    def load(cls, path: Path) -> Candidates:
        tensors, metadata = load_tensors(path, ("mean_harmful", "mean_harmless"))
        return cls(tensors["mean_harmful"], tensors["mean_harmless"], metadata)


def compute_candidates(mean_harmful: torch.Tensor, mean_harmless: torch.Tensor, metadata: dict | None = None) -> Candidates:
    if mean_harmful.shape != mean_harmless.shape:
        raise RefusalError(f"harmful and harmless means differ in shape: {tuple(mean_harmful.shape)} vs {tuple(mean_harmless.shape)}")
    check_finite(mean_harmful, "mean harmful activations")
    check_finite(mean_harmless, "mean harmless activations")
    return Candidates(mean_harmful.float(), mean_harmless.float(), dict(metadata or {}))


@dataclass
class Direction:
    """One refusal direction: the raw difference in means at (layer, position)."""

    vector: torch.Tensor
    layer: int
    position: int
    metadata: dict = field(default_factory=dict)

    @property
    def unit(self) -> torch.Tensor:
        return unit_vector(self.vector)

    def save(self, path: Path) -> None:
        meta = {**self.metadata, "layer": self.layer, "position": self.position}
        save_tensors({"direction": self.vector.float().contiguous()}, meta, path)

    @classmethod
    def load(cls, path: Path) -> Direction:
        tensors, meta = load_tensors(path, ("direction",))
        for key in ("layer", "position"):
            if key not in meta:
                raise RefusalError(f"{path}: metadata has no {key!r}; re-run `refusal select` to write a complete direction file")
        layer, position = int(meta.pop("layer")), int(meta.pop("position"))
        return cls(tensors["direction"], layer, position, meta)


def unit_vector(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` as a float32 unit vector; an error if it is zero or not finite."""
    v = vector.detach().float()
    check_finite(v, "direction")
    norm = v.norm()
    if norm < 1e-8:
        raise RefusalError("the direction is zero (harmful and harmless means coincide there); choose another layer/position")
    return v / norm


def save_tensors(tensors: dict, metadata: dict, path: Path) -> None:
    """Tensors + JSON metadata (with this module's format version) to safetensors, atomically."""
    path = Path(path)
    meta = {"format_version": FORMAT_VERSION, **{k: json.dumps(v) for k, v in metadata.items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_tensors(path: Path, required: tuple[str, ...]) -> tuple[dict, dict]:
    """Tensors and metadata written by ``save_tensors``; one-line errors for a missing, foreign or other-version file."""
    path = Path(path)
    if not path.is_file():
        raise RefusalError(f"{path} does not exist; run the stage that writes it first")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            missing = [k for k in required if k not in keys]
            tensors = {k: f.get_tensor(k) for k in keys if not missing}
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise RefusalError(
            f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:200]}); delete it and re-run the stage that writes it"
        ) from None
    if missing:
        raise RefusalError(f"{path} lacks tensor(s) {', '.join(missing)}; it was not written by refusal")
    version = metadata.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise RefusalError(f"{path} has format version {version!r}; this refusal reads version {FORMAT_VERSION}")
    try:
        return tensors, {k: json.loads(v) for k, v in metadata.items()}
    except json.JSONDecodeError:
        raise RefusalError(f"{path} has unreadable metadata; it was not written by refusal") from None
