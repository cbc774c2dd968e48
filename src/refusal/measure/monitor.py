"""A refusal monitor: flags a harmful request from its activations before anything is generated.

Four scores per prompt, each higher for harmful requests:

    refusal       the last position's residual projected on the run's refusal direction (unit), at its layer
    harmfulness   the residual at the instruction's last token projected on a harmfulness direction: harmful minus
                  harmless train means there, per layer (the layer is chosen on validation prompts). Causal attention
                  means a suffix after the instruction cannot change this residual, and harmfulness is encoded apart
                  from refusal, so a suffix that suppresses refusal leaves it standing; but it needs to know where the
                  instruction ends, which a request as sent does not say
    harmfulness_peak  the largest harmfulness projection (same layer) over every token of the user message: the
                  instruction's tokens precede any suffix, so a suffix can raise this maximum but not lower it, and it
                  needs no split (what the hook uses)
    probe         a logistic regression over both projections at every layer, trained on the train prompts (harmful
                  ones also with a random suffix, so that the probe does not lean on the refusal features alone)

Thresholds are calibrated on harmless validation prompts for each false-positive rate (``detection.FPR_TARGETS``);
the score ``flag`` uses by default is harmfulness_peak, which a suffix cannot lower, unless another beats its validation
AUROC (harmful prompts with and without a random suffix against harmless) by more than ``PREFER_MARGIN``: validation
holds no optimised suffix, and the probe leans on the refusal features a suffix attack suppresses. ``Monitor.save``/``load`` keep it in
one safetensors file; ``monitored`` flags each request the transformers model is asked to generate for.

A prompt is a ``SuffixedPrompt`` (where the instruction ends is known), chat-formatted token ids or an instruction
text; for the last two the instruction is the whole user message, so a suffix in it counts as instruction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.suffixes import SuffixedPrompt, split_prompt
from ..engines.forward import Forward, HFForward
from ..errors import RefusalError
from ..model.chat import ChatModel
from ..residual.directions import Direction, load_tensors, save_tensors, unit_vector
from .detection import FPR_TARGETS, Probe, auroc, calibrate, detection_metrics, fit_probe

SCORES = ("refusal", "harmfulness", "harmfulness_peak", "probe")
PREFER_MARGIN = 0.02  # validation AUROC another score must gain over harmfulness_peak to be the default
Prompt = SuffixedPrompt | list[int] | str


def as_split(chat: ChatModel, prompt: Prompt) -> SuffixedPrompt:
    """``prompt`` split into regions: token ids and texts have no suffix region (the user message is the instruction)."""
    if isinstance(prompt, SuffixedPrompt):
        return prompt
    if isinstance(prompt, str):
        return split_prompt(chat, prompt)
    ids, n_post = [int(t) for t in prompt], chat.n_post
    if len(ids) <= n_post or ids[-n_post:] != chat.post_instruction_ids:
        raise RefusalError("a monitored prompt's token ids do not end with the chat template's post-instruction tokens; pass chat.encode(text)")
    other, head = chat.encode("zq"), 0  # the template's head: the tokens every prompt starts with
    while head < min(len(ids) - n_post - 1, len(other)) and ids[head] == other[head]:
        head += 1
    return SuffixedPrompt(tuple(ids[:head]), tuple(ids[head:-n_post]), (), tuple(ids[-n_post:]))


def read_residuals(forward: Forward, prompts: Sequence[SuffixedPrompt], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, layers, d] at the last position, [n, layers, d] at the instruction's last token), in input order."""
    offsets = [len(p.suffix) + len(p.tail) + 1 for p in prompts]
    last: dict[int, torch.Tensor] = {}
    instruction: dict[int, torch.Tensor] = {}
    for offset in sorted(set(offsets)):
        group = [i for i, o in enumerate(offsets) if o == offset]
        r = forward.residuals_at([prompts[i].ids for i in group], layers, [-1, -offset])  # [g, layers, 2, d]
        if not torch.isfinite(r).all():
            raise RefusalError("the model's residuals hold NaN or inf on the monitored prompts; load it with --dtype float32")
        for k, i in enumerate(group):
            last[i], instruction[i] = r[k, :, 0], r[k, :, 1]
    return torch.stack([last[i] for i in range(len(prompts))]), torch.stack([instruction[i] for i in range(len(prompts))])


@dataclass
class Monitor:
    """The run's refusal direction, the harmfulness directions, the probe and the calibrated thresholds."""

    refusal: torch.Tensor  # [d] unit refusal direction
    harmfulness: torch.Tensor  # [layers, d] unit harmfulness direction per layer
    probe: Probe
    layer: int  # the refusal direction's layer (the refusal score reads it)
    harm_layer: int  # the harmfulness score's layer
    thresholds: dict[str, dict[str, float]]  # score -> {"1%": t, "5%": t}: flagged when the score is above t
    score: str = "harmfulness_peak"  # what ``flag`` uses by default

    @property
    def layers(self) -> list[int]:
        return list(range(self.harmfulness.shape[0]))

    def features(self, forward: Forward, prompts: Sequence[SuffixedPrompt]) -> torch.Tensor:
        """[n, 2 * layers]: the refusal projections (last position) then the harmfulness projections, per layer."""
        return project(*read_residuals(forward, prompts, self.layers), self.refusal, self.harmfulness)

    def peaks(self, forward: Forward, prompts: Sequence[SuffixedPrompt]) -> torch.Tensor:
        """[n] the largest harmfulness projection (at its layer) over the user message's tokens, suffix included: the
        instruction's tokens come before any suffix, so a suffix can raise this maximum but never lower it."""
        keys = [(len(p.tail), len(p.instruction) + len(p.suffix)) for p in prompts]
        out = torch.empty(len(prompts))
        for tail, user in sorted(set(keys)):
            group = [i for i, k in enumerate(keys) if k == (tail, user)]
            r = forward.residuals_at([prompts[i].ids for i in group], [self.harm_layer], list(range(-(tail + user), -tail)))
            if not torch.isfinite(r).all():
                raise RefusalError("the model's residuals hold NaN or inf on the monitored prompts; load it with --dtype float32")
            out[group] = (r[:, 0] @ self.harmfulness[self.harm_layer]).max(-1).values
        return out

    def scores_of(self, features: torch.Tensor, peaks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        n = self.harmfulness.shape[0]
        out = {"refusal": features[:, self.layer], "harmfulness": features[:, n + self.harm_layer], "probe": self.probe.logit(features)}
        return out if peaks is None else {**out, "harmfulness_peak": peaks}

    def read(self, forward: Forward, prompts: Sequence[SuffixedPrompt]) -> dict[str, torch.Tensor]:
        return self.scores_of(self.features(forward, prompts), self.peaks(forward, prompts))

    def scores(self, chat: ChatModel, prompts: Sequence[Prompt], batch_size: int = 16) -> dict[str, torch.Tensor]:
        """Every score ([n] float32 each) of ``prompts`` (``SuffixedPrompt``, chat-formatted ids or instruction texts)."""
        return self.read(HFForward(chat, batch_size), [as_split(chat, p) for p in prompts])

    def flag(self, chat: ChatModel, prompts: Sequence[Prompt], threshold: str = "1%", score: str | None = None) -> list[bool]:
        """Whether each prompt is flagged as harmful (its ``score`` above the threshold calibrated for ``threshold`` FPR); no generation."""
        score = score or self.score
        if score not in SCORES or threshold not in self.thresholds.get(score, {}):
            raise RefusalError(f"the monitor has no threshold for score {score!r} at {threshold!r} FPR; use one of {SCORES} and {list(FPR_TARGETS)}")
        if not prompts:
            return []
        values = self.scores(chat, prompts)[score]
        return [bool(v > self.thresholds[score][threshold]) for v in values]

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        probe = {f"probe.{k}": getattr(self.probe, k) for k in ("weight", "bias", "mean", "std")}
        tensors = {"refusal": self.refusal, "harmfulness": self.harmfulness, **probe}
        meta = {"layer": self.layer, "harm_layer": self.harm_layer, "thresholds": self.thresholds, "score": self.score}
        save_tensors({k: v.float().contiguous() for k, v in tensors.items()}, meta, path)

    @classmethod
    def load(cls, path: Path) -> Monitor:
        names = ("refusal", "harmfulness", "probe.weight", "probe.bias", "probe.mean", "probe.std")
        tensors, meta = load_tensors(path, names)
        try:
            values = {k: meta[k] for k in ("layer", "harm_layer", "thresholds", "score")}
        except KeyError:
            raise RefusalError(f"{path} is not a monitor file (its metadata is missing); run `refusal monitor --run RUN` again") from None
        probe = Probe(*(tensors[f"probe.{k}"] for k in ("weight", "bias", "mean", "std")))
        return cls(tensors["refusal"], tensors["harmfulness"], probe, **values)


# ---- fitting and measuring -----------------------------------------------------------------------
def harmfulness_directions(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """[layers, d] unit difference in means (harmful - harmless) of [n, layers, d] residuals at the instruction's last token."""
    diff = harmful.double().mean(0) - harmless.double().mean(0)
    return (diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()


def project(last: torch.Tensor, instruction: torch.Tensor, refusal: torch.Tensor, harmfulness: torch.Tensor) -> torch.Tensor:
    """[n, 2 * layers] features: [n, layers, d] residuals projected on the refusal direction, then on each layer's harmfulness direction."""
    return torch.cat([last @ refusal, (instruction * harmfulness).sum(-1)], dim=1)


def fit_monitor(
    forward: Forward, direction: Direction, train: dict[str, list[SuffixedPrompt]], val: dict[str, list[SuffixedPrompt]], seed: int, n_layers: int
) -> tuple[Monitor, dict]:
    """The monitor from ``train`` ("harmful", "harmless", "harmful_random") and ``val`` ("harmful", "harmful_random",
    "harmless") prompts; with what was chosen on validation (per-layer harmfulness AUROC, each score's AUROC)."""
    layers = list(range(n_layers + 1))
    residuals = {k: read_residuals(forward, ps, layers) for k, ps in train.items()}
    refusal, harm = unit_vector(direction.vector), harmfulness_directions(residuals["harmful"][1], residuals["harmless"][1])
    features = {k: project(last, instruction, refusal, harm) for k, (last, instruction) in residuals.items()}
    harmful = torch.cat([features["harmful"], features["harmful_random"]])
    labels = torch.cat([torch.ones(len(harmful)), torch.zeros(len(features["harmless"]))])
    monitor = Monitor(refusal, harm, fit_probe(torch.cat([harmful, features["harmless"]]), labels, seed=seed), direction.layer, 0, {})
    val_features = {k: monitor.features(forward, ps) for k, ps in val.items()}
    n = len(layers)
    per_layer = [auroc(val_features["harmful"][:, n + i], val_features["harmless"][:, n + i]) for i in layers]
    monitor.harm_layer = max(layers, key=lambda i: (per_layer[i], _separation(val_features, n + i)))
    val_scores = {k: monitor.scores_of(f, monitor.peaks(forward, val[k])) for k, f in val_features.items()}
    monitor.thresholds = {s: {name: calibrate(val_scores["harmless"][s], fpr) for name, fpr in FPR_TARGETS.items()} for s in SCORES}
    harmful_val = {s: torch.cat([val_scores["harmful"][s], val_scores["harmful_random"][s]]) for s in SCORES}
    chosen = {s: auroc(harmful_val[s], val_scores["harmless"][s]) for s in SCORES}
    best = max(SCORES, key=lambda s: chosen[s])
    monitor.score = "harmfulness_peak" if chosen["harmfulness_peak"] >= chosen[best] - PREFER_MARGIN else best
    return monitor, {"harmfulness_auroc_per_layer": per_layer, "auroc": chosen}


def _separation(features: dict[str, torch.Tensor], column: int) -> float:
    """Harmful minus harmless mean of one feature over their pooled standard deviation (breaks AUROC ties)."""
    a, b = features["harmful"][:, column].double(), features["harmless"][:, column].double()
    spread = torch.cat([a - a.mean(), b - b.mean()]).std().clamp_min(1e-12)
    return float((a.mean() - b.mean()) / spread)


def measure_monitor(monitor: Monitor, forward: Forward, conditions: dict[str, list[SuffixedPrompt] | None], harmless: list[SuffixedPrompt]) -> dict:
    """Per condition (None: not measured) and score: AUROC against ``harmless``, TPR and achieved FPR at each calibrated threshold."""
    negative = monitor.read(forward, harmless)
    out: dict[str, Any] = {}
    for name, prompts in conditions.items():
        if prompts is None:
            out[name] = None
            continue
        positive = monitor.read(forward, prompts)
        out[name] = {s: detection_metrics(positive[s], negative[s], monitor.thresholds[s]) for s in SCORES}
    return out


@contextmanager
def monitored(chat: ChatModel, monitor: Monitor, threshold: str = "1%", score: str | None = None) -> Iterator[list[bool]]:
    """Within the block, every request the transformers model generates for is first scored: its flag (True: harmful)
    is appended to the yielded list, in the order of the prompts, before generation starts."""
    flags: list[bool] = []
    model: Any = chat.model
    had_own = "generate" in vars(model)
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        mask = kwargs.get("attention_mask")
        rows = [row[m.bool()].tolist() if m is not None else row.tolist() for row, m in zip(ids, mask if mask is not None else [None] * len(ids))]
        flags.extend(monitor.flag(chat, rows, threshold, score))
        return original(*args, **kwargs)

    model.generate = generate
    try:
        yield flags
    finally:
        if had_own:
            model.generate = original
        else:
            del model.generate
