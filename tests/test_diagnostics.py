"""Weight diagnostics of edited matrices (evals/diagnostics.py)."""

from __future__ import annotations

import math

import pytest
import torch

from evals.diagnostics import DIAGNOSTIC_NAMES, layer_diagnostics, weight_diagnostics


def _diagonal(values: list[float], rows: int, cols: int) -> torch.Tensor:
    matrix = torch.zeros(rows, cols)
    for i, value in enumerate(values):
        matrix[i, i] = value
    return matrix


def test_known_singular_values():
    original = _diagonal([4.0, 2.0, 1.0], 3, 5)  # wide d×m, singular values 4, 2, 1
    weight = _diagonal([4.0, 2.0, 0.5], 3, 5)
    result = weight_diagnostics(weight, original)
    assert result["weight_norm"] == pytest.approx(math.sqrt(16 + 4 + 0.25))
    assert result["weight_change"] == pytest.approx(0.5 / math.sqrt(21))
    assert result["cond"] == pytest.approx(8.0)
    assert result["sigma_max_delta"] == pytest.approx(0.5)


def test_rotated_matrix_has_the_same_spectrum():
    # U·diag(σ)·Vᵀ with orthogonal U, V: the diagnostics see only σ.
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(9, 9, generator=generator, dtype=torch.float64))
    sigma = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0, 0.1], dtype=torch.float64)
    original = u @ torch.diag(sigma) @ v[:, :6].T
    delta = 0.25 * u[:, :1] @ v[:, :1].T  # rank one, σ_max = 0.25
    result = weight_diagnostics(original + delta, original)
    assert result["cond"] == pytest.approx(10.25 / 0.1)
    assert result["sigma_max_delta"] == pytest.approx(0.25)
    assert result["weight_change"] == pytest.approx(0.25 / sigma.norm().item())


def test_unchanged_weight():
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    result = weight_diagnostics(weight, weight.clone())
    assert result["weight_change"] == 0.0
    assert result["sigma_max_delta"] == 0.0
    assert result["weight_norm"] == pytest.approx(weight.double().norm().item())


def test_rank_deficient_weight_has_infinite_condition_number():
    result = weight_diagnostics(_diagonal([3.0, 0.0], 2, 4), _diagonal([3.0, 1.0], 2, 4))
    assert math.isinf(result["cond"])
    assert result["sigma_max_delta"] == pytest.approx(1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in shape"):
        weight_diagnostics(torch.zeros(3, 4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="matrix"):
        weight_diagnostics(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="layers differ"):
        layer_diagnostics({1: torch.eye(2)}, {2: torch.eye(2)})


def test_layer_diagnostics_names():
    weights = {5: _diagonal([2.0, 1.0], 2, 3), 4: torch.eye(2)}
    originals = {5: _diagonal([1.0, 1.0], 2, 3), 4: torch.eye(2)}
    result = layer_diagnostics(weights, originals)
    assert list(result) == [f"diag/L{layer}/{name}" for layer in (4, 5)
                            for name in DIAGNOSTIC_NAMES]
    assert result["diag/L4/weight_change"] == 0.0
    assert result["diag/L5/cond"] == pytest.approx(2.0)
    assert result["diag/L5/sigma_max_delta"] == pytest.approx(1.0)


def test_other_matrices_are_named_by_their_label_after_the_output_projections_and_get_no_drift():
    weights = {"L2.gate_proj": _diagonal([3.0, 1.0], 2, 3), 4: torch.eye(2)}
    originals = {"L2.gate_proj": _diagonal([1.0, 1.0], 2, 3), 4: torch.eye(2)}
    result = layer_diagnostics(weights, originals, {4: torch.eye(2)})
    assert list(result) == ([f"diag/L4/{name}" for name in DIAGNOSTIC_NAMES] + ["diag/L4/drift"]
                            + [f"diag/L2.gate_proj/{name}" for name in DIAGNOSTIC_NAMES])
    assert result["diag/L2.gate_proj/sigma_max_delta"] == pytest.approx(2.0)
