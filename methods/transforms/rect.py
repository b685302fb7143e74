"""RECT (Gu et al. 2024; docs/methods.md):
keep only the top-k fraction of Δ's entries by relative change, zero the rest.

    score_ij = |Δ_ij| / |W_ij|      (W = the current weight, before Δ is added)
    Δ'_ij = Δ_ij if score_ij is among the n_keep = max(1, round(keep · d·m)) largest, else 0

Where W_ij = 0 and Δ_ij ≠ 0 the relative change is +inf (those entries rank first); where Δ_ij = 0 the score is
0 (keeping a zero changes nothing, so it must not take a slot from a real change).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.transforms.sparsify import TransformBase, check_keep, keep_top


def relative_change(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|Δ| / |W| in float64, +inf where W = 0 and Δ ≠ 0, 0 where Δ = 0; no division by zero is evaluated."""
    d = delta.double().abs()
    w = weight.detach().to(device=delta.device, dtype=torch.float64).abs()
    zero_w = w == 0
    ratio = d / torch.where(zero_w, torch.ones_like(w), w)  # safe denominator, fixed up below
    ratio = torch.where(zero_w, torch.full_like(d, float("inf")), ratio)
    return torch.where(d == 0, torch.zeros_like(d), ratio)


def rect(delta: torch.Tensor, weight: torch.Tensor, keep: float) -> torch.Tensor:
    """Δ (float64) with only its n_keep entries of largest relative change |Δ_ij|/|W_ij| left."""
    check_keep(keep)
    if delta.shape != weight.shape:
        raise ValueError(f"RECT: Δ {tuple(delta.shape)} and W {tuple(weight.shape)} differ in shape")
    delta = delta.double()
    return keep_top(delta, relative_change(delta, weight), keep)


@dataclass
class Rect(TransformBase):
    keep: float = 0.2
    name: str = "rect"

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def _transform(self, delta, weight):
        return rect(delta, weight, self.keep), {}
