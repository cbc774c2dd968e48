"""Small statistics for reporting rates honestly."""

from __future__ import annotations

import math


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% (by default) Wilson score interval for a binomial rate; (0, 1) when total is 0."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def format_rate(successes: int, total: int) -> str:
    lo, hi = wilson_interval(successes, total)
    return f"{successes}/{total} ({successes / total:.0%}, 95% CI {lo:.0%}-{hi:.0%})" if total else "0/0"


def rate_values(entry: dict) -> tuple[float, float, float]:
    """(rate, low, high) of a rate entry ({"refused", "total"} and optionally "rate", "low", "high"):
    the stored values where present, otherwise computed (Wilson 95%)."""
    refused, total = entry["refused"], entry["total"]
    low, high = wilson_interval(refused, total)
    rate = entry.get("rate")
    rate = (refused / total if total else 0.0) if rate is None else rate
    return rate, low if entry.get("low") is None else entry["low"], high if entry.get("high") is None else entry["high"]
