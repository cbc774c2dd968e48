"""The artifact machinery: an artifact is reused while fresh, made (its upstream artifacts first) when stale, and
refused with a one-line error to a command that only reads it. Nothing else fingerprints, removes or records.

Freshness is deep: an artifact is fresh when its upstream artifacts are fresh and its recorded fingerprint equals
the one its declaration (``run.artifacts``) computes now. ``given`` holds what the caller knows that the run does not
(see ``Artifact.needs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..common.provenance import digest
from ..errors import RefusalError
from .artifacts import ARTIFACTS, Artifact
from .directory import RunDir, settings_part
from .known import NO_GIVEN, Known, Workspace

Given = Mapping[str, Any]
Maker = Callable[[Workspace, dict[str, Any], str], Any]


class Stage(Workspace, Protocol):
    """What ``get`` makes an artifact in: a workspace.Context."""

    @property
    def run(self) -> RunDir: ...

    def timed(self, stage: str, start: float) -> None: ...


def upstream(run: RunDir, known: Known, name: str, given: Given = NO_GIVEN) -> tuple[str, ...]:
    return ARTIFACTS[name].upstream(known, given, lambda other: is_fresh(run, known, other))


def fingerprint(run: RunDir, known: Known, name: str, given: Given = NO_GIVEN) -> str:
    """The fingerprint ``name`` has when made now (from the upstream artifacts as they are recorded)."""
    a = ARTIFACTS[name]
    return run.fingerprint(name, known.settings, a.inputs(known, given), upstream(run, known, name, given))


def _fresh_here(run: RunDir, known: Known, a: Artifact, given: Given, ups: tuple[str, ...]) -> bool:
    if a.needs and not all(k in given for k in a.needs):  # another's upstream: its own stage checked what it was given
        return bool(run.entry(a.name)) and run.file(a.name).exists()
    return run.fresh(a.name, known.settings, a.inputs(known, given), ups, require_file=not a.resumable)


def is_fresh(run: RunDir, known: Known, name: str, given: Given = NO_GIVEN) -> bool:
    """Whether ``name`` and everything it is made from are fresh."""
    ups = upstream(run, known, name, given) if not ARTIFACTS[name].needs or given else tuple(run.entry(name).get("upstream", []))
    return all(is_fresh(run, known, u) for u in ups) and _fresh_here(run, known, ARTIFACTS[name], given, ups)


def _why(run: RunDir, known: Known, a: Artifact, given: Given) -> str:
    """Which input changed since ``a`` was made, where run.json recorded enough to tell; else the usual suspects."""
    entry = run.entry(a.name)
    if not entry:
        return "run.json has no record of it (it was not made by this run)"
    if entry.get("format_version") != a.format_version:
        return f"it has format version {entry.get('format_version')!r}, this refusal makes {a.format_version!r}"
    old, now = entry.get("input_digests"), {k: digest(v) for k, v in a.inputs(known, given).items()}
    if isinstance(old, dict) and old.get("model") not in (None, now.get("model")):
        return "it was made from another model"
    changed = [k for k in now if isinstance(old, dict) and old.get(k) != now[k]]
    old_settings, settings = entry.get("setting_digests"), settings_part(known.settings, a.settings)
    changed += [f"setting {k}" for k in settings if isinstance(old_settings, dict) and old_settings.get(k) != digest(settings[k])]
    made_from, recorded = entry.get("upstream_fingerprints"), run.info.get("artifacts", {})
    if isinstance(made_from, dict):
        changed += [f"{u} (made again)" for u, f in made_from.items() if recorded.get(u, {}).get("fingerprint") != f]
    return f"its {', '.join(changed)} changed since it was made" if changed else "the model, prompts or settings changed since it was made"


def require(run: RunDir, known: Known, name: str, given: Given = NO_GIVEN) -> Any:
    """``name`` read back while it is fresh; else a one-line error naming it, why, and the command that makes it."""
    a = ARTIFACTS[name]
    ups = upstream(run, known, name, given) if not a.needs or given else tuple(run.entry(name).get("upstream", []))
    for u in ups:
        require(run, known, u)
    command = a.command.format(run=run.path)
    if not run.file(name).exists():
        raise RefusalError(f"{run.file(name)} does not exist; run `{command}` first")
    if not _fresh_here(run, known, a, given, ups):
        raise RefusalError(f"{run.file(name)} is stale: {_why(run, known, a, given)}; re-run `{command}` to recompute it")
    return a.read(run)


def _record(run: RunDir, known: Known, a: Artifact, given: Given, ups: tuple[str, ...]) -> None:
    inputs, recorded = a.inputs(known, given), run.info.get("artifacts", {})
    made_from = {u: recorded.get(u, {}).get("fingerprint") for u in ups}
    run.record(
        a.name,
        known.settings,
        inputs,
        ups,
        input_digests={k: digest(v) for k, v in inputs.items()},
        setting_digests={k: digest(v) for k, v in settings_part(known.settings, a.settings).items()},
        upstream_fingerprints=made_from,
        **(a.noted(inputs, made_from) if a.noted is not None else {}),
    )


def get(ctx: Stage, name: str, make: Maker | None = None, remake: bool = False, given: Given = NO_GIVEN) -> Any:
    """``name`` read back while fresh (and not ``remake``); else its stale files removed, its upstream artifacts got
    first, made by ``make`` (default: its declared maker), recorded and timed. A resumable artifact is recorded
    first and made on every call."""
    run, a = ctx.run, ARTIFACTS[name]
    maker = make or a.make
    if maker is None:
        raise ValueError(f"artifact {name} is made above the run layer: pass its maker to get")
    if not remake and not a.resumable and is_fresh(run, ctx, name, given):
        return a.read(run)
    ups = upstream(run, ctx, name, given)
    made_above = [u for u in ups if ARTIFACTS[u].needs or ARTIFACTS[u].make is None]  # their makers are the commands'
    values = {u: require(run, ctx, u) if u in made_above else get(ctx, u) for u in ups}
    fresh = not remake and _fresh_here(run, ctx, a, given, ups)  # an upstream made again from the same inputs
    if fresh and not a.resumable:
        return a.read(run)
    if not fresh:
        run.remove(name, quiet=remake, keep=a.scratch)  # remade on request: nothing changed, nothing to announce
    start = time.perf_counter()
    if a.resumable:  # an interrupted make resumes under this fingerprint
        _record(run, ctx, a, given, ups)
    value = maker(ctx, values, run.fingerprint(name, ctx.settings, a.inputs(ctx, given), ups))
    if not a.resumable:
        _record(run, ctx, a, given, ups)
    if a.timing is not None:
        ctx.timed(a.timing or a.stage, start)
    return value
