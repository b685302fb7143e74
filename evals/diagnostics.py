"""Weight diagnostics of edited matrices (docs/methods.md, "Evaluation protocols").

Per edited matrix: its Frobenius norm and relative change (AdaEdit), its condition number and the largest
singular value of the cumulative update ΔW = W − W₀ (PRUNE).

Matrices are taken as W ∈ R^{d×m} exactly as given; GPT-2's ``Conv1D`` stores the transpose, and orienting it is
the caller's concern. None of these numbers depends on the orientation anyway (singular values and norms of Wᵀ
equal those of W); the convention only matters for the shapes callers pair up.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evals.metric_names import diag_metric
from methods.drift import preservation_drift

DIAGNOSTIC_NAMES = ("weight_norm", "weight_change", "cond", "sigma_max_delta")


def _as_float64(matrix: Tensor) -> Tensor:
    # float64 keeps σ_min (and so the condition number) meaningful; on a GPU it stays there, where it is fast.
    return matrix.detach().to(torch.float64)


def weight_diagnostics(weight: Tensor, original: Tensor) -> dict[str, float]:
    """Diagnostics of one edited matrix ``weight`` (d×m) against its unedited ``original`` (same shape).

    Returns ``weight_norm`` ‖W‖_F, ``weight_change`` ‖W − W₀‖_F / ‖W₀‖_F, ``cond`` σ_max/σ_min of W over its
    min(d, m) singular values (inf when W is rank-deficient), and ``sigma_max_delta`` σ_max(W − W₀) (0 when
    unchanged). Computed in float64 on the weight's device.
    """
    if not isinstance(weight, Tensor) or not isinstance(original, Tensor):
        raise TypeError("weight and original must be torch tensors")
    if weight.ndim != 2:
        raise ValueError(f"weight must be a matrix, got shape {tuple(weight.shape)}")
    if weight.shape != original.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and original {tuple(original.shape)} differ in shape")
    if weight.numel() == 0:
        raise ValueError("weight is empty")
    edited = _as_float64(weight)
    unedited = _as_float64(original).to(edited.device)
    delta = edited - unedited

    singular_values = torch.linalg.svdvals(edited)  # descending
    sigma_max, sigma_min = singular_values[0].item(), singular_values[-1].item()
    original_norm = torch.linalg.matrix_norm(unedited).item()
    change_norm = torch.linalg.matrix_norm(delta).item()
    if original_norm > 0:
        weight_change = change_norm / original_norm
    else:
        weight_change = 0.0 if change_norm == 0 else math.inf
    return {
        "weight_norm": torch.linalg.matrix_norm(edited).item(),
        "weight_change": weight_change,
        "cond": sigma_max / sigma_min if sigma_min > 0 else math.inf,
        "sigma_max_delta": torch.linalg.svdvals(delta)[0].item() if change_norm > 0 else 0.0,
    }


def layer_diagnostics(weights: dict[int | str, Tensor], originals: dict[int | str, Tensor],
                      second_moments: dict[int, Tensor] | None = None) -> dict[str, float]:
    """``weight_diagnostics`` for every edited matrix, as flat MLflow names ``diag/L<i>/<name>`` for a layer's MLP
    output projection (int keys) and ``diag/<label>/<name>`` for other matrices (str labels, e.g. L11.gate_proj);
    with the layers' second moments C also ``diag/L<i>/drift`` = D(W) = tr((W−W₀)C(W−W₀)ᵀ) (methods/drift.py), for
    every method (C is that of the MLP output projection's input, so other matrices get no drift)."""
    if set(weights) != set(originals):
        raise ValueError(f"layers differ: weights has {sorted(weights, key=str)}, originals has "
                         f"{sorted(originals, key=str)}")
    metrics: dict[str, float] = {}
    for key in sorted(weights, key=lambda k: (isinstance(k, str), str(k) if isinstance(k, str) else k)):
        for name, value in weight_diagnostics(weights[key], originals[key]).items():
            metrics[diag_metric(key, name)] = value
        if second_moments is not None and isinstance(key, int):
            metrics[diag_metric(key, "drift")] = preservation_drift(weights[key], originals[key], second_moments[key])
    return metrics
