"""What a report (report.json) must contain, and the one formatter every rendered number goes through.

Format version 2: measurements are keyed condition -> kind (``rates.ablated.harmful``), and the
report lists its conditions with their labels (``conditions: [{"name", "label"}]``). Any condition
listed there is valid, so a new one (``norm_preserving``, ``trial_30``, ``suffix``) needs no change
here or in the renderers. A report of another format version is refused with the fix: regenerate it.
"""

from __future__ import annotations

import json
import re

from ..errors import RefusalError

FORMAT_VERSION = "2"
REQUIRED = {
    "format_version": f'"{FORMAT_VERSION}"',
    "created": 'an ISO 8601 time such as "2026-11-25T19:00:00Z"',
    "refusal_version": "refusal.__version__",
    "model": 'an object such as {"source": "demo"}',
    "conditions": 'a list such as [{"name": "original", "label": "original"}]',
    "rates": 'an object such as {"original": {"harmful": {"refused": 12, "total": 32}}}',
}
KIND_ORDER = ("harmful", "harmless")  # shown first, in this order; any other kind follows
PERCENT_FIELDS = ("rate", "low", "high")
NAME = re.compile(r"[A-Za-z0-9_-]+")  # a condition or kind name is one part of a JSON path


def labels(report: dict) -> dict[str, str]:
    """Condition name -> label, in the report's order."""
    return {c["name"]: c["label"] for c in report["conditions"]}


def kinds(report: dict) -> list[str]:
    """Every prompt kind that has a rate, harmful and harmless first."""
    found = {k: None for table in (report["rates"], report.get("safety") or {}) for v in table.values() if isinstance(v, dict) for k in v}
    return [k for k in KIND_ORDER if k in found] + [k for k in found if k not in KIND_ORDER]


# ---- validation --------------------------------------------------------------------------------
def _validate_conditions(conditions: object) -> set[str]:
    if not isinstance(conditions, list) or not conditions:
        raise RefusalError('report \'conditions\' must be a non-empty list such as [{"name": "original", "label": "original"}]')
    names = []
    for i, c in enumerate(conditions):
        ok = isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("label"), str)
        if not ok or not NAME.fullmatch(c["name"]) or c["name"] == "judge":  # "judge" names the safety judge in 'safety'
            raise RefusalError(
                f"report conditions.{i} must be {{'name', 'label'}} with a name of letters, digits, '_' or '-', not 'judge' (got {c!r})"
            )
        names.append(c["name"])
    if len(set(names)) != len(names):
        raise RefusalError(f"report conditions repeat a name ({names}); give each condition its own name")
    return set(names)


def _check_keys(path: str, mapping: object, names: set[str], skip: tuple[str, ...] = ()) -> None:
    """Every key of ``mapping`` is a listed condition."""
    if not isinstance(mapping, dict):
        raise RefusalError(f"report {path!r} must be an object keyed by condition name")
    for key in mapping:
        if key not in names and key not in skip:
            raise RefusalError(f"report {path}.{key} is not a listed condition; add it to 'conditions' ({{'name', 'label'}}) or remove it")


def _validate_rates(path: str, table: object, names: set[str]) -> None:
    _check_keys(path, table, names, skip=("judge",) if path == "safety" else ())
    assert isinstance(table, dict)  # checked by _check_keys
    for condition, by_kind in table.items():
        if path == "safety" and condition == "judge":
            continue
        if not isinstance(by_kind, dict) or not all(isinstance(k, str) and NAME.fullmatch(k) for k in by_kind):
            raise RefusalError(f"report {path}.{condition} must be an object of rates keyed by prompt kind, e.g. {{'harmful': {{...}}}}")
        for kind, entry in by_kind.items():
            ok = isinstance(entry, dict) and all(isinstance(entry.get(k), int) for k in ("refused", "total"))
            if not ok or not 0 <= entry["refused"] <= entry["total"]:
                raise RefusalError(f"report {path}.{condition}.{kind} needs integer 'refused' and 'total' with 0 <= refused <= total (got {entry!r})")


def validate_report(report: dict) -> None:
    """Raise RefusalError naming the first missing or malformed key and how to fix it."""
    if not isinstance(report, dict):
        raise RefusalError(f"a report must be a dict (the content of report.json), got {type(report).__name__}")
    if "format_version" in report and report["format_version"] != FORMAT_VERSION:
        raise RefusalError(
            f"report format_version {report['format_version']!r} is not supported (this refusal reads {FORMAT_VERSION!r}); "
            "regenerate the report with this version of refusal (refusal evaluate or refusal run)"
        )
    for key, example in REQUIRED.items():
        if key not in report:
            raise RefusalError(f"report is missing the required key {key!r}; add it ({example}) or regenerate the report")
    if not isinstance(report["model"], dict):
        raise RefusalError('report \'model\' must be an object such as {"source": "demo"}')
    names = _validate_conditions(report["conditions"])
    _validate_rates("rates", report["rates"], names)
    if report.get("safety") is not None:
        _validate_rates("safety", report["safety"], names)
    objects = ("direction", "settings", "kl", "ce_loss", "capability", "refusal_score", "completions", "selection", "projections", "cosine")
    for key in (*objects, "timings", "search"):
        if report.get(key) is not None and not isinstance(report[key], dict):
            raise RefusalError(f"report {key!r} must be an object or null (got {type(report[key]).__name__})")
    for key in ("kl", "refusal_score", "completions"):
        if report.get(key):
            _check_keys(key, report[key], names)
    if report.get("ce_loss"):
        _check_keys("ce_loss.loss", report["ce_loss"].get("loss"), names)
    if report.get("capability"):
        _check_keys("capability.loss", report["capability"].get("loss"), names)
        _check_keys("capability.by_kind", report["capability"].get("by_kind") or {}, names)
    if not isinstance(report.get("samples") or [], list):
        raise RefusalError("report 'samples' must be a list of {kind, instruction, original, edited, edit} objects")
    if proj := report.get("projections"):
        n = len(proj.get("layers", []))
        for key in ("harmful_mean", "harmful_std", "harmless_mean", "harmless_std"):
            if len(proj.get(key) or []) != n:
                raise RefusalError(f"report projections.{key} must have one value per layer ({n}); regenerate the report")
    validate_mechanisms(report.get("mechanisms"))
    validate_monitor(report.get("monitor"))
    _section(report.get("audit"), "audit", ("brittleness", "unedited", "ablation", "direction", "layers"), "refusal audit")
    if cos := report.get("cosine"):
        n = len(cos.get("layers", []))
        if len(cos.get("matrix", [])) != n or any(len(row) != n for row in cos["matrix"]):
            raise RefusalError(f"report cosine.matrix must be {n} x {n} (one row and column per layer)")


def _section(m: object, name: str, keys: tuple[str, ...], command: str) -> dict | None:
    """An optional section: None, or an object holding ``keys``; a one-line error naming the key and the command otherwise."""
    if m is None:
        return None
    if not isinstance(m, dict):
        raise RefusalError(f"report '{name}' must be an object or null; regenerate it with `{command}`")
    for key in keys:
        if key not in m:
            raise RefusalError(f"report {name}.{key} is missing; regenerate it with `{command}`")
    return m


def validate_mechanisms(section: object) -> None:
    """The shape the renderers rely on; a one-line error naming the key otherwise."""
    keys = ("layers", "groups", "cosine", "gap_closed", "heads", "decomposition", "direction", "direction_across_layers")
    if (m := _section(section, "mechanisms", keys, "refusal analyze")) is None:
        return
    n = len(m["layers"])
    for group in m["groups"]:
        entry = m["cosine"].get(group) or {}
        if len(entry.get("mean") or []) != n or len(entry.get("std") or []) != n:
            raise RefusalError(f"report mechanisms.cosine.{group} needs a mean and a std per layer ({n}); regenerate it with `refusal analyze`")


def validate_monitor(section: object) -> None:
    """The shape the "Monitor" section relies on; a one-line error naming the key otherwise."""
    if (m := _section(section, "monitor", ("conditions", "test", "direction", "harm_layer", "score"), "refusal monitor")) is None:
        return
    if not isinstance(m["test"], dict) or any(v is not None and not isinstance(v, dict) for v in m["test"].values()):
        raise RefusalError("report monitor.test must map each condition to its scores' metrics or null; regenerate it with `refusal monitor`")


# ---- the one formatter -------------------------------------------------------------------------
def fmt(path: str, value: object) -> str:
    """Format a report.json value for display; `path` is its JSON path (e.g. 'rates.original.harmful.rate').

    Rates and their interval bounds (and the monitor's TPR/FPR, the audit's rates and shares removed) become
    percentages with one decimal, other floats 4 significant
    digits, integers stay exact, null is a dash, lists and objects are compact JSON.
    """
    parts = path.split(".")
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and parts[0] in ("rates", "safety") and parts[-1] in PERCENT_FIELDS:
        return f"{100 * value:.1f}%"
    if isinstance(value, float) and parts[0] in ("monitor", "audit") and parts[-1][:4] in ("tpr@", "fpr@"):
        return f"{100 * value:.1f}%"
    if isinstance(value, float) and parts[0] == "audit" and parts[-1] in ("rate", "removed", "detectable"):
        return f"{100 * value:.1f}%"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
