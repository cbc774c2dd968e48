"""One writer per run directory: an exclusive lock held for the life of the command that writes the run.

``lock_run`` takes ``fcntl.flock`` on ``RUN/.run.lock`` (the holder's process id written in it) and keeps it
until the process exits, when the operating system releases it, so a killed command leaves no stale lock.
A second process that would write the same run gets a one-line error naming the holder. A process takes
each run's lock once (a command that reopens its own run takes it again freely); commands that only read
a run (``evaluate --ablate``, ``generate --add``) do not lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import RefusalError

LOCK_NAME = ".run.lock"
_held: dict[Path, int] = {}  # run directory -> the open lock file's descriptor, for the life of the process


def lock_run(path: Path) -> None:
    """Hold the exclusive lock on run directory ``path`` (made if missing) until this process exits."""
    key = Path(path).resolve()  # one key per directory, however it is reached (symlinks, "..")
    if key in _held:
        return
    try:
        key.mkdir(parents=True, exist_ok=True)
        fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RefusalError(f"cannot create run directory {path} ({e.strerror}); choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RefusalError(f"run directory {path} is in use by process {holder}; wait for it to finish or use another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[key] = fd
