"""Option text to values: layer lists, word lists, durations, local paths (used by the settings tree)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def int_list(text: str) -> list[int]:
    """'8-12,15' -> [8, 9, 10, 11, 12, 15]; '-1,-2' -> [-1, -2]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                if int(hi) < int(lo):
                    raise argparse.ArgumentTypeError(f"{part!r} is an empty range; write it low-high, e.g. '{hi}-{lo}'")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers like '8-12,15' or '-1,-2'") from None
    return out


def float_list(text: str) -> list[float]:
    """'1.1,1.2' -> [1.1, 1.2]."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers like '0.5,0.7'") from None


def word_list(text: str) -> list[str]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError(f"{text!r} names no words; give a comma-separated list like 'I,As,Sorry'")
    return words


def duration(text: str) -> float | None:
    """'20m', '90s', '1h', '300' -> seconds; 'none' -> no limit."""
    if text.strip().lower() == "none":
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like '20m', '90s', '1h' or 'none'") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"duration {text!r} must be positive")
    return value


def auto_or_number(text: str) -> float | str:
    """'auto' stays 'auto' (a value the program derives); anything else must be a number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number") from None


def local_path(text: str) -> str:
    """A path that exists here becomes absolute (a run read from another directory finds it); anything else is kept."""
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text
