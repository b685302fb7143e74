"""Residuals through a post-MLP normalisation (methods/residual_space.py), on Gemma3's own RMSNorm module."""

from __future__ import annotations

import torch

from methods.residual_space import norm_gain, residuals_before_post_norm


def gemma_norm(width: int, seed: int = 0):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(width, eps=1e-6).double().requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(seed)).double() * 3 + 4)
    return norm


def test_gain_is_read_from_the_module_whatever_its_parameterisation():
    norm = gemma_norm(8)
    assert torch.allclose(norm_gain(norm, 8, "cpu"), (1 + norm.weight).double(), rtol=1e-5)  # Gemma stores g − 1


def test_the_rescaled_residual_moves_the_normalised_output_by_r():
    d, m, n = 16, 32, 3
    gen = torch.Generator().manual_seed(1)
    norm = gemma_norm(d)
    weight = torch.randn(d, m, generator=gen, dtype=torch.float64) * 0.05  # small MLP outputs, as in Gemma
    keys = torch.randn(m, n, generator=gen, dtype=torch.float64)
    x = weight @ keys
    y = norm(x.T).T
    residuals = 1e-4 * torch.randn(d, n, generator=gen, dtype=torch.float64) * y.abs().mean()
    moved = residuals_before_post_norm(residuals, weight, keys, norm_gain(norm, d, "cpu"))
    g = norm_gain(norm, d, "cpu")[:, None]
    # First order: the normalised output moves by R less its radial part y·<y/g, R/g>/d (what no x can give).
    expected = residuals - y * ((y / g) * (residuals / g)).sum(0, keepdim=True) / d
    got = norm((x + moved).T).T - y
    assert torch.allclose(got, expected, atol=1e-3 * float(expected.abs().max()))
    # Moving x by R itself (no rescaling) misses by orders of magnitude here.
    naive = norm((x + residuals).T).T - y
    assert (naive - expected).norm() > 100 * (got - expected).norm()


def test_coordinates_without_gain_get_no_residual():
    gain = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    weight, keys = torch.eye(3, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64)
    out = residuals_before_post_norm(torch.ones(3, 1, dtype=torch.float64), weight, keys, gain)
    assert out[1, 0] == 0 and torch.allclose(out[[0, 2], 0], torch.tensor([0.5, 1.0], dtype=torch.float64))
