"""One exception family, so the CLI can print a one-line message and exit non-zero."""

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class RefusalError(Exception):
    """A problem the user can fix: the message names the item, the cause and the fix."""


class UnsupportedModelError(RefusalError):
    """The model's architecture has no known decoder layers or residual-stream writers."""


class FidelityError(RefusalError):
    """An exported checkpoint does not reproduce hooked ablation."""


class NumericsError(RefusalError):
    """NaN or inf appeared where a finite number was needed."""


def check_finite(tensor: "torch.Tensor", what: str) -> None:
    """Raise NumericsError naming `what` if `tensor` holds NaN or inf."""
    import torch

    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise NumericsError(
            f"{what} has {bad} NaN/inf value(s); run the model in float32 (--dtype float32) and check that it loads and generates correctly"
        )


# What an operating-system error means for the user, by errno: (cause, fix).
_OS_CAUSES = {
    errno.ENOSPC: ("the disk is full", "free space or choose another location"),
    errno.EDQUOT: ("the disk quota is used up", "free space within your quota or choose another location"),
    errno.EROFS: ("the file system is read-only", "choose a writable location"),
    errno.EFBIG: ("a file exceeds the file system's or the process's file-size limit", "raise the limit (ulimit -f) or choose another file system"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another location"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another location"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n)"),
}


def os_error_line(e: OSError) -> str:
    """One line for an OSError that reached the command line: the file, the real cause (by errno) and its fix."""
    place = f" ({e.filename})" if e.filename else ""
    cause, fix = _OS_CAUSES.get(e.errno or 0, (None, "check the location"))
    detail = e.strerror or str(e)
    what = f"{cause} [{detail}]" if cause else detail
    return f"{what}{place}; {fix}, then re-run"
