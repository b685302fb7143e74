"""ROME (Meng et al. 2022; docs/methods.md):
a rank-one update at one layer that maps the key k* exactly onto the target v*.

    Δ = (v* − W k*) (C⁻¹ k*)ᵀ / ((C⁻¹ k*)ᵀ k*)        so that (W + Δ) k* = v*

v* is optimised at the output of that layer's MLP (target site "mlp"), and the residual is taken at the solver's
own key (R = V* − W K, ``residuals_from_keys``). ROME edits one fact at a time; a batch of n requests is applied as
n successive rank-one updates, each correcting what the earlier ones already moved its key by, so the last request
of the batch is inserted exactly and the earlier ones up to the later updates' interference — as sequential ROME.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from methods.linalg import spd_solve
from methods.solvers.base import SolverDefaults


def rank_one_update(key: torch.Tensor, residual: torch.Tensor, inv_c_key: torch.Tensor) -> torch.Tensor:
    """(r (C⁻¹k)ᵀ) / ((C⁻¹k)ᵀ k): the minimal-C-norm change with Δ k = r."""
    return torch.outer(residual, inv_c_key) / torch.dot(inv_c_key, key)


@dataclass
class RomeSolver(SolverDefaults):
    name: str = "rome"
    residuals_from_keys: bool = True
    max_layers: int | None = 1
    _c: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def prepare(self, layers, second_moments, weights):
        self._c = {layer: second_moments[layer].double() for layer in layers}

    def solve(self, layer, keys, residuals, weight):
        c = self._c[layer]
        k = keys.double().to(c.device)
        r = residuals.double().to(c.device)
        inv_c_keys = spd_solve(c, k, f"ROME layer {layer}")  # C⁻¹ K, one column per request
        delta = torch.zeros(r.shape[0], k.shape[0], dtype=torch.float64, device=c.device)
        for j in range(k.shape[1]):
            still_needed = r[:, j] - delta @ k[:, j]
            delta += rank_one_update(k[:, j], still_needed, inv_c_keys[:, j])
        return delta
