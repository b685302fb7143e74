"""AdaEdit's SRFusion (Li and Chu, §4.2; docs/methods.md; our re-implementation, no public code exists):
sparse low-rank Δ.

    Δ = U Σ Vᵀ (thin SVD),   r = min(rank, numerical rank of Δ)
    u'_i = ‖u_i‖ · s(u_i) / ‖s(u_i)‖,   v'_i likewise     (i ≤ r)
    Δ' = Σ_{i≤r} σ_i u'_i v'_iᵀ

s(x) keeps the n_keep = max(1, round(keep · len(x))) largest-magnitude entries of x and zeroes the rest.
Numerical rank: #{σ_i > σ_max · max(d, m) · eps_float64}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.transforms.sparsify import TransformBase, check_keep, n_keep


def numerical_rank_tol(sigma: torch.Tensor, shape: tuple[int, ...]) -> float:
    """σ_max · max(d, m) · eps_float64 (0 for an empty spectrum)."""
    if sigma.numel() == 0:
        return 0.0
    return float(sigma.max()) * max(shape) * torch.finfo(torch.float64).eps


def sparsify_columns(vectors: torch.Tensor, keep: float) -> torch.Tensor:
    """Each column with only its n_keep largest-magnitude entries left, rescaled back to its original norm."""
    length = vectors.shape[0]
    idx = torch.topk(vectors.abs(), n_keep(length, keep), dim=0, sorted=False).indices
    sparse = torch.zeros_like(vectors).scatter_(0, idx, vectors.gather(0, idx))
    # The kept entries are the largest of a nonzero column, so the sparse norm is > 0.
    return sparse * (vectors.norm(dim=0) / sparse.norm(dim=0))


def srfusion_parts(delta: torch.Tensor, rank: int, keep: float) -> tuple[torch.Tensor, int]:
    """(Δ', r): the fused update and the number of singular triplets it was built from."""
    if rank < 1:
        raise ValueError(f"SRFusion rank must be ≥ 1, got {rank!r}")
    check_keep(keep)
    delta = delta.double()
    if delta.numel() == 0 or not bool(delta.any()):
        return torch.zeros_like(delta), 0
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, int((sigma > numerical_rank_tol(sigma, tuple(delta.shape))).sum()))
    u_kept = sparsify_columns(u[:, :r], keep)
    v_kept = sparsify_columns(vh[:r].T, keep)
    return (u_kept * sigma[:r]) @ v_kept.T, r


def srfusion(delta: torch.Tensor, rank: int, keep: float) -> torch.Tensor:
    """Δ' = Σ_{i≤r} σ_i u'_i v'_iᵀ with sparsified, renormalised singular vectors (float64)."""
    return srfusion_parts(delta, rank, keep)[0]


@dataclass
class SRFusion(TransformBase):
    rank: int = 8
    keep: float = 0.2
    name: str = "srfusion"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"SRFusion rank must be ≥ 1, got {self.rank!r}")
        check_keep(self.keep)

    def _transform(self, delta, weight):
        kept, r = srfusion_parts(delta, self.rank, self.keep)
        return kept, {"rank_kept": float(r)}
