"""The run directory: extract -> select -> export -> check, each stage reading what the last wrote.

RUN/run.json              config, versions, model id/hash, dataset hashes, timings per stage
RUN/candidates.safetensors directions, mean_harmful, mean_harmless  [n_layers + 1, n_post, d_model]
RUN/selection.json        every candidate's scores and filter reasons; the chosen one
RUN/direction.safetensors the chosen direction [d_model], layer and position in metadata
RUN/model/                the orthogonalized checkpoint (refusal run / refusal export)
RUN/report/               report.json (every number), report.md, report.html: original vs edited
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .activations import mean_activations
from .data import dataset_hash, load_corpus, load_splits
from .directions import Candidates, Direction, compute_candidates
from .edits import Orthogonalization
from .errors import RefusalError
from .export import export_model
from .interventions import ablate, add
from .model import REFUSAL_WORDS, ChatModel
from .models import load_model
from .progress import log
from .selection import SelectionConfig, score_candidates, select_direction

RUN_FORMAT = "1"
ARTIFACTS = ("run.json", "candidates.safetensors", "selection.json", "selection.partial.jsonl", "direction.safetensors", "report")


@dataclass
class RunConfig:
    model: str
    harmful: str = "builtin"
    harmless: str = "builtin"
    n_train: int | None = None  # None: the whole train split
    n_val: int = 32
    n_test: int = 32
    max_new_tokens: int = 32
    batch_size: int = 32
    kl_tokens: int = 16
    corpus: str = "builtin"
    ce_tokens: int = 2048
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
        if self.kl_tokens < 1:
            raise RefusalError(f"--kl-tokens must be at least 1 (got {self.kl_tokens})")
        if self.ce_tokens < 0:
            raise RefusalError(f"--ce-tokens must be 0 (skip the cross-entropy check) or more (got {self.ce_tokens})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
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
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".gguf") and p.name != "refusal.json")
    )
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


def check_inputs(config: RunConfig) -> None:
    """Load every input file a run needs (prompts, corpus), so bad input fails before any work."""
    run_data(config)
    if config.ce_tokens > 0:
        load_corpus(config.corpus)


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
    def create(cls, path: Path, config: RunConfig, overwrite: bool = False) -> Run:
        """Start a run directory, or reopen one with the same config (to resume)."""
        cls.check(path, config, overwrite)
        path = Path(path)
        run = cls(path)
        if (path / "run.json").exists() and run.info.get("config") == config.to_dict():
            log(f"resuming run in {path}")
            return run
        if overwrite and path.is_dir():
            for name in ARTIFACTS:
                if (path / name).is_dir():
                    shutil.rmtree(path / name)
                else:
                    (path / name).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        write_json(
            path / "run.json", {"format_version": RUN_FORMAT, "created": _timestamp(), "environment": environment(), "config": config.to_dict()}
        )
        return run

    def load_model(self) -> ChatModel:
        return load_run_model(self.config)


def load_run_model(c: RunConfig) -> ChatModel:
    return load_model(
        c.model, dtype=c.dtype, device=c.device, device_map=c.device_map, trust_remote_code=c.trust_remote_code, chat_template=c.chat_template
    )


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
    candidates = compute_candidates(
        mean_harmful,
        mean_harmless,
        {
            "created": _timestamp(),
            "model": config.model,
            "refusal_version": __version__,
            "harmful_train_sha256": dataset_hash(data["harmful_train"]),
            "harmless_train_sha256": dataset_hash(data["harmless_train"]),
            "rows": "decoder-layer inputs 0..n_layers-1, then the final residual",
            "positions": "negative offsets -n_post..-1",
        },
    )
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
    records = score_candidates(
        chat, candidates, data["harmful_val"], data["harmless_val"], refusal_ids, config.selection, cache_path=run.path / "selection.partial.jsonl"
    )
    chosen = select_direction(records)
    selection = {
        "format_version": RUN_FORMAT,
        "created": _timestamp(),
        "config": asdict(config.selection),
        "refusal_tokens": chat.tokenizer.convert_ids_to_tokens(refusal_ids),
        "chosen": chosen,
        "candidates": records,
    }
    write_json(run.path / "selection.json", selection)
    direction = Direction(
        candidates.direction(chosen["layer"], chosen["position"]),
        chosen["layer"],
        chosen["position"],
        {
            "model": config.model,
            "refusal_version": __version__,
            "fallback": chosen["fallback"],
            "harmful_train_sha256": candidates.metadata.get("harmful_train_sha256"),
            "harmless_train_sha256": candidates.metadata.get("harmless_train_sha256"),
        },
    )
    direction.save(run.path / "direction.safetensors")
    (run.path / "selection.partial.jsonl").unlink(missing_ok=True)
    run.record_time("select", time.perf_counter() - start)
    log(
        f"chosen direction: layer {chosen['layer']}, position {chosen['position']} "
        f"(bypass {chosen['bypass']:.3f}, induce {chosen['induce']:.3f}, kl {chosen['kl']:.4f}){' [yellow]FALLBACK[/]' if chosen['fallback'] else ''}"
    )
    return selection


def export(run: Run, chat: ChatModel, out: Path, overwrite: bool = False) -> dict:
    """Orthogonalize the weights along the chosen direction and write a checkpoint to ``out``."""
    direction = Direction.load(run.path / "direction.safetensors")
    info = run.info
    start = time.perf_counter()
    metadata = {
        "refusal_version": __version__,
        "created": _timestamp(),
        "source_model": info.get("model", {"source": info["config"]["model"]}),
        "direction": {"layer": direction.layer, "position": direction.position, "fallback": direction.metadata.get("fallback")},
        "datasets": info.get("datasets", {}),
        "run": str(run.path.resolve()),
        "environment": environment(),
    }
    result = export_model(chat, Orthogonalization(direction.vector), out, metadata, overwrite=overwrite)
    run.record_time("export", time.perf_counter() - start)
    return result


def evaluate(run: Run, chat: ChatModel, edited_dir: Path | None = None) -> dict:
    """Original vs ablated (hooks), activation addition, and the exported checkpoint if there is one
    -> RUN/report/report.json, report.md, report.html."""
    from .report import write_report

    direction = Direction.load(run.path / "direction.safetensors")
    edited_dir = edited_dir if edited_dir is not None else run.path / "model"
    edited = edited_dir if (edited_dir / "refusal.json").is_file() else None
    start = time.perf_counter()
    report = evaluate_edits(run.config, chat, direction, ablated=True, added=True, edited=edited, from_run=run)
    run.record_time("evaluate", time.perf_counter() - start)
    report["timings"] = run.info.get("timings", {})
    write_report(report, run.path / "report")
    return report


def evaluate_edits(
    config: RunConfig,
    chat: ChatModel,
    direction: Direction | None,
    ablated: bool = False,
    added: bool = False,
    edited: Path | None = None,
    from_run: Run | None = None,
    safety=None,
) -> dict:
    """The report dict comparing the original model with the requested edits on the test splits."""
    from .evaluation import Condition, EvalSettings, cosine_matrix, projections
    from .evaluation import evaluate as evaluate_conditions

    data = run_data(config)
    conditions = [Condition("original", chat)]
    if ablated:
        conditions.append(Condition("ablated", chat, lambda: ablate(chat, direction.vector)))
    if added:
        conditions.append(Condition("added", chat, lambda: add(chat, direction.vector, direction.layer), kinds=("harmless",)))
    edited_chat = None
    if edited is not None:
        edited_chat = load_model(str(edited), dtype=config.dtype, device=config.device, device_map=config.device_map)
        conditions.append(Condition("edited", edited_chat))
    settings = EvalSettings(
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        kl_tokens=config.kl_tokens,
        ce_max_tokens=config.ce_tokens,
        refusal_ids=chat.refusal_token_ids(config.refusal_words),
    )
    prompts = {"harmful": data["harmful_test"], "harmless": data["harmless_test"]}
    corpus = load_corpus(config.corpus) if config.ce_tokens > 0 else None
    results = evaluate_conditions(conditions, prompts, settings, corpus=corpus, safety=safety, corpus_name=config.corpus)
    del edited_chat
    report = {
        "format_version": "1",
        "created": _timestamp(),
        "refusal_version": __version__,
        "model": (from_run.info.get("model") if from_run else None) or _model_info(chat, config),
        "direction": None,
        "selection": None,
        "projections": None,
        "cosine": None,
        "settings": {
            "max_new_tokens": config.max_new_tokens,
            "judge": "substring",
            "early_stop": settings.early_stop,
            "kl_tokens": config.kl_tokens,
            "n_harmful": len(prompts["harmful"]),
            "n_harmless": len(prompts["harmless"]),
            "corpus": config.corpus if corpus else None,
            "edited": str(edited) if edited else None,
            "refusal_tokens": chat.tokenizer.convert_ids_to_tokens(settings.refusal_ids),
        },
        "datasets": {k: {"n": len(v), "sha256": dataset_hash(v)} for k, v in prompts.items()},
        "environment": environment(),
        **{k: results[k] for k in ("rates", "refusal_score", "safety", "kl", "ce_loss", "samples")},
        "completions": {
            k: [{"instruction": p, "completion": c} for p, c in zip(prompts[k.split("_")[0]], v)] for k, v in results["completions"].items()
        },
    }
    if direction is not None:
        report["direction"] = {"layer": direction.layer, "position": direction.position, "fallback": bool(direction.metadata.get("fallback"))}
        report["projections"] = projections(chat, direction, prompts["harmful"], prompts["harmless"], config.batch_size)
    if from_run is not None:
        if (from_run.path / "selection.json").is_file():
            selection = read_json(from_run.path / "selection.json", "")
            report["selection"] = {"chosen": selection["chosen"], "candidates": selection["candidates"]}
        if (from_run.path / "candidates.safetensors").is_file() and direction is not None:
            report["cosine"] = cosine_matrix(Candidates.load(from_run.path / "candidates.safetensors"), direction.position)
    return report


def summary(run: Run) -> dict:
    """The numbers a script wants from a finished run."""
    out: dict = {"run": str(run.path)}
    if (run.path / "selection.json").exists():
        out["chosen"] = read_json(run.path / "selection.json", "")["chosen"]
    if (run.path / "report" / "report.json").exists():
        report = read_json(run.path / "report" / "report.json", "")
        out["refusal_rates"] = report["rates"]
        out["kl"] = report.get("kl")
    out["timings"] = run.info.get("timings", {})
    return out


# ---- search (docs/search.md) ---------------------------------------------------------------------
def search(run: Run, chat: ChatModel, search_config) -> dict:
    """Optuna search over parametrised edits -> RUN/search.journal (the study) and RUN/search.json."""
    from .generation import HFEngine
    from .judges import REFUSAL_PHRASES, is_refusal
    from .search import Objectives, choose, confirm_points, paper_params, pareto_front, points_to_confirm, run_trials

    config = run.config
    data = run_data(config)
    candidates = Candidates.load(run.path / "candidates.safetensors")
    timings: dict = {}
    if (run.path / "selection.json").is_file():
        chosen = read_json(run.path / "selection.json", "")["chosen"]
        paper, paper_note = paper_params(chosen["layer"], chosen["position"]), "the paper's selection (selection.json)"
    else:
        layer = max(1, int(search_config.max_layer_fraction * candidates.n_layers))
        paper, paper_note = paper_params(layer, search_config.positions[0]), f"strength 1 at layer {layer} (no selection.json)"
    start = time.perf_counter()
    refusal_ids = chat.refusal_token_ids(config.refusal_words)
    objectives = Objectives(chat, data["harmful_val"], data["harmless_val"], refusal_ids, search_config)
    timings["cache_original"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()

    def progress(n: int, values: dict) -> None:
        log(f"trial {n:3d}: refusal {values['refusal']:7.3f}  KL {values['kl']:.4f}  (multi-token {values['kl_multi']:.4f})")

    records = run_trials(chat, candidates, objectives, search_config, str(run.path / "search.journal"), paper, on_trial=progress)
    timings["trials"] = round(time.perf_counter() - start, 2)
    front = pareto_front(records)
    start = time.perf_counter()
    original = HFEngine(chat, search_config.generation_batch_size, description="original (harmless val)").generate(
        data["harmless_val"], config.max_new_tokens, is_refusal
    )
    harmless_original = sum(is_refusal(t) for t in original)
    confirmed = confirm_points(
        chat,
        candidates,
        points_to_confirm(front, search_config),
        data["harmful_val"],
        data["harmless_val"],
        config.max_new_tokens,
        search_config.generation_batch_size,
        REFUSAL_PHRASES,
    )
    chosen, rule = choose(confirmed, search_config, harmless_original)
    timings["confirm"] = round(time.perf_counter() - start, 2)
    result = {
        "format_version": RUN_FORMAT,
        "created": _timestamp(),
        "config": search_config.to_dict(),
        "objectives": {
            "refusal": "mean over harmful val prompts of the max refusal log-odds over the first "
            f"{search_config.refusal_positions} response positions (teacher-forced), "
            f"each at least {search_config.refusal_floor}",
            "kl": "first-token KL on harmless val prompts",
            "kl_multi": f"KL averaged over {search_config.kl_tokens} tokens",
        },
        "paper_trial": {"trial": records[0]["trial"] if records else None, "what": paper_note},
        "harmless_original_refused": harmless_original,
        "n_val": {"harmful": len(data["harmful_val"]), "harmless": len(data["harmless_val"])},
        "trials": records,
        "front": [p["trial"] for p in front],
        "confirmed": confirmed,
        "chosen": {"trial": chosen["trial"], "rule": rule},
        "timings": timings,
    }
    write_json(run.path / "search.json", result)
    for stage_name, seconds in timings.items():
        run.record_time(f"search_{stage_name}", seconds)
    return result


def export_trial(run: Run, chat: ChatModel, trial: int, out: Path, overwrite: bool = False) -> dict:
    """Export one search trial's edit as a checkpoint (fidelity-checked against the edit in memory)."""
    from .edits import EditParams, KernelEdit

    search_info = read_json(run.path / "search.json", "run `refusal search` first")
    record = next((t for t in search_info["trials"] if t["trial"] == trial), None)
    if record is None:
        known = ", ".join(str(t) for t in search_info.get("front", []))
        raise RefusalError(f"trial {trial} is not a finished trial of {run.path}; front trials: {known}")
    candidates = Candidates.load(run.path / "candidates.safetensors")
    params = EditParams.from_dict(record["params"])
    params.validate(candidates.n_layers, candidates.n_post)  # search.json may have been edited by hand
    edit = KernelEdit.from_candidates(candidates, params)
    start = time.perf_counter()
    metadata = {
        "refusal_version": __version__,
        "created": _timestamp(),
        "source_model": run.info.get("model", {"source": run.config.model}),
        "search_trial": {"trial": trial, "params": record["params"], "refusal": record["refusal"], "kl": record["kl"]},
        "datasets": run.info.get("datasets", {}),
        "run": str(run.path.resolve()),
        "environment": environment(),
    }
    result = export_model(chat, edit, out, metadata, overwrite=overwrite)
    run.record_time("export", time.perf_counter() - start)
    return result


def search_summary(result: dict) -> dict:
    """The part of search.json the report shows: every trial's objectives, the front, the confirmations."""
    return {
        "trials": [{k: t[k] for k in ("trial", "refusal", "kl", "kl_multi")} for t in result["trials"]],
        "front": result["front"],
        "chosen": result["chosen"],
        "paper_trial": result["paper_trial"],
        "confirmed": [{"trial": p["trial"], "refusal": p["refusal"], "kl": p["kl"], **p["confirmed"]} for p in result["confirmed"]],
    }
