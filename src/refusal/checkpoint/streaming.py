"""Bounded-memory export: the source checkpoint rewritten file by file, the edited tensors replaced by name.

The output is a byte copy of the source's safetensors files in which each tensor the edit changes (its
``deltas``, found by name in the checkpoint: writers, or any other tensor) is replaced by its edited value,
computed in float32 in blocks of ``BLOCK_BYTES`` and cast back to the tensor's own dtype. Names, dtypes, shapes, the sharding and
the index stay the source's. Several files are rewritten at once (``file_workers``), each holding one
edited tensor and a few float32 blocks at a time, together within the largest file + 512 MiB, never the
model: a checkpoint larger than RAM exports on the machine that holds it.

Each edited tensor is checked as it is written: a projection (``TensorEdit.check``, on its first 256 vectors)
after each step has its component along that step's direction (1 - strength) times what it was (and, for
norm-preserving edits, every vector keeps its norm to the precision of the tensor's dtype); a low-rank or added
delta's first numbers equal the float64 sum (``deltas``); the
logits check of a model in memory (``export.fidelity_check``) comes on top where the model is loaded.
The float32 arithmetic runs on the GPU where there is one.

A tied token embedding that the edit changes is untied: the original matrix is written as the output
embedding (placed first in the embedding's file, so nothing is held back) and the config says
``tie_word_embeddings: false``, exactly as the in-memory edit does.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..common.provenance import has_own_code
from ..common.safetensors_files import INDEX as INDEX
from ..common.safetensors_files import checkpoint_files, rewrite_file, tensor_locations, weights_entry
from ..edit.deltas import Projection, TensorDelta
from ..edit.tensor_edit import BLOCK_BYTES, FILE_WORKERS
from ..edit.tensor_edit import TensorEdit as TensorEdit
from ..edit.weights import embeddings_tied
from ..errors import RefusalError
from ..model.chat import ChatModel

# The files besides the weights that a checkpoint needs, copied into the export; nothing else is (no dotfiles, no
# stray weights, no notes): configs, tokenizer files, chat templates, processor configs, the licence and model card.
NEEDED = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.tiktoken", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "LICENSE*", "README*", "NOTICE*", "USE_POLICY*",
)  # fmt: skip


def file_workers(files: list[Path], edited: dict[str, tuple[Path, dict]]) -> int:
    """How many files to rewrite at once. Reads, edits and writes of several files overlap, so a checkpoint in
    several files exports faster than one file at a time. A worker holds one edited tensor of its file
    at a time and its float32 blocks, so workers are only as many as keep the largest such tensors of as many
    files within the bound of the largest file + 512 MiB; at most ``FILE_WORKERS``, the files, and the CPUs.
    ``edited``: name -> (file, header entry) of the edited tensors."""
    largest: dict[Path, int] = {}
    for file, entry in edited.values():
        begin, end = entry["data_offsets"]
        largest[file] = max(largest.get(file, 0), end - begin + 2 * BLOCK_BYTES)
    held = sorted((largest.get(file, 0) for file in files), reverse=True)  # a file with no edited tensor holds nothing
    bound = max((f.stat().st_size for f in files), default=0) + (512 << 20)
    fits = next((k for k in range(len(held), 0, -1) if sum(held[:k]) <= bound), 1)
    return max(1, min(FILE_WORKERS, fits, os.cpu_count() or 1))


def write_edited_checkpoint(chat: ChatModel, deltas: dict[str, TensorDelta], source: Path, out: Path) -> dict:
    """Write the checkpoint at ``source`` with each named tensor changed by its delta (``Edit.deltas``) into the empty
    directory ``out`` (every other file copied, weights in other formats left out); returns what refusal.json
    records about it."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")  # where the edits are computed
    locations = tensor_locations(source)
    edits = _per_expert(chat, deltas, locations)
    missing = [name for name in edits if name not in locations]
    if missing:
        raise NamesDiffer(
            f"the checkpoint at {source} has no tensor {missing[0]} (and {len(missing) - 1} more edited tensors): its names differ "
            "from the model's; export with the model loaded (without --streaming)"
        )
    copies: dict[Path, dict[str, str]] = {}
    untie = embeddings_tied(chat) and chat.embeddings[0].weight_name in edits
    if untie:
        names = {id(m): n for n, m in chat.model.named_modules()}
        output_name = names[id(chat.model.get_output_embeddings())] + ".weight"
        embed = chat.embeddings[0].weight_name
        if output_name not in locations:
            copies[locations[embed][0]] = {output_name: embed}
    residuals: dict[str, float] = {}

    def rewrite(file: Path) -> dict[str, float]:
        todo = {name: edit for name, edit in edits.items() if locations[name][0] == file}
        edit_in_place = {name: functools.partial(edit.streamed, name, device=device) for name, edit in todo.items()}
        target = out / file.relative_to(source)  # an index may keep its files in a subfolder: kept there
        target.parent.mkdir(parents=True, exist_ok=True)
        return rewrite_file(file, target, edit_in_place, copies.get(file, {}))

    files = checkpoint_files(source)
    workers = file_workers(files, {name: locations[name] for name in edits})
    pool = ThreadPoolExecutor(workers)
    try:
        for found in (pool.map if workers > 1 else map)(rewrite, files):
            residuals.update(found)
    finally:  # interrupted: the files not begun are not written, those under way are finished first
        wait_for(pool)
    worst = max(residuals.values(), default=0.0)
    if not worst <= 1.0:  # also NaN
        name = max(residuals, key=lambda k: residuals[k])
        raise RefusalError(f"the edited tensor {name} failed its check (residual {worst:.3g} > 1); the export was not written. Please report this")
    for item in checkpoint_extras(source):
        shutil.copyfile(item, out / item.relative_to(source))
    entry = weights_entry(source)
    if entry is not None and entry.name.endswith(".index.json"):  # read through an index: the same index, new tensors added
        index = json.loads(entry.read_text(encoding="utf-8"))
        for file, new in copies.items():
            for name, old in new.items():
                index["weight_map"][name] = file.relative_to(source).as_posix()
                if "total_size" in index.get("metadata", {}):
                    begin, end = locations[old][1]["data_offsets"]
                    index["metadata"]["total_size"] += end - begin
        (out / entry.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        (out / entry.relative_to(source)).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if untie:
        _untie_config(out / "config.json")
    if chat.chat_template is not None:
        (out / "chat_template.jinja").write_text(chat.chat_template, encoding="utf-8")
    dtypes = sorted({locations[name][1]["dtype"] for name in edits})
    return {"streamed": True, "tensors_edited": len(edits), "tensor_dtypes": dtypes, "tensor_check_max_residual": round(worst, 4)}


class NamesDiffer(RefusalError):
    """The checkpoint's tensor names are not the model's (a model in memory can still be saved from memory)."""


def _per_expert(chat: ChatModel, deltas: dict[str, TensorDelta], locations: dict) -> dict[str, TensorDelta]:
    """Fused expert parameters ([experts, ...] in the model) that the checkpoint stores one matrix per expert, as
    transformers 5 saves Qwen2-MoE and Mixtral (``...experts.<e>.down_proj.weight`` or ``...experts.<e>.w2.weight``,
    each a Linear weight [d_model, in]): a projection replaced by one per expert tensor; another delta refused."""
    fused = {w.weight_name: w for w in chat.writers if w.weight.dim() == 3}
    out: dict[str, TensorDelta] = {}
    for name, delta in deltas.items():
        writer = fused.get(name)
        if name in locations or writer is None:
            out[name] = delta
            continue
        keys = expert_keys(name, writer.weight.shape[0], locations)
        if keys is None:
            out[name] = delta  # reported as missing
            continue
        if not isinstance(delta, Projection):
            why = f"a {delta.kind} delta on fused experts cannot be streamed"
            raise RefusalError(f"{name} is stored one matrix per expert; {why}: edit them with a projection, or export from memory")
        for key in keys:
            out[key] = Projection(delta.steps, rows=False, norms=delta.norms)
    return out


def expert_keys(name: str, n_experts: int, locations: dict) -> list[str] | None:
    """The checkpoint names of fused parameter ``name``'s experts in order, where the checkpoint stores one Linear
    weight per expert (``...experts.<e>.down_proj.weight`` or Mixtral's ``...experts.<e>.w2.weight``); else None."""
    layer = name.split(".experts.")[0].rsplit(".", 1)[0]  # e.g. model.layers.3
    pattern = re.compile(rf"^{re.escape(layer)}\.[A-Za-z_]+\.experts\.(\d+)\.(down_proj|w2|fc2)\.weight$")
    found = {int(m[1]): key for key in locations if (m := pattern.match(key))}
    return [found[e] for e in range(n_experts)] if sorted(found) == list(range(n_experts)) else None


def wait_for(pool: ThreadPoolExecutor) -> None:
    """Shut ``pool`` down once its files under way are written, even through a further Ctrl-C or SIGTERM (raised
    again afterwards): returning earlier would let a worker write into a partial export its caller has removed."""
    interrupted: KeyboardInterrupt | None = None
    while True:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
            break
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted


def checkpoint_extras(source: Path) -> list[Path]:
    """The top-level files besides the weights that the export needs (``NEEDED``; with an ``auto_map`` in the config
    or tokenizer config, the model's own ``*.py`` code too), never a dotfile; symlinks are followed only for these names."""
    names = NEEDED + (("*.py",) if has_own_code(source) else ())
    found = {p for pattern in names for p in source.glob(pattern)}
    return sorted(p for p in found if p.is_file() and not p.name.startswith("."))


def _untie_config(path: Path) -> None:
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def streamable(chat: ChatModel) -> bool:
    """True when ``chat`` was loaded from a local directory of safetensors files, not quantized (GGUF files are
    loaded from a .gguf file and dequantized, so they are saved from memory instead)."""
    path = Path(chat.path)
    quantized = getattr(chat.model, "is_quantized", False) or getattr(chat.model.config, "quantization_config", None) is not None
    return path.is_dir() and bool(checkpoint_files(path)) and not quantized


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux: MemAvailable; elsewhere the physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def too_large_to_load(location: str) -> bool:
    """True when ``location`` is a local safetensors checkpoint larger than half the available memory."""
    path = Path(location)
    if not path.is_dir():
        return False
    size = sum(f.stat().st_size for f in checkpoint_files(path) if f.is_file())
    return size > available_memory() / 2
