"""Shared by the benchmarks: run a stage, print its wall time and the process's peak RSS so far."""

from __future__ import annotations

import resource
import time


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


class Stages:
    """``stages.run(name, fn)`` times ``fn()``, prints a line, keeps (name, seconds, peak RSS)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    def run(self, name: str, fn):
        start = time.perf_counter()
        value = fn()
        self.rows.append((name, time.perf_counter() - start, peak_rss_gb()))
        print(f"{name:24s} {self.rows[-1][1]:8.1f} s   peak RSS {self.rows[-1][2]:5.2f} GB", flush=True)
        return value

    def seconds(self, *names: str) -> float:
        """Total seconds of the named stages (all stages if none named)."""
        return sum(r[1] for r in self.rows if not names or r[0] in names)
