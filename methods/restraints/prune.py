"""PRUNE (Ma et al. 2025, §4; docs/methods.md):
restrain the large singular values of the cumulative edit ΔW = W − W₀.

    ΔW = U Σ Vᵀ (thin SVD),   σ̂ = σ_max(W₀)
    log:    F(σ) = σ                              for σ < σ̂
            F(σ) = log_α(σ) − log_α(σ̂) + σ̂       for σ ≥ σ̂
    linear: F(σ) = σ                              for σ < σ̂
            F(σ) = σ/β + (β−1)σ̂/β                 for σ ≥ σ̂
    W' = W₀ + U diag(min(F(σ), σ)) Vᵀ

F'(σ̂) = 1/(σ̂ ln α) for the log variant, so F(σ) > σ just above σ̂ when σ̂·ln α < 1: the min(F, σ) guard
keeps the restraint from ever enlarging an edit (clipped values are counted and logged).

Modes: "once" (official protocol; editing runs unrestrained and W' is swapped in only to evaluate) and
"every_step" (appendix C.6; W' replaces the live weights after every batch).

``sigma_hat_scale`` (EditGrid's extension, default 1 = the paper) sets σ̂ = scale · σ_max(W₀). On a small model
over a short run σ_max(ΔW) may never reach σ_max(W₀) and the paper's restraint never engages (SmolLM2-135M after
100 CounterFact edits: σ_max(ΔW) ≈ 10–15 against σ̂ ≈ 24); a scale < 1 lets one study the mechanism there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

VARIANTS = ("log", "linear")
MODES = ("once", "every_step")


def check_parameters(variant: str, alpha: float, beta: float) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown PRUNE variant {variant!r} (expected one of {', '.join(VARIANTS)})")
    if not alpha > 1:
        raise ValueError(f"PRUNE alpha (log base) must be > 1, got {alpha!r}")
    if not beta > 1:
        raise ValueError(f"PRUNE beta (linear slope divisor) must be > 1, got {beta!r}")


def restrain_singular_values(sigma: torch.Tensor, sigma_hat: float, variant: str, alpha: float,
                             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(min(F(σ), σ), mask of the σ where the min(·, σ) guard changed F) in float64."""
    check_parameters(variant, alpha, beta)
    if not (math.isfinite(sigma_hat) and sigma_hat > 0):
        raise ValueError(f"PRUNE sigma_hat must be finite and > 0, got {sigma_hat!r}")
    s = sigma.double()
    large = s >= sigma_hat
    if variant == "log":
        # Clamp inside the log so the unused branch never evaluates log(0).
        f_large = (torch.log(s.clamp(min=sigma_hat)) - math.log(sigma_hat)) / math.log(alpha) + sigma_hat
    else:
        f_large = s / beta + (beta - 1) * sigma_hat / beta
    f = torch.where(large, f_large, s)
    clipped = f > s
    return torch.minimum(f, s), clipped


def restrain_delta(delta: torch.Tensor, sigma_hat: float, variant: str, alpha: float,
                   beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """U diag(F(σ)) Vᵀ of ΔW (float64), F applied over the numerical rank; info on σ_max and clipping."""
    d = delta.double()
    u, sigma, vh = torch.linalg.svd(d, full_matrices=False)
    if sigma.numel() == 0:
        return d.clone(), {"sigma_max_before": 0.0, "sigma_max_after": 0.0, "clipped": 0.0}
    tol = float(sigma.max()) * max(d.shape) * torch.finfo(torch.float64).eps
    signal = sigma > tol  # below the tolerance the direction is noise: leave it as it is
    f, clipped = restrain_singular_values(sigma, sigma_hat, variant, alpha, beta)
    new_sigma = torch.where(signal, f, sigma)
    info = {
        "sigma_max_before": float(sigma.max()),
        "sigma_max_after": float(new_sigma.max()),
        "clipped": float((clipped & signal).sum()),
    }
    return (u * new_sigma) @ vh, info


def condition_number(matrix: torch.Tensor) -> float:
    """σ_max / σ_min over the min(d, m) singular values; inf when σ_min = 0."""
    s = torch.linalg.svdvals(matrix.double())
    s_min = float(s.min())
    return math.inf if s_min == 0 else float(s.max()) / s_min


@dataclass
class PruneRestraint:
    mode: str = "once"
    variant: str = "log"
    alpha: float = math.e
    beta: float = 2.0
    sigma_hat_scale: float = 1.0
    name: str = "prune"
    _originals: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _sigma_hat: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    _info: dict[int, dict[str, float]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown PRUNE mode {self.mode!r} (expected one of {', '.join(MODES)})")
        check_parameters(self.variant, self.alpha, self.beta)
        if not (math.isfinite(self.sigma_hat_scale) and self.sigma_hat_scale > 0):
            raise ValueError(f"PRUNE sigma_hat_scale must be finite and > 0, got {self.sigma_hat_scale!r}")

    @property
    def every_step(self) -> bool:
        return self.mode == "every_step"

    def prepare(self, originals: dict[int, torch.Tensor]) -> None:
        """Keep W₀ (float64 copy) and σ̂ = scale·σ_max(W₀) per layer; W₀ never changes, so this runs once."""
        for layer, weight in originals.items():
            w0 = weight.detach().to(torch.float64).clone()
            self._originals[layer] = w0
            self._sigma_hat[layer] = self.sigma_hat_scale * float(torch.linalg.svdvals(w0).max())

    def sigma_hat(self, layer: int) -> float:
        return self._sigma_hat[self._check_layer(layer)]

    def _check_layer(self, layer: int) -> int:
        if layer not in self._originals:
            raise KeyError(f"PRUNE: layer {layer} was not prepared (call prepare() with the unedited weights)")
        return layer

    def restrained(self, weights: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """W₀ + F(W − W₀) per layer, in each weight's dtype and device; records the per-layer diagnostics."""
        out: dict[int, torch.Tensor] = {}
        for layer, weight in weights.items():
            w0 = self._originals[self._check_layer(layer)]
            delta = weight.detach().to(device=w0.device, dtype=torch.float64) - w0
            new_delta, info = restrain_delta(delta, self._sigma_hat[layer], self.variant, self.alpha, self.beta)
            new_weight = w0 + new_delta
            info["cond"] = condition_number(new_weight)
            self._info[layer] = info
            out[layer] = new_weight.to(device=weight.device, dtype=weight.dtype)
        return out

    def apply_in_place(self, weights: dict[int, torch.Tensor]) -> None:
        """Overwrite the live weights with their restrained values ("every_step")."""
        new = self.restrained(weights)
        with torch.no_grad():
            for layer, weight in weights.items():
                weight.copy_(new[layer])

    @contextmanager
    def swapped_in(self, weights: dict[int, torch.Tensor]) -> Iterator[None]:
        """Evaluate with the restrained weights ("once"); the live values come back bit-exactly on exit."""
        new = self.restrained(weights)  # computed before anything is touched
        saved = {layer: weight.detach().clone() for layer, weight in weights.items()}
        try:
            with torch.no_grad():
                for layer, weight in weights.items():
                    weight.copy_(new[layer])
            yield
        finally:
            with torch.no_grad():
                for layer, weight in weights.items():
                    weight.copy_(saved[layer])

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for layer, info in self._info.items():
            for key, value in info.items():
                out[f"{self.name}/L{layer}/{key}"] = value
        for layer, sigma_hat in self._sigma_hat.items():
            out[f"{self.name}/L{layer}/sigma_hat"] = sigma_hat
        if self.variant == "log" and self._sigma_hat:
            # < 1 means F would enlarge σ just above σ̂ for some layer: the min(F, σ) guard is active there.
            out[f"{self.name}/log_guard_min"] = min(s * math.log(self.alpha) for s in self._sigma_hat.values())
        return out
