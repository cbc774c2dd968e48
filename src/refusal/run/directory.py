"""The run directory: its run.json, and the artifacts declared in ``run.artifacts``, each fingerprinted by the inputs
and settings that made it (``run.store`` checks, makes and refuses them).

    RUN/run.json                  format version, the settings tree, environment, model identity, datasets, timings,
                                  and for every artifact: its format version and fingerprint
    RUN/prompts.json              the prompt lists the run uses, written once (a resume or a re-evaluation fetches nothing)
    RUN/candidates.safetensors    extract
    RUN/selection.json, RUN/direction.safetensors (+ selection.partial.jsonl while scoring)     select
    RUN/search.journal, RUN/search.json                                                         search
    RUN/protection.safetensors    the protected prompts' activations the search cleans its directions against   search
    RUN/model/                    export (of the selected direction or of the search's choice)
    RUN/report/                   evaluate
    RUN/attack.json (+ attack.state.json while optimising)                                      attack
    RUN/analysis.json             analyze (also shown as the report's "Mechanisms" section)

An artifact's fingerprint is the sha256 of its format version, the settings it depends on, the content hashes of its
external inputs (model files, prompt lists) and its upstream artifacts' fingerprints. It is *fresh* when its files exist
and its recorded fingerprint equals the one computed now; anything else is stale and is recomputed by the stage that makes
it (``refusal run``, ``refusal search``) or refused with a one-line error by a command that only reads it. ``--overwrite``
removes every registered artifact. Paths inside artifacts are relative to the run directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..checkpoint.export import remove_dead_partials
from ..common.progress import log
from ..common.provenance import digest, environment, timestamp
from ..errors import RefusalError
from ..settings import Settings
from .artifacts import ARTIFACTS
from .files import check_version, read_json, write_json

RUN_FORMAT = "2"


def settings_part(settings: Settings, paths: tuple[str, ...]) -> dict:
    tree = settings.to_dict()
    out = {}
    for path in paths:
        group, _, name = path.partition(".")
        out[path] = tree[group][name] if name else tree[group]
    return out


class RunDir:
    """A run directory and its run.json: create, reopen, check freshness, record fingerprints."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # ---- opening -------------------------------------------------------------------------------
    @staticmethod
    def check_target(path: Path, overwrite: bool) -> None:
        """Raise if ``path`` cannot hold a run (no side effects): a file, or a non-empty directory that is not a run."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RefusalError(f"run directory {path} is a file; choose a directory path")
        blocked = next((p for p in path.absolute().parents if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise RefusalError(f"run directory {path} lies under {blocked}, which is a file; choose another --out")
        if overwrite or not path.is_dir():
            return
        if (path / "run.json").exists():
            _ = RunDir(path).info  # validates it: a foreign or broken run.json is an error naming the fix
        elif any(p for p in path.iterdir() if not p.name.startswith(".")):
            raise RefusalError(f"run directory {path} is not empty and holds no run; choose another --out or pass --overwrite")

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run (for commands that read one: select, export, evaluate --ablate)."""
        run = cls(path)
        _ = run.info  # validates it
        return run

    @classmethod
    def create(cls, path: Path, settings: Settings, overwrite: bool = False) -> RunDir:
        """Start a run directory, or reopen one to resume (its artifacts are then checked one by one)."""
        cls.check_target(path, overwrite)
        run = cls(path)
        if overwrite and run.path.is_dir():
            run.clear()
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RefusalError(f"cannot create run directory {run.path} ({e.strerror}); choose another --out") from None
        run.remove_orphans()
        if (run.path / "run.json").exists():
            log(f"resuming run in {run.path}")
            run.update(settings=settings.to_dict())
        else:
            write_json(
                run.path / "run.json",
                {
                    "format_version": RUN_FORMAT,
                    "created": timestamp(),
                    "environment": environment(),
                    "settings": settings.to_dict(),
                    "artifacts": {},
                    "timings": {},
                },
            )
        return run

    def clear(self) -> None:
        """Remove every registered artifact and run.json (``--overwrite``); files the run does not own stay."""
        for artifact in ARTIFACTS.values():
            self.remove(artifact.name, quiet=True)
        for name in ("run.json", ".run.json.tmp"):
            (self.path / name).unlink(missing_ok=True)

    def remove_orphans(self) -> None:
        """Partial outputs of killed processes (``.NAME.partial-PID``), once that process is gone."""
        remove_dead_partials(self.path)

    # ---- run.json ------------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        fix = "choose another run directory, or pass --overwrite to start it again"
        info = read_json(self.path / "run.json", f"{self.path} is not a run directory; create one with `refusal run` or `refusal extract`")
        if "format_version" not in info or "settings" not in info:
            raise RefusalError(f"{self.path / 'run.json'} is not a refusal run file (no format_version or settings); {fix}")
        check_version(info["format_version"], RUN_FORMAT, self.path / "run.json", fix)
        if not isinstance(info.get("artifacts", {}), dict) or not isinstance(info.get("timings", {}), dict):
            raise RefusalError(f"{self.path / 'run.json'} has artifacts or timings of the wrong shape; {fix}")
        return info

    @property
    def settings(self) -> Settings:
        try:
            return Settings.from_dict(self.info["settings"])
        except RefusalError as e:
            raise RefusalError(f"{self.path / 'run.json'}: {e}; fix it, or pass --overwrite to start the run again") from None

    def update(self, **fields: object) -> dict:
        info = self.info
        info.update(fields)
        write_json(self.path / "run.json", info)
        return info

    def record_time(self, stage: str, seconds: float) -> None:
        info = self.info
        info.setdefault("timings", {})[stage] = round(seconds, 2)
        write_json(self.path / "run.json", info)

    # ---- artifacts -----------------------------------------------------------------------------
    def file(self, name: str, index: int = 0) -> Path:
        return self.path / ARTIFACTS[name].files[index]

    def fingerprint(self, name: str, settings: Settings, inputs: dict, upstream: tuple[str, ...] = ()) -> str:
        """The fingerprint ``name`` would have if made now from ``inputs`` and the recorded ``upstream`` artifacts."""
        artifact = ARTIFACTS[name]
        recorded = self.info.get("artifacts", {})
        ups = {u: recorded.get(u, {}).get("fingerprint") for u in upstream}
        return digest(
            {"format_version": artifact.format_version, "settings": settings_part(settings, artifact.settings), "inputs": inputs, "upstream": ups}
        )

    def fresh(self, name: str, settings: Settings, inputs: dict, upstream: tuple[str, ...] = (), require_file: bool = True) -> bool:
        """True when ``name`` exists (``require_file``) and was made from exactly these inputs, settings and upstream artifacts."""
        entry = self.info.get("artifacts", {}).get(name)
        if entry is None or (require_file and not self.file(name).exists()):
            return False
        if entry.get("format_version") != ARTIFACTS[name].format_version or list(entry.get("upstream", [])) != list(upstream):
            return False
        return entry.get("fingerprint") == self.fingerprint(name, settings, inputs, upstream)

    def record(self, name: str, settings: Settings, inputs: dict, upstream: tuple[str, ...] = (), **extra: object) -> str:
        """Register ``name`` as made now from ``inputs``; downstream artifacts are stale from here on."""
        fingerprint = self.fingerprint(name, settings, inputs, upstream)
        info = self.info
        info.setdefault("artifacts", {})[name] = {
            "format_version": ARTIFACTS[name].format_version,
            "fingerprint": fingerprint,
            "upstream": list(upstream),
            "created": timestamp(),
            **extra,
        }
        write_json(self.path / "run.json", info)
        return fingerprint

    def read(self, name: str) -> dict:
        """The JSON content of artifact ``name`` (report: report.json), its format version checked."""
        path = self.file(name) / "report.json" if name == "report" else self.file(name)
        fix = f"re-run `refusal {ARTIFACTS[name].stage}` (or `refusal run`) on {self.path}"
        data = read_json(path, fix)
        check_version(data.get("format_version"), ARTIFACTS[name].format_version, path, fix)
        return data

    def entry(self, name: str) -> dict:
        return self.info.get("artifacts", {}).get(name, {})

    def remove(self, name: str, quiet: bool = False, keep: tuple[str, ...] = ()) -> None:
        """Delete ``name``'s files (but those in ``keep``) and its record (it is about to be recomputed)."""
        existed = False
        for relative in (f for f in ARTIFACTS[name].files if f not in keep):
            target = self.path / relative
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
                existed = True
            elif target.exists() or target.is_symlink():
                target.unlink()
                existed = True
        if (self.path / "run.json").is_file():
            try:
                info = self.info
            except RefusalError:
                return
            if info.get("artifacts", {}).pop(name, None) is not None or existed:
                write_json(self.path / "run.json", info)
                if existed and not quiet:
                    log(f"{name} is stale (inputs or settings changed): recomputing it")
