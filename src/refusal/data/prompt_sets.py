"""Instruction sets: the built-in harmful/harmless prompts, user files and Hugging Face datasets.

Every loader returns a plain ``list[str]`` of instructions, validated: empty sets and empty items
are errors, duplicates are dropped with a warning, over-long items are errors.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..common.progress import log
from ..errors import RefusalError

KINDS = ("harmful", "harmless")
SPLITS = ("train", "val", "test")
MAX_CHARS = 4000  # longer instructions are almost surely a wrong column or file


@dataclass(frozen=True)
class Prompt:
    instruction: str
    category: str
    split: str


def builtin_prompts(kind: str) -> list[Prompt]:
    """The project's own prompt set ``kind`` ('harmful' or 'harmless') with fixed splits."""
    if kind not in KINDS:
        raise RefusalError(f"unknown built-in prompt set {kind!r}; choose one of {', '.join(KINDS)}")
    text = resources.files("refusal").joinpath("prompts").joinpath(f"{kind}.jsonl").read_text(encoding="utf-8")
    return [Prompt(**json.loads(line)) for line in text.splitlines() if line.strip()]


def load_builtin(kind: str, split: str | None = None) -> list[str]:
    """Instructions of a built-in set, optionally one split."""
    if split is not None and split not in SPLITS:
        raise RefusalError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [p.instruction for p in builtin_prompts(kind) if split is None or p.split == split]


def load_prompts(source: str, name: str = "prompts") -> list[str]:
    """Load instructions from a file (.json, .jsonl, .csv, .txt) or ``hf:owner/name[:split][#column]``."""
    if source.startswith("builtin:"):
        kind, _, split = source[len("builtin:") :].partition(":")
        return load_builtin(kind, split or None)
    if source.startswith("hf:"):
        items = _load_hf(source)
    else:
        items = _load_file(Path(source))
    return validate_instructions(items, f"{name} ({source})")


def validate_instructions(items: list, what: str) -> list[str]:
    """Check a list of instructions; return it without duplicates (order kept)."""
    if not items:
        raise RefusalError(f"{what} is empty; give at least one instruction")
    seen: set[str] = set()
    out: list[str] = []
    duplicates = 0
    for i, item in enumerate(items, 1):
        if not isinstance(item, str):
            raise RefusalError(f"{what}: item {i} is a {type(item).__name__}, not text; give one instruction string per item")
        text = item.strip()
        if not text:
            raise RefusalError(f"{what}: item {i} is empty; remove it or fill it in")
        if len(text) > MAX_CHARS:
            raise RefusalError(f"{what}: item {i} has {len(text)} characters (limit {MAX_CHARS}); check the column/field you chose, or shorten it")
        if text in seen:
            duplicates += 1
            continue
        seen.add(text)
        out.append(text)
    if duplicates:
        log(f"[yellow]warning:[/] {what}: dropped {duplicates} duplicate instruction(s)")
    return out


_TEXT_FIELDS = ("instruction", "prompt", "goal", "text", "question", "behavior")


def _pick_field(record: dict, where: str) -> str:
    for key in _TEXT_FIELDS:
        if key in record:
            return record[key]
    raise RefusalError(f"{where}: no instruction field; name it one of {', '.join(_TEXT_FIELDS)} (fields found: {', '.join(map(str, record))})")


def _load_file(path: Path) -> list:
    if not path.exists():
        raise RefusalError(f"prompt file {path} does not exist; check the path")
    if path.is_dir():
        raise RefusalError(f"prompt file {path} is a directory; give one .txt, .json, .jsonl or .csv file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RefusalError(f"prompt file {path} is not UTF-8 text ({e}); save it as UTF-8") from None
    if suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    if suffix in (".jsonl", ".json"):
        return [r if isinstance(r, str) else _pick_field(r, f"{path}[{i}]") if isinstance(r, dict) else r for i, r in enumerate(_records(path, text))]
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        return [_pick_field(row, f"{path}:{i + 2}") for i, row in enumerate(rows)]
    raise RefusalError(f"prompt file {path}: unknown format {suffix or '(no suffix)'}; use .txt, .json, .jsonl or .csv")


def _records(path: Path, text: str | None = None) -> list:
    """The items of a .json list or of a .jsonl file (one JSON value per line)."""
    text = path.read_text(encoding="utf-8") if text is None else text
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RefusalError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); give a list of strings or objects") from None
        if not isinstance(data, list):
            raise RefusalError(f"{path}: expected a JSON list of strings or objects, got {type(data).__name__}")
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RefusalError(f"{path}:{n}: invalid JSON ({e.msg}); one JSON object or string per line") from None
    return records


def _load_hf(source: str) -> list:
    spec = source[len("hf:") :]
    spec, _, column = spec.partition("#")
    name, _, split = spec.partition(":")
    if name.count("/") != 1:
        raise RefusalError(f"{source}: expected hf:owner/name[:split][#column]")
    try:
        import datasets
    except ImportError:
        raise RefusalError("loading hf: datasets needs the 'datasets' package; pip install 'refusal[datasets]'") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # the hub raises many types; the message is what matters
        raise RefusalError(
            f"{source}: could not load the dataset ({type(e).__name__}: {str(e).splitlines()[0]}); check the name and network"
        ) from None
    if column:
        if column not in ds.column_names:
            raise RefusalError(f"{source}: no column {column!r}; columns are {', '.join(ds.column_names)}")
        return list(ds[column])
    return [_pick_field(row, source) for row in ds]


def load_splits(source: str, kind: str, seed: int = 0) -> dict[str, list[str]]:
    """train/val/test instructions of one class.

    'builtin' uses the fixed built-in splits; a .json/.jsonl file whose every record has a
    ``split`` field ('train', 'val', 'test') keeps those splits; anything else is split 60/20/20
    with ``seed``.
    """
    if source == "builtin":
        return {split: load_builtin(kind, split) for split in SPLITS}
    path = Path(source)
    if path.suffix.lower() in (".json", ".jsonl") and path.is_file():
        records = _records(path)
        if records and all(isinstance(r, dict) and r.get("split") in SPLITS for r in records):
            what = f"{kind} prompts ({source})"
            return {
                split: validate_instructions([_pick_field(r, f"{path}") for r in records if r["split"] == split], f"{what}, {split} split")
                for split in SPLITS
            }
    return split_instructions(load_prompts(source, name=f"{kind} prompts"), seed=seed)


def split_instructions(items: list[str], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0) -> dict[str, list[str]]:
    """Deterministic train/val/test split of a user's instruction list."""
    order = list(items)
    random.Random(seed).shuffle(order)
    n_train = round(len(order) * fractions[0])
    n_val = round(len(order) * fractions[1])
    return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}


def dataset_hash(items: list[str]) -> str:
    """sha256 of the instruction list, recorded in every artifact."""
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def load_corpus(source: str = "builtin") -> list[str]:
    """Paragraphs of plain text for the cross-entropy check: the built-in sample or a .txt file.

    Paragraphs are separated by blank lines; the built-in sample (texts/corpus.txt) was written for
    this project.
    """
    if source == "builtin":
        text = resources.files("refusal").joinpath("texts").joinpath("corpus.txt").read_text(encoding="utf-8")
    else:
        path = Path(source)
        if not path.is_file():
            raise RefusalError(f"corpus file {path} does not exist; give a plain-text file or 'builtin'")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RefusalError(f"corpus file {path} is not UTF-8 text; convert it or give another file") from None
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise RefusalError(f"corpus {source} has no text; give a file with some paragraphs")
    return paragraphs


CAPABILITY_KINDS = ("code", "math")


@dataclass(frozen=True)
class CapabilityItem:
    """A built-in code or math problem with a reference solution, scored by teacher-forced loss."""

    kind: str
    split: str
    prompt: str
    solution: str


def load_capability(split: str | None = None) -> list[CapabilityItem]:
    """The capability proxy's problems (texts/capability.jsonl, written for this project), optionally one split."""
    if split is not None and split not in ("train", "test"):
        raise RefusalError(f"unknown capability split {split!r}; choose 'train' or 'test'")
    text = resources.files("refusal").joinpath("texts").joinpath("capability.jsonl").read_text(encoding="utf-8")
    items = []
    for n, line in enumerate((x for x in text.splitlines() if x.strip()), 1):
        record = json.loads(line)
        ok = isinstance(record, dict) and set(record) == {"kind", "split", "prompt", "solution"}
        if not ok or record["kind"] not in CAPABILITY_KINDS or record["split"] not in ("train", "test"):
            raise RefusalError(f"capability.jsonl item {n} is malformed; give kind (code|math), split (train|test), prompt and solution")
        if not all(isinstance(record[k], str) and record[k].strip() for k in ("prompt", "solution")):
            raise RefusalError(f"capability.jsonl item {n} has an empty prompt or solution; fill it in")
        items.append(CapabilityItem(**record))
    return [item for item in items if split is None or item.split == split]


def load_self_questions() -> list[str]:
    """Harmless questions about the assistant itself (texts/self_questions.txt, written for this project), which
    chat models answer with an identity disclaimer ("As an AI language model, I don't have personal ...")."""
    text = resources.files("refusal").joinpath("texts").joinpath("self_questions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---- the prompt lists of one run ----------------------------------------------------------------
def resolve_source(spec: str, kind: str, packaged: dict[str, Path] | None) -> str:
    """'builtin' means the model's own prompt sets where a packaged model ships them (the organism)."""
    if spec == "builtin" and packaged and kind in packaged:
        return str(packaged[kind])
    return spec


def builtin_hash() -> str:
    """Identity of the built-in prompt sets of this version of refusal."""
    return dataset_hash([p.instruction + "\t" + p.split for kind in KINDS for p in builtin_prompts(kind)])


@dataclass
class Prompts:
    """The six instruction lists of a run ({kind: {split: [...]}}), capped to the configured sizes."""

    lists: dict[str, dict[str, list[str]]]

    def get(self, kind: str, split: str) -> list[str]:
        return self.lists[kind][split]

    def hash(self, kind: str, split: str) -> str:
        return dataset_hash(self.get(kind, split))

    def summary(self) -> dict:
        """{kind: {split: {"n", "sha256"}}}, recorded in run.json and every artifact."""
        return {
            kind: {split: {"n": len(items), "sha256": dataset_hash(items)} for split, items in splits.items()} for kind, splits in self.lists.items()
        }

    @classmethod
    def load(cls, sources: dict[str, str], seed: int, caps: dict[str, int | None]) -> Prompts:
        """Read (or fetch) both sources, split them, cap each split; an empty split is an error naming it."""
        lists: dict[str, dict[str, list[str]]] = {}
        for kind in KINDS:
            splits = load_splits(sources[kind], kind, seed)
            lists[kind] = {}
            for split in SPLITS:
                cap = caps[split]
                items = splits[split][:cap] if cap is not None else splits[split]
                if not items:
                    raise RefusalError(f"the {split} split of the {kind} prompts ({sources[kind]}) is empty; give more prompts")
                lists[kind][split] = items
        same = set(lists["harmful"]["train"]) & set(lists["harmless"]["train"])
        if len(same) == len(lists["harmful"]["train"]) == len(lists["harmless"]["train"]):
            raise RefusalError("the harmful and harmless train prompts are the same; give two different prompt sets (--harmful, --harmless)")
        return cls(lists)
