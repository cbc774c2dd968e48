"""A run, or an export, given to another command: whose model it is, and whether its direction still holds.

``generate`` / ``evaluate`` with ``--ablate RUN`` or ``--add RUN`` take the run's model from run.json,
``evaluate --edited DIR`` the model the export was made from (refusal.json's ``source_model``), unless
``--model`` is given, and then only that same model (the same name or path, or the same files): never the
default model. ``refusal attack --out RUN`` keeps the run's model the same way. A run's direction is used
only while it is fresh: its candidates and selection made from the model's files as they are now, with the
run's prompts and settings. Everything here is checked before any model is loaded; nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path

from ..common.provenance import model_fingerprint
from ..errors import RefusalError
from ..model.packaged import is_packaged, packaged_path
from ..residual.directions import Direction
from ..settings import Settings
from .directory import RunDir
from .files import read_json
from .known import Reading
from .store import require
from .workspace import run_prompts


# ---- which model --------------------------------------------------------------------------------------------
def model_location(source: str) -> str:
    """Where a model's files are without fetching or training anything: a packaged model's cache directory, else ``source``."""
    return str(packaged_path(source)) if is_packaged(source) else source


def same_model(given: str, source: str, recorded: dict) -> bool:
    """Whether ``--model given`` names the model a run or an export recorded (``source``: the name it was given by;
    ``recorded``: {"path", "sha256"}): the same name or path, or the same files."""
    location = model_location(given)
    if given == source or (recorded.get("path") and Path(location).resolve() == Path(recorded["path"]).resolve()):
        return True
    sha = recorded.get("sha256")
    return sha is not None and model_fingerprint(location)["sha256"] == sha


def _other_model(what: str, recorded: dict, given: str, fix: str, made: str = "was made on") -> RefusalError:
    sha = str(recorded.get("sha256"))[:12]
    return RefusalError(f"{what} {made} another model ({recorded.get('source')}, sha256 {sha}) than {given}; {fix}")


def run_model(settings: Settings, run: RunDir, options: dict | None, what: str) -> str:
    """Set ``settings.model`` to the run's model (its saved model settings with ``options``, the model options given on
    the command line, applied; ``options`` None: ``settings.model`` is the one asked for) and return where its files are.
    A --model naming another model than the run's is refused (``what``: the option that named the run)."""
    saved, recorded = run.settings.model, run.info.get("model", {})
    given = settings.model.model if options is None else options.get("model")
    if given is not None and not same_model(given, saved.model, recorded):
        fix = "leave out --model (the run's model is used) or give a run of this model"
        raise _other_model(f"{what} {run.path}", {"source": saved.model, **recorded}, f"--model {given}", fix)
    if options is not None:
        settings.model = saved
        for name, value in options.items():
            setattr(settings.model, name, value)
    if given is None or given == saved.model:
        return recorded.get("path") or model_location(saved.model)
    return model_location(given)


def check_run_model(out: Path, settings: Settings, overwrite: bool) -> None:
    """``refusal attack --model M --out RUN``: refused when RUN holds a run of another model (its artifacts would be mixed)."""
    if overwrite or not (Path(out) / "run.json").is_file():
        return
    run = RunDir.open(out)
    recorded = {"source": run.settings.model.model, **run.info.get("model", {})}
    if not same_model(settings.model.model, run.settings.model.model, recorded):
        fix = "leave out --model to use the run's, or choose another --out (or --overwrite to start it again)"
        raise _other_model(f"run {out}", recorded, f"--model {settings.model.model}", fix)


def export_info(edited: Path) -> dict:
    """An export's refusal.json ({} for a checkpoint without one)."""
    path = edited / "refusal.json"
    return read_json(path, "re-export the model with `refusal export`, or give --edited a checkpoint without it") if path.is_file() else {}


def export_model(settings: Settings, edited: Path, info: dict, options: dict | None) -> None:
    """Set ``settings.model`` to the model the export ``edited`` was made from (refusal.json's ``source_model``) unless
    --model is given; refused when --model, or the source's files as they are now, are not the export's source."""
    made_from = info.get("source_model") or {}
    given = settings.model.model if options is None else options.get("model")
    if given is None:
        source, path = made_from.get("source"), made_from.get("path")
        given = source if source and (is_packaged(source) or not (path and Path(path).exists())) else path
        if not given:
            raise RefusalError(f"--edited {edited} does not name the model it was exported from (no source_model in refusal.json); pass --model")
        settings.model.model = given
        for name, value in (options or {}).items():
            setattr(settings.model, name, value)
    sha = made_from.get("sha256")
    now = model_fingerprint(model_location(given))["sha256"]
    if sha and now and now != sha:
        fix = "pass --model with the model it was exported from, as it was then"
        raise _other_model(f"--edited {edited}", made_from, f"{given} as it is now", fix, "was exported from")


# ---- the run's direction ------------------------------------------------------------------------------------------
def fresh_direction(run: RunDir, location: str | None = None) -> Direction:
    """The run's selected direction, while its candidates and selection were made from the model files now at
    ``location`` (default: the run's model) and the run's prompts and settings; a one-line error otherwise."""
    settings, recorded = run.settings, run.info.get("model", {})
    location = location or recorded.get("path") or model_location(settings.model.model)
    model_id = model_fingerprint(location, recorded.get("fingerprint"))["sha256"] or location
    _, direction = require(run, Reading(settings, run_prompts(run, settings), model_id), "selection")  # and its candidates
    return direction


def export_direction(edited: Path, info: dict) -> tuple[Direction | None, str | None]:
    """(the direction of the run an export names, None) while that run is fresh, of the export's source model, and its
    selection the one the export was made from; else (None, why not). A search trial's export has no run direction."""
    where = info.get("run")
    if not isinstance(where, str) or not info.get("direction"):
        return None, None
    path = (edited / where).resolve()
    if not (path / "run.json").is_file():
        return None, f"its run {path} is gone"
    try:
        run = RunDir.open(path)
        if run.info.get("model", {}).get("sha256") != (info.get("source_model") or {}).get("sha256"):
            return None, f"its run {path} now holds a run of another model"
        direction = fresh_direction(run)
    except RefusalError as e:
        return None, str(e)
    made = info.get("upstream", {}).get("selection")
    same = (
        made == run.entry("selection").get("fingerprint")
        if made
        else [direction.layer, direction.position]
        == [
            info["direction"].get("layer"),
            info["direction"].get("position"),
        ]
    )
    return (direction, None) if same else (None, f"its run {path} has selected another direction since the export")
