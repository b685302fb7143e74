"""MEMIT (Meng et al. 2023; docs/methods.md):
Δ = R Kᵀ (λ C + K Kᵀ)⁻¹, applied to the current (already edited) weight.

λ (``mom2_update_weight``) trades the new keys against the preserved key distribution C. Its useful size scales
with the MLP width m: for a typical key, kᵀ(λC)⁻¹k ≈ m/λ. The published tables sit near λ ≈ m (Llama-3-8B 15000 for
m = 14336, GPT-J 15000 for 16384), and λ = 1500 is what worked on SmolLM2 (m = 1536). So by default
λ = ``mom2_update_weight_per_key_dim`` · m; an absolute ``mom2_update_weight`` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from methods.linalg import cholesky_factor, solve_gram_updated
from methods.solvers.base import SolverDefaults, resolve_lambda


@dataclass
class MemitSolver(SolverDefaults):
    mom2_update_weight: float | None = None
    mom2_update_weight_per_key_dim: float = 1.0
    name: str = "memit"
    _scaled_c: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _scaled_c_factor: dict[int, torch.Tensor | None] = field(default_factory=dict, repr=False)  # Cholesky of λC
    _lambda: float = 0.0

    def prepare(self, layers, second_moments, weights):
        m = next(iter(second_moments.values())).shape[0]
        self._lambda = resolve_lambda(self.mom2_update_weight, self.mom2_update_weight_per_key_dim, m)
        self._scaled_c = {layer: self._lambda * second_moments[layer].double() for layer in layers}
        # λC never changes during a run: factored once, each batch's solve is O(m²n) (methods/linalg.py).
        self._scaled_c_factor = {layer: cholesky_factor(c) for layer, c in self._scaled_c.items()}

    def solve(self, layer, keys, residuals, weight):
        k = keys.double().to(self._scaled_c[layer].device)
        adjusted_keys = solve_gram_updated(self._scaled_c[layer], self._scaled_c_factor[layer], k,
                                           f"MEMIT layer {layer}")  # (λC + KKᵀ)⁻¹ K
        return residuals.double().to(k.device) @ adjusted_keys.T

    def metrics(self):
        return {"memit/lambda": self._lambda}
