"""Residuals through a post-MLP normalisation (methods/residual_space.py), on Gemma3's own RMSNorm module."""

from __future__ import annotations

import torch

from methods.residual_space import GAIN_DAMPING, norm_gain, residuals_before_post_norm


def gemma_norm(width: int, seed: int = 0):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(width, eps=1e-6).double().requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(seed)).double() * 3 + 4)
    return norm


def test_gain_is_read_from_the_module_whatever_its_parameterisation():
    norm = gemma_norm(8)
    assert torch.allclose(norm_gain(norm, 8, "cpu"), (1 + norm.weight).double(), rtol=1e-5)  # Gemma stores g − 1


def _layer(d=16, m=32, n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    norm = gemma_norm(d)
    weight = torch.randn(d, m, generator=gen, dtype=torch.float64) * 0.05  # small MLP outputs, as in Gemma
    keys = torch.randn(m, n, generator=gen, dtype=torch.float64)
    return norm, weight, keys, gen


def float64_twin(norm):
    """Gemma's RMSNorm computes in float32 (~1e-6 of y's scale of rounding, as large as a small residual's move);
    the same function in float64, with the gain read from the module."""
    width = norm.weight.shape[0]
    gain = norm_gain(norm, width, "cpu")
    return lambda x: gain * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)


def test_the_rescaled_residual_moves_the_normalised_output_by_r():
    module, weight, keys, gen = _layer()
    norm = float64_twin(module)
    d, n = weight.shape[0], keys.shape[1]
    x = weight @ keys
    y = norm(x.T).T
    assert torch.allclose(y, module(x.T).T, rtol=1e-5)
    residuals = 1e-4 * torch.randn(d, n, generator=gen, dtype=torch.float64) * y.abs().mean()
    g = norm_gain(module, d, "cpu")[:, None]
    moved = residuals_before_post_norm(residuals, weight, keys, g[:, 0])
    # First order: y moves by the damped R (R · g² / (g² + μ), ≈ R where the gain is not small) less its radial
    # part y·<y/g, R/g>/d (what no x can give).
    damped = residuals * g.pow(2) / (g.pow(2) + (GAIN_DAMPING * g.abs().mean()) ** 2)
    expected = damped - y * ((y / g) * (damped / g)).sum(0, keepdim=True) / d
    got = norm((x + moved).T).T - y
    assert torch.allclose(got, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
    # Moving x by R itself (no rescaling) misses by orders of magnitude here.
    naive = norm((x + residuals).T).T - y
    assert (naive - expected).norm() > 100 * (got - expected).norm()


def test_small_gains_are_damped_and_zero_gains_not_moved():
    """x along coordinate 0 and R in the others, so that the move has no component along x to remove."""
    gain = torch.tensor([1.0, 1.0, 0.01, 0.0], dtype=torch.float64)
    weight, keys = torch.eye(4, dtype=torch.float64), torch.tensor([[2.0], [0.0], [0.0], [0.0]], dtype=torch.float64)
    rms = 1.0  # rms of x = (2, 0, 0, 0)
    mu = (GAIN_DAMPING * gain.mean()) ** 2
    out = residuals_before_post_norm(torch.tensor([[0.0], [1.0], [1.0], [1.0]], dtype=torch.float64), weight, keys,
                                     gain)[:, 0]
    assert out[0] == 0 and out[3] == 0
    assert torch.isclose(out[1], rms / (1 + mu))  # ≈ R / g: a normal gain
    assert torch.isclose(out[2], rms * 0.01 / (0.01 ** 2 + mu))
    assert out[2] < 0.05 * rms / 0.01  # undamped it would move 100 × R for the same small effect on y


def test_the_move_does_not_rescale_the_mlp_output():
    norm, weight, keys, gen = _layer()
    x = weight @ keys
    residuals = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    moved = residuals_before_post_norm(residuals, weight, keys, norm_gain(norm, x.shape[0], "cpu"))
    assert moved.abs().max() > 0
    assert torch.allclose((moved * x).sum(0), torch.zeros(x.shape[1], dtype=torch.float64), atol=1e-10)


def test_repeated_residuals_with_a_radial_part_do_not_grow_x():
    """Sequential batches that each ask for the unreachable radial part as well as a reachable one: x keeps its
    scale (the norm's output still moves), where rescaling x by rms(x)/g alone compounds the radial part."""
    norm, weight, keys, gen = _layer(n=1)
    g = norm_gain(norm, weight.shape[0], "cpu")
    x = weight @ keys
    start = x.norm()
    for _ in range(30):
        y = norm(x.T).T
        tangential = torch.randn(y.shape, generator=gen, dtype=torch.float64) * 0.01 * y.abs().mean()
        residuals = 0.5 * y + tangential
        x = x + residuals_before_post_norm(residuals, torch.eye(x.shape[0], dtype=torch.float64), x, g)
    assert x.norm() < 1.5 * start
    # The same sequence without the projection: x grows by about 1.5 per batch.
    x_unprojected = weight @ keys
    for _ in range(30):
        y = norm(x_unprojected.T).T
        scale = x_unprojected.pow(2).mean(0).sqrt()
        x_unprojected = x_unprojected + 0.5 * y / g[:, None] * scale
    assert x_unprojected.norm() > 1e4 * start
