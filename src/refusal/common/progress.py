"""Progress bars that can be silenced (``--quiet``) without touching call sites."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

_state = {"quiet": False}
console = Console(stderr=True)


def set_quiet(quiet: bool) -> bool:
    """Silence (or restore) our status lines and bars, and transformers' bars with them.

    Returns the previous setting, so a caller can put it back.
    """
    from transformers.utils import logging as hf_logging

    previous = _state["quiet"]
    _state["quiet"] = quiet
    if quiet and not previous:
        _state["hf_bars"] = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    elif previous and not quiet and _state.get("hf_bars"):
        hf_logging.enable_progress_bar()
    return previous


def is_quiet() -> bool:
    return _state["quiet"]


def log(message: str) -> None:
    """Print a status line to stderr unless quiet."""
    if not _state["quiet"]:
        console.print(message, highlight=False, soft_wrap=True)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr (none when quiet or not a terminal)."""
    if _state["quiet"] or not console.is_terminal:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            progress.advance(task)
