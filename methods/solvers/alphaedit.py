"""AlphaEdit (Fang et al. 2025; docs/methods.md): MEMIT's update projected onto the null space of the preserved keys.

Projector, once per layer from C's eigendecomposition: keep the eigenvectors U_null of the "small" eigenvalues,
P = U_null U_nullᵀ. Two ways to call an eigenvalue small:

* ``absolute`` (the paper): eigenvalue < ``nullspace_threshold`` (2e-2 on the per-token mean). Does not transfer
  between models or corpora.
* ``energy``: the largest null space whose share of tr(C) stays ≤ ``nullspace_energy`` — says directly how much
  of the preserved keys' energy the edit may touch.

Update: X = solve(P(KKᵀ + K_p K_pᵀ) + α I, P K Rᵀ), Δ = Xᵀ = R (solve(…, P K))ᵀ, so Δ P = Δ. After every batch
the batch's keys, re-read on the edited model, are added to K_p K_pᵀ (the past-edit memory). λ does not enter.

With a ``cache_dir`` the projectors are computed once per (C, null-space rule) and shared by every trial through
``<cache_dir>/projectors/<key>.pt``, keyed by a hash of C's bytes (methods/infra/cache.py: concurrent trials wait for
the first instead of recomputing the m×m eigendecomposition).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from methods.infra.cache import cached_path, content_key
from methods.linalg import general_solve
from methods.solvers.base import SolverDefaults


def nullspace_projector(second_moment: torch.Tensor, mode: str, threshold: float, energy: float):
    """(P, number of null directions, tr(PC)/tr(C)) for one layer's C."""
    c = second_moment.double()
    eigvals, eigvecs = torch.linalg.eigh(c)  # ascending
    eigvals = eigvals.clamp(min=0)
    if mode == "absolute":
        null = eigvals < threshold
    elif mode == "energy":
        share = torch.cumsum(eigvals, 0) / eigvals.sum().clamp(min=1e-300)
        null = share <= energy
    else:
        raise ValueError(f"unknown null-space mode {mode!r} (absolute | energy)")
    basis = eigvecs[:, null]
    projector = basis @ basis.T
    energy_share = float(eigvals[null].sum() / eigvals.sum().clamp(min=1e-300))
    return projector, int(null.sum()), energy_share


def cached_nullspace_projector(second_moment: torch.Tensor, mode: str, threshold: float, energy: float,
                               cache_dir: Path):
    """``nullspace_projector``, read from the shared cache or computed once and stored there."""
    c = second_moment.detach().double()
    digest = hashlib.sha256(c.cpu().contiguous().numpy().tobytes()).hexdigest()
    rule = {"mode": mode, "threshold": threshold} if mode == "absolute" else {"mode": mode, "energy": energy}
    key = content_key({"C": digest, "shape": list(c.shape), **rule})

    def build(tmp: Path) -> None:  # the eigendecomposition runs where C is (m = 14,336: seconds on a GPU)
        projector, dims, share = nullspace_projector(c, mode, threshold, energy)
        torch.save({"projector": projector.cpu(), "null_dims": dims, "energy_share": share}, tmp)

    saved = torch.load(cached_path(cache_dir, "projectors", key, build, suffix=".pt"), weights_only=True)
    return saved["projector"].to(second_moment.device), int(saved["null_dims"]), float(saved["energy_share"])


@dataclass
class AlphaEditSolver(SolverDefaults):
    l2: float = 10.0
    nullspace_mode: str = "absolute"
    nullspace_threshold: float = 2e-2
    nullspace_energy: float = 0.02
    name: str = "alphaedit"
    wants_keys_after_batch: bool = True
    cache_dir: Path | None = None  # where projectors are shared between trials (None: computed in-process)
    _projector: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _past_kk: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    # P·K_pK_pᵀ kept up to date incrementally ((P K')K'ᵀ per batch), so no m×m×m product is needed per solve.
    _projected_past_kk: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _null_dims: dict[int, int] = field(default_factory=dict, repr=False)
    _null_energy: dict[int, float] = field(default_factory=dict, repr=False)

    def prepare(self, layers, second_moments, weights):
        for layer in layers:
            args = (second_moments[layer], self.nullspace_mode, self.nullspace_threshold, self.nullspace_energy)
            projector, dims, share = (cached_nullspace_projector(*args, Path(self.cache_dir)) if self.cache_dir
                                      else nullspace_projector(*args))
            self._projector[layer] = projector
            self._null_dims[layer] = dims
            self._null_energy[layer] = share
            self._past_kk.setdefault(layer, torch.zeros_like(projector))
            self._projected_past_kk[layer] = projector @ self._past_kk[layer]

    def solve(self, layer, keys, residuals, weight):
        p = self._projector[layer]
        k = keys.double().to(p.device)
        r = residuals.double().to(p.device)
        projected_keys = p @ k
        system = projected_keys @ k.T + self._projected_past_kk[layer]  # P(KKᵀ + K_pK_pᵀ)
        system.diagonal().add_(self.l2)
        # X = system⁻¹ (PK) Rᵀ, solved for the n columns of PK and then multiplied by Rᵀ: n right-hand sides
        # instead of d (1 against 576 for SmolLM2 at batch 1).
        solved = general_solve(system, projected_keys, f"AlphaEdit layer {layer}")
        return r @ solved.T

    def after_batch(self, keys_after):
        for layer, k in keys_after.items():
            k = k.double().to(self._past_kk[layer].device)
            self._past_kk[layer] += k @ k.T
            self._projected_past_kk[layer] += (self._projector[layer] @ k) @ k.T

    def projector(self, layer: int) -> torch.Tensor:
        return self._projector[layer]

    def metrics(self):
        out = {}
        for layer in self._projector:
            out[f"alphaedit/L{layer}/null_dims"] = float(self._null_dims[layer])
            out[f"alphaedit/L{layer}/null_energy_share"] = self._null_energy[layer]
        return out

    def state_dict(self):
        return {"past_kk": {layer: t.cpu() for layer, t in self._past_kk.items()}}

    def load_state_dict(self, state):
        for layer, t in state["past_kk"].items():
            layer = int(layer)
            self._past_kk[layer] = t.to(self._projector[layer].device)
            self._projected_past_kk[layer] = self._projector[layer] @ self._past_kk[layer]
