"""LyapLock (its §3.3 as the authors' code computes it; docs/methods.md):
MEMIT's least squares plus a queue-weighted drift penalty and a past-edit memory.

Per layer it keeps C, W₀, the memory sums S_vk = Σ_p V̂_p K_pᵀ and S_kk = Σ_p K_p K_pᵀ, and a normalised virtual
queue q. With D(W) = tr((W − W₀) C (W − W₀)ᵀ) (methods/drift.py):

  step t = 0   Δ = R Kᵀ (K Kᵀ + λ C)⁻¹                                  (plain MEMIT with λ)
               D_base = D(W'),  threshold D̄ = ρ · D_base,  q = 1
  step t ≥ 1   Δ = [V R Kᵀ + λ q (W₀ − W) C + V (S_vk − W S_kk)] · (V K Kᵀ + λ q C + V S_kk)⁻¹

W' = W + Δ is the exact minimiser of
  V ‖W'K − (WK + R)‖² + V Σ_p ‖W'K_p − V̂_p‖² + λ q tr((W' − W₀) C (W' − W₀)ᵀ)
(setting its gradient to zero gives the line above). After each layer's update — with the weight that was really
written, i.e. after any update transform such as RECT — D_t = D(W'), q ← max(q + D_t/D̄ − 1, 1), V̂ = W'K,
S_vk += V̂ Kᵀ, S_kk += K Kᵀ. Nothing decays. λ is scale-aware like MEMIT's (λ = per_key_dim · m unless absolute).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from methods.drift import preservation_drift
from methods.linalg import spd_solve
from methods.solvers.base import SolverDefaults, resolve_lambda

QUEUE_FLOOR = 1.0


@dataclass
class _LayerState:
    c: torch.Tensor  # C, m×m
    original: torch.Tensor  # W₀, d×m
    s_vk: torch.Tensor  # Σ V̂_p K_pᵀ, d×m
    s_kk: torch.Tensor  # Σ K_p K_pᵀ, m×m
    queue: float = QUEUE_FLOOR
    threshold: float | None = None  # D̄, set after the first step
    steps: int = 0
    last_drift: float = 0.0
    drift_sum: float = 0.0


def lyaplock_update(weight: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor, c: torch.Tensor,
                    original: torch.Tensor, s_vk: torch.Tensor, s_kk: torch.Tensor, lam: float, v: float,
                    queue: float, what: str = "LyapLock") -> torch.Tensor:
    """Δ for step t ≥ 1 (float64): the exact minimiser of the objective in the module docstring, minus W."""
    w = weight.double()
    k, r = keys.double(), residuals.double()
    system = v * (k @ k.T) + (lam * queue) * c + v * s_kk  # m×m, symmetric positive definite
    rhs = v * (r @ k.T) + (lam * queue) * ((original - w) @ c) + v * (s_vk - w @ s_kk)  # d×m
    return spd_solve(system, rhs.T, what).T  # Δ = rhs · system⁻¹ (system is symmetric)


@dataclass
class LyapLockSolver(SolverDefaults):
    mom2_update_weight: float | None = None
    mom2_update_weight_per_key_dim: float = 1.0
    V: float = 1.0
    rho: float = 60.0
    name: str = "lyaplock"
    _lambda: float = 0.0
    _state: dict[int, _LayerState] = field(default_factory=dict, repr=False)

    def prepare(self, layers, second_moments, weights):
        m = next(iter(second_moments.values())).shape[0]
        self._lambda = resolve_lambda(self.mom2_update_weight, self.mom2_update_weight_per_key_dim, m)
        for layer in layers:
            c = second_moments[layer].double()
            original = weights[layer].detach().double().to(c.device).clone()
            self._state[layer] = _LayerState(c=c, original=original, s_vk=torch.zeros_like(original),
                                             s_kk=torch.zeros_like(c))

    def solve(self, layer, keys, residuals, weight):
        st = self._state[layer]
        k = keys.double().to(st.c.device)
        r = residuals.double().to(st.c.device)
        what = f"LyapLock layer {layer}"
        if st.threshold is None:  # step 0: plain MEMIT with λ
            adjusted = spd_solve(self._lambda * st.c + k @ k.T, k, what)
            return r @ adjusted.T
        return lyaplock_update(weight.to(st.c.device), k, r, st.c, st.original, st.s_vk, st.s_kk, self._lambda,
                               self.V, st.queue, what)

    def after_update(self, layer, keys, weight):
        st = self._state[layer]
        w = weight.detach().double().to(st.c.device)
        k = keys.double().to(st.c.device)
        drift = preservation_drift(w, st.original, st.c)
        if st.threshold is None:
            # D_base = D(W) after the first step; a zero drift (nothing changed) would make D̄ = 0 and the queue
            # divide by zero, so the threshold is floored at the smallest positive float64.
            st.threshold = max(self.rho * drift, torch.finfo(torch.float64).tiny)
            st.queue = QUEUE_FLOOR
        else:
            st.queue = max(st.queue + drift / st.threshold - 1.0, QUEUE_FLOOR)
        values = w @ k  # V̂ = W'K: what this batch's keys map to now, remembered from here on
        st.s_vk += values @ k.T
        st.s_kk += k @ k.T
        st.steps += 1
        st.last_drift = drift
        st.drift_sum += drift

    def metrics(self):
        out = {"lyaplock/lambda": self._lambda, "lyaplock/V": float(self.V), "lyaplock/rho": float(self.rho)}
        for layer, st in self._state.items():
            if not st.steps:
                continue
            out[f"lyaplock/L{layer}/drift"] = st.last_drift
            out[f"lyaplock/L{layer}/drift_mean"] = st.drift_sum / st.steps
            out[f"lyaplock/L{layer}/threshold"] = float(st.threshold)
            out[f"lyaplock/L{layer}/queue"] = st.queue
        return out

    def state_dict(self):
        return {str(layer): {"s_vk": st.s_vk.cpu(), "s_kk": st.s_kk.cpu(), "queue": st.queue,
                             "threshold": st.threshold, "steps": st.steps, "last_drift": st.last_drift,
                             "drift_sum": st.drift_sum} for layer, st in self._state.items()}

    def load_state_dict(self, state):
        for layer, saved in state.items():
            st = self._state[int(layer)]
            st.s_vk = saved["s_vk"].to(st.c.device)
            st.s_kk = saved["s_kk"].to(st.c.device)
            for key in ("queue", "threshold", "steps", "last_drift", "drift_sum"):
                setattr(st, key, saved[key])
