"""The run directory: extract -> select -> export -> check, each stage reading what the last wrote.

RUN/run.json              config, versions, model id/hash, dataset hashes, timings per stage
RUN/candidates.safetensors directions, mean_harmful, mean_harmless  [n_layers + 1, n_post, d_model]
RUN/selection.json        every candidate's scores and filter reasons; the chosen one
RUN/direction.safetensors the chosen direction [d_model], layer and position in metadata
RUN/model/                the orthogonalized checkpoint (refusal run / refusal export)
RUN/evaluation.json       before/after refusal rates and completions on the test split
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .activations import mean_activations
from .data import dataset_hash, load_splits
from .directions import Candidates, Direction, compute_candidates
from .errors import RefusalError
from .export import export_model
from .generation import generate
from .interventions import ablate
from .judges import refusal_rate
from .model import REFUSAL_WORDS, ChatModel, load_model
from .progress import log
from .selection import SelectionConfig, score_candidates, select_direction

RUN_FORMAT = "1"
ARTIFACTS = ("run.json", "candidates.safetensors", "selection.json", "selection.partial.jsonl", "direction.safetensors", "evaluation.json")


@dataclass
class RunConfig:
    model: str
    harmful: str = "builtin"
    harmless: str = "builtin"
    n_train: int | None = None  # None: the whole train split
    n_val: int = 32
    n_test: int = 32
    max_new_tokens: int = 32
    batch_size: int = 16
    refusal_words: list[str] = field(default_factory=lambda: list(REFUSAL_WORDS))
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    chat_template: str | None = None
    seed: int = 0
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def validate(self) -> None:
        for name in ("n_val", "n_test", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise RefusalError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.n_train is not None and self.n_train < 1:
            raise RefusalError(f"--n-train must be at least 1 (got {self.n_train})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = dict(data)
        data["selection"] = SelectionConfig(**data.get("selection", {}))
        return cls(**data)


# ---- small helpers -----------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RefusalError(f"{path} does not exist; {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RefusalError(f"{path} is not valid JSON ({e.msg}); delete it and re-run the stage") from None


def model_fingerprint(source: str) -> dict:
    """sha256 over a local checkpoint's config and weight files, or the hub commit for hub ids."""
    path = Path(source).expanduser()
    if not path.exists():
        return {"source": source, "sha256": None}
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".gguf") and p.name != "refusal.json")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return {"source": source, "sha256": digest.hexdigest()}


def _timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment() -> dict:
    import transformers

    return {"refusal": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


# ---- data --------------------------------------------------------------------------------------
def run_data(config: RunConfig) -> dict[str, list[str]]:
    """The six instruction lists of a run, capped to the configured sizes."""
    out = {}
    for kind, spec in (("harmful", config.harmful), ("harmless", config.harmless)):
        splits = load_splits(spec, kind, config.seed)
        caps = {"train": config.n_train, "val": config.n_val, "test": config.n_test}
        for split, items in splits.items():
            cap = caps[split]
            out[f"{kind}_{split}"] = items[:cap] if cap is not None else items
            if not out[f"{kind}_{split}"]:
                raise RefusalError(f"the {split} split of the {kind} prompts ({spec}) is empty; give more prompts")
    return out


# ---- the run directory ------------------------------------------------------------------------
class Run:
    """A run directory and its run.json."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def info(self) -> dict:
        return read_json(self.path / "run.json", f"{self.path} is not a run directory; create one with `refusal extract` or `refusal run`")

    def update(self, **fields) -> dict:
        info = self.info
        info.update(fields)
        write_json(self.path / "run.json", info)
        return info

    def record_time(self, stage: str, seconds: float) -> None:
        info = self.info
        info.setdefault("timings", {})[stage] = round(seconds, 2)
        write_json(self.path / "run.json", info)

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.info["config"])

    @staticmethod
    def check(path: Path, config: RunConfig, overwrite: bool = False) -> None:
        """Raise if ``path`` cannot hold a run with ``config`` (no side effects)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RefusalError(f"run directory {path} is a file; choose a directory path")
        if overwrite or not path.is_dir():
            return
        if (path / "run.json").exists():
            if Run(path).info.get("config") != config.to_dict():
                raise RefusalError(f"run directory {path} holds a run with another config; choose another --out or pass --overwrite")
        elif any(path.iterdir()):
            raise RefusalError(f"run directory {path} is not empty; choose another --out or pass --overwrite")

    @classmethod
    def create(cls, path: Path, config: RunConfig, overwrite: bool = False) -> "Run":
        """Start a run directory, or reopen one with the same config (to resume)."""
        cls.check(path, config, overwrite)
        path = Path(path)
        run = cls(path)
        if (path / "run.json").exists() and run.info.get("config") == config.to_dict():
            log(f"resuming run in {path}")
            return run
        if overwrite and path.is_dir():
            for name in ARTIFACTS:
                (path / name).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / "run.json", {"format_version": RUN_FORMAT, "created": _timestamp(), "environment": environment(), "config": config.to_dict()})
        return run

    def load_model(self) -> ChatModel:
        return load_run_model(self.config)


def load_run_model(c: RunConfig) -> ChatModel:
    return load_model(c.model, dtype=c.dtype, device=c.device, device_map=c.device_map, trust_remote_code=c.trust_remote_code, chat_template=c.chat_template)


def _model_info(chat: ChatModel, config: RunConfig) -> dict:
    from .models import resolve_model

    return {
        **model_fingerprint(resolve_model(config.model)),
        "source": config.model,
        "class": type(chat.model).__name__,
        "dtype": str(chat.dtype).replace("torch.", ""),
        "n_layers": chat.n_layers,
        "d_model": chat.d_model,
        "post_instruction_tokens": chat.tokenizer.convert_ids_to_tokens(chat.post_instruction_ids),
        "refusal_tokens": chat.tokenizer.convert_ids_to_tokens(chat.refusal_token_ids(config.refusal_words)),
    }


# ---- stages ----------------------------------------------------------------------------------
def extract(run: Run, chat: ChatModel) -> Candidates:
    """Difference-in-means candidates from the train splits -> candidates.safetensors."""
    config = run.config
    data = run_data(config)
    start = time.perf_counter()
    log(f"post-instruction tokens: {chat.tokenizer.convert_ids_to_tokens(chat.post_instruction_ids)}")
    mean_harmful = mean_activations(chat, data["harmful_train"], config.batch_size, "harmful activations")
    mean_harmless = mean_activations(chat, data["harmless_train"], config.batch_size, "harmless activations")
    candidates = compute_candidates(mean_harmful, mean_harmless, {
        "created": _timestamp(), "model": config.model, "refusal_version": __version__,
        "harmful_train_sha256": dataset_hash(data["harmful_train"]), "harmless_train_sha256": dataset_hash(data["harmless_train"]),
        "rows": "decoder-layer inputs 0..n_layers-1, then the final residual", "positions": "negative offsets -n_post..-1",
    })
    candidates.save(run.path / "candidates.safetensors")
    run.update(model=_model_info(chat, config), datasets={k: {"n": len(v), "sha256": dataset_hash(v)} for k, v in data.items()})
    run.record_time("extract", time.perf_counter() - start)
    return candidates


def select(run: Run, chat: ChatModel) -> dict:
    """Score candidates on the validation splits -> selection.json and direction.safetensors."""
    config = run.config
    data = run_data(config)
    candidates = Candidates.load(run.path / "candidates.safetensors")
    start = time.perf_counter()
    refusal_ids = chat.refusal_token_ids(config.refusal_words)
    records = score_candidates(chat, candidates, data["harmful_val"], data["harmless_val"], refusal_ids, config.selection, cache_path=run.path / "selection.partial.jsonl")
    chosen = select_direction(records)
    selection = {
        "format_version": RUN_FORMAT, "created": _timestamp(), "config": asdict(config.selection),
        "refusal_tokens": chat.tokenizer.convert_ids_to_tokens(refusal_ids), "chosen": chosen, "candidates": records,
    }
    write_json(run.path / "selection.json", selection)
    direction = Direction(candidates.direction(chosen["layer"], chosen["position"]), chosen["layer"], chosen["position"], {
        "model": config.model, "refusal_version": __version__, "fallback": chosen["fallback"],
        "harmful_train_sha256": candidates.metadata.get("harmful_train_sha256"), "harmless_train_sha256": candidates.metadata.get("harmless_train_sha256"),
    })
    direction.save(run.path / "direction.safetensors")
    (run.path / "selection.partial.jsonl").unlink(missing_ok=True)
    run.record_time("select", time.perf_counter() - start)
    log(f"chosen direction: layer {chosen['layer']}, position {chosen['position']} "
        f"(bypass {chosen['bypass']:.3f}, induce {chosen['induce']:.3f}, kl {chosen['kl']:.4f}){' [yellow]FALLBACK[/]' if chosen['fallback'] else ''}")
    return selection


def export(run: Run, chat: ChatModel, out: Path, overwrite: bool = False) -> dict:
    """Orthogonalize the weights along the chosen direction and write a checkpoint to ``out``."""
    direction = Direction.load(run.path / "direction.safetensors")
    info = run.info
    start = time.perf_counter()
    metadata = {
        "refusal_version": __version__, "created": _timestamp(), "source_model": info.get("model", {"source": info["config"]["model"]}),
        "direction": {"layer": direction.layer, "position": direction.position, "fallback": direction.metadata.get("fallback")},
        "datasets": info.get("datasets", {}), "run": str(run.path.resolve()), "environment": environment(),
    }
    result = export_model(chat, direction.vector, out, metadata, overwrite=overwrite)
    run.record_time("export", time.perf_counter() - start)
    return result


def evaluate_quick(run: Run, chat: ChatModel) -> dict:
    """Greedy completions on the test splits, unedited vs ablated; substring refusal judge."""
    config = run.config
    data = run_data(config)
    direction = Direction.load(run.path / "direction.safetensors")
    start = time.perf_counter()
    results: dict = {"max_new_tokens": config.max_new_tokens, "judge": "substring", "rates": {}, "completions": {}}
    for condition in ("original", "ablated"):
        for kind in ("harmful", "harmless"):
            prompts = data[f"{kind}_test"]
            with ablate(chat, direction.vector) if condition == "ablated" else nullcontext():
                completions = generate(chat, prompts, config.max_new_tokens, config.batch_size, f"{kind} ({condition})")
            refused, total = refusal_rate(completions)
            results["rates"][f"{kind}_{condition}"] = {"refused": refused, "total": total, "rate": refused / total}
            results["completions"][f"{kind}_{condition}"] = [{"instruction": p, "completion": c} for p, c in zip(prompts, completions)]
    write_json(run.path / "evaluation.json", results)
    run.record_time("evaluate", time.perf_counter() - start)
    return results


def summary(run: Run) -> dict:
    """The numbers a script wants from a finished run."""
    out: dict = {"run": str(run.path)}
    if (run.path / "selection.json").exists():
        out["chosen"] = read_json(run.path / "selection.json", "")["chosen"]
    if (run.path / "evaluation.json").exists():
        out["refusal_rates"] = read_json(run.path / "evaluation.json", "")["rates"]
    out["timings"] = run.info.get("timings", {})
    return out
