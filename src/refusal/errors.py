"""One exception family, so the CLI can print a one-line message and exit non-zero."""


class RefusalError(Exception):
    """A problem the user can fix: the message names the item, the cause and the fix."""


class UnsupportedModelError(RefusalError):
    """The model's architecture has no known decoder layers or residual-stream writers."""


class FidelityError(RefusalError):
    """An exported checkpoint does not reproduce hooked ablation."""


class NumericsError(RefusalError):
    """NaN or inf appeared where a finite number was needed."""


def check_finite(tensor, what: str) -> None:
    """Raise NumericsError naming `what` if `tensor` holds NaN or inf."""
    import torch

    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise NumericsError(
            f"{what} has {bad} NaN/inf value(s); run the model in float32 (--dtype float32) and check that it loads and generates correctly"
        )
