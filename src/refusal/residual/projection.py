"""The one projection primitive: remove a vector's component along a unit direction.

Used by the hooks (activations: functional, so gradients flow), by weight edits (in place, a
rank-1 update of a matrix's rows or columns with an optional norm restore) and by bias edits.
Always computed in float32 and cast back to the tensor's dtype.
"""

from __future__ import annotations

import torch


def project_out(
    x: torch.Tensor, u: torch.Tensor, strength: float = 1.0, rows: bool = True, norms: torch.Tensor | None = None, in_place: bool = False
) -> torch.Tensor:
    """``x``'s vectors lose ``strength`` times their component along unit ``u``.

    The vectors are ``x``'s last dimension when ``rows`` (activations, biases, embedding rows,
    GPT-2 Conv1D rows), else a matrix's columns (``nn.Linear`` weights ``[d_model, in]``; fused experts
    ``[experts, d_model, in]``: each expert's columns). With
    ``norms`` every vector is then rescaled to that norm. ``in_place`` writes the result into ``x``
    (call under ``torch.no_grad()`` for parameters): a float32 matrix gets a rank-1 update with no
    copy of it (the 0.5 GB embedding of a small model stays one tensor).
    """
    u = u.to(x.device, torch.float32)
    if in_place and x.dim() == 2:  # a weight matrix: rank-1 update (of x itself when it is float32)
        y = x if x.dtype == torch.float32 else x.float()
        y = y.addr_(y @ u, u, alpha=-strength) if rows else y.addr_(u, u @ y, alpha=-strength)
    elif rows:
        x32 = x.float()
        y = x32 - strength * (x32 @ u).unsqueeze(-1) * u
    else:  # columns: a matrix [d_model, in], or fused experts [experts, d_model, in]
        x32 = x.float()
        y = x32 - strength * u.unsqueeze(-1) * (u @ x32).unsqueeze(-2)
    if norms is not None:
        dim = -1 if rows else -2
        scale = (norms.to(y.device) / y.norm(dim=dim).clamp_min(1e-12)).unsqueeze(dim)
        y = y.mul_(scale) if y is x else y * scale
    if in_place:
        if y is not x:
            x.copy_(y.to(x.dtype))
        return x
    return y.to(x.dtype)


def project_out_coordinates(x: torch.Tensor, u: torch.Tensor, strength: float, rows: bool, norms: torch.Tensor) -> torch.Tensor:
    """In place, the published norm-preserving form (grimjim, "norm-preserving biprojected abliteration", 2025):
    each residual coordinate's weights (a Linear's rows, an embedding's columns) are scaled to unit norm, the
    written vectors of that matrix lose ``strength`` times their component along unit ``u``, and each coordinate's
    weights are rescaled to ``norms`` (their original norms). The direction's component is then not exactly
    removed: the rescaling moves it back in part; that is the published method's trade."""
    dim = -2 if rows else -1  # the axis of one residual coordinate's weights
    y = x.float()
    y = y / y.norm(dim=dim, keepdim=True).clamp_min(1e-12)
    y = project_out(y, u, strength, rows=rows)
    y = y * (norms.to(y.device) / y.norm(dim=dim).clamp_min(1e-12)).unsqueeze(dim)
    return x.copy_(y.to(x.dtype))
