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


def cholesky_factor(a: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor of symmetric ``a`` (float64), or None when ``a`` is not positive definite."""
    chol, info = torch.linalg.cholesky_ex(a.double())
    return chol if int(info) == 0 else None


def solve_gram_updated(a: torch.Tensor, a_factor: torch.Tensor | None, k: torch.Tensor, what: str) -> torch.Tensor:
    """(A + K Kᵀ)⁻¹ K for SPD A [m×m] and keys K [m×n], given A's Cholesky factor (``cholesky_factor``).

    Push-through identity: (A + KKᵀ)⁻¹K = A⁻¹K (I + KᵀA⁻¹K)⁻¹. With A's factor computed once (A = λC is fixed for a
    whole sequential run), a batch costs two triangular solves and an n×n system, O(m²n), instead of a new m×m
    factorisation, O(m³). Without a factor, or for batches of more than m/2 keys, the m×m system is solved
    directly."""
    k64 = k.double()
    m, n = k64.shape
    if a_factor is None or n > m // 2:
        return spd_solve(a.double() + k64 @ k64.T, k64, what)
    a_inv_k = torch.cholesky_solve(k64, a_factor)
    capacity = k64.T @ a_inv_k  # n×n, symmetric positive definite once I is added
    capacity.diagonal().add_(1.0)
    return spd_solve(capacity, a_inv_k.T, what).T  # A⁻¹K · capacity⁻¹ (capacity is symmetric)
