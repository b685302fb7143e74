"""Numerically careful solves shared by every solver (float64, Cholesky where the system is SPD)."""

from __future__ import annotations

import torch


class SingularSolveError(RuntimeError):
    """The linear system of an update is singular or not finite; the trial should fail with this reason."""


def spd_solve(a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    """Solve ``a x = b`` for symmetric positive-definite ``a`` by Cholesky (float64); LU if Cholesky fails."""
    a64, b64 = a.double(), b.double()
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        raise SingularSolveError(f"{what}: the system contains NaN or Inf")
    chol, info = torch.linalg.cholesky_ex(a64)
    if int(info) == 0:
        return torch.cholesky_solve(b64, chol)
    return general_solve(a64, b64, what)


def general_solve(a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    a64, b64 = a.double(), b.double()
    try:
        x = torch.linalg.solve(a64, b64)
    except RuntimeError as err:  # torch reports exact singularity as a RuntimeError subclass
        raise SingularSolveError(f"{what}: singular system ({err})") from err
    if not torch.isfinite(x).all():
        raise SingularSolveError(f"{what}: the solution is not finite")
    return x
