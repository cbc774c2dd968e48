"""Docstrings say what and why; measured figures (timings, speed-ups, rates, KL values) belong in docs/bench."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "refusal"

NUMBER = r"\d+(?:\.\d+)?"
MEASURED = re.compile(
    "|".join(
        (
            rf"(?:~|\babout|\btakes?|\btook|\bin)\s*{NUMBER}\s*(?:s|sec|seconds?|ms|min|minutes?|h|hours?)\b",  # ~40 s, takes 2 min
            rf"{NUMBER}\s*[x×]\s+(?:faster|slower|quicker|less|more)\b",  # 2.7x faster
            rf"(?:~|\babout|\broughly|\bnearly)\s*{NUMBER}\s*(?:[x×%]|times\b)",  # about 1.4x, about 3%
            r"\bKL\s*(?:of\s*)?\d*\.\d+",  # KL 0.267
            r"\bmeasured\s*:",  # (measured: ...)
            r"\bmeasured on (?:the default model|a |an |\d)",  # Measured on the default model: ...
            rf"\(\s*{NUMBER}\s*(?:CPU\s*)?cores?\s*\)|\bon\s*{NUMBER}\s*(?:CPU\s*)?cores?\b",  # (2 cores), on 2 cores
        )
    ),
    re.IGNORECASE,
)


def docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the module's, every class's and every function's docstring in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node, clean=False)
            if text:
                found.append((node.body[0].lineno, text))
    return found


def measured_figures(root: Path) -> list[str]:
    """'file:line: match' for every docstring under ``root`` that states a measured figure."""
    hits = []
    for path in sorted(root.rglob("*.py")):
        for line, text in docstrings(path):
            hits += [f"{path.relative_to(root)}:{line}: {m.group(0)!r}" for m in MEASURED.finditer(" ".join(text.split()))]
    return hits


def test_no_docstring_states_a_measured_figure() -> None:
    hits = measured_figures(SRC)
    assert not hits, f"docstrings state measured figures (move them to docs/bench, keep the claim): {hits}"
