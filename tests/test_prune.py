"""Properties of PRUNE's restraint (ALGORITHMS.md §5) on small random float64 matrices."""

from __future__ import annotations

import math

import pytest
import torch

from methods.restraints.prune import (
    PruneRestraint,
    restrain_delta,
    restrain_singular_values,
)

D, M = 10, 16


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _with_spectrum(sigma: list[float], seed: int = 0) -> torch.Tensor:
    """A d×m matrix whose singular values are exactly ``sigma`` (random orthonormal U, V)."""
    u, _ = torch.linalg.qr(_rand(D, len(sigma), seed=seed))
    v, _ = torch.linalg.qr(_rand(M, len(sigma), seed=seed + 1))
    return (u * torch.tensor(sigma, dtype=torch.float64)) @ v.T


VARIANTS = [("log", math.e, 2.0), ("log", 1.2, 2.0), ("linear", math.e, 2.0), ("linear", math.e, 3.0)]


# ---------------------------------------------------------------- F(σ)


@pytest.mark.parametrize("variant,alpha,beta", VARIANTS)
def test_values_below_sigma_hat_are_untouched(variant, alpha, beta):
    sigma = torch.tensor([0.0, 0.1, 1.0, 9.9, 9.999999, 10.0, 15.0, 500.0], dtype=torch.float64)
    f, _ = restrain_singular_values(sigma, 10.0, variant, alpha, beta)
    below = sigma < 10.0
    assert torch.equal(f[below], sigma[below])
    assert (f[sigma > 10.0] < sigma[sigma > 10.0]).all()  # σ̂·ln α ≥ 1 here: the large ones shrink


@pytest.mark.parametrize("variant,alpha,beta", VARIANTS)
def test_f_is_continuous_at_sigma_hat(variant, alpha, beta):
    sigma_hat = 4.0
    eps = 1e-9
    sigma = torch.tensor([sigma_hat - eps, sigma_hat, sigma_hat + eps], dtype=torch.float64)
    f, _ = restrain_singular_values(sigma, sigma_hat, variant, alpha, beta)
    assert f[1] == sigma_hat
    assert abs(float(f[0]) - sigma_hat) < 2 * eps and abs(float(f[2]) - sigma_hat) < 2 * eps


def test_f_formulas():
    sigma_hat = 2.0
    f_log, _ = restrain_singular_values(torch.tensor([2 * math.e, 2 * math.e ** 3], dtype=torch.float64),
                                        sigma_hat, "log", math.e, 2.0)
    assert torch.allclose(f_log, torch.tensor([3.0, 5.0], dtype=torch.float64), rtol=1e-14, atol=0)
    f_log2, _ = restrain_singular_values(torch.tensor([8.0], dtype=torch.float64), sigma_hat, "log", 2.0, 2.0)
    assert float(f_log2) == pytest.approx(4.0, rel=1e-14)  # log₂ 8 − log₂ 2 + 2
    f_lin, _ = restrain_singular_values(torch.tensor([6.0], dtype=torch.float64), sigma_hat, "linear", 2.0, 2.0)
    assert float(f_lin) == pytest.approx(4.0, rel=1e-14)  # 6/2 + 1·2/2


@pytest.mark.parametrize("sigma_hat,alpha", [(0.5, math.e), (0.2, 1.2), (3.0, math.e), (10.0, 1.2)])
def test_f_never_exceeds_sigma_and_guard_clips_only_when_needed(sigma_hat, alpha):
    sigma = torch.linspace(0, 20 * sigma_hat, 2001, dtype=torch.float64)
    f, clipped = restrain_singular_values(sigma, sigma_hat, "log", alpha, 2.0)
    assert (f <= sigma).all()
    raw = (torch.log(sigma.clamp(min=sigma_hat)) - math.log(sigma_hat)) / math.log(alpha) + sigma_hat
    raw = torch.where(sigma >= sigma_hat, raw, sigma)
    assert torch.equal(clipped, raw > sigma)
    if sigma_hat * math.log(alpha) < 1:
        assert clipped.any()  # just above σ̂ the log curve rises faster than σ: the guard must act
        assert torch.equal(f[clipped], sigma[clipped])
    else:
        assert not clipped.any()
        assert torch.equal(f, raw)


@pytest.mark.parametrize("kwargs", [{"alpha": 1.0}, {"alpha": 0.5}, {"beta": 1.0}, {"beta": -2.0},
                                    {"variant": "sqrt"}])
def test_bad_parameters_raise(kwargs):
    args = {"variant": "log", "alpha": math.e, "beta": 2.0} | kwargs
    with pytest.raises(ValueError):
        restrain_singular_values(torch.ones(3, dtype=torch.float64), 1.0, **args)
    with pytest.raises(ValueError):
        PruneRestraint(**args)


def test_bad_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        PruneRestraint(mode="multiple")


# ---------------------------------------------------------------- ΔW


@pytest.mark.parametrize("variant,alpha,beta", VARIANTS)
def test_restrain_delta_maps_the_spectrum_through_f(variant, alpha, beta):
    spectrum = [30.0, 12.0, 5.0, 2.0, 0.5]
    sigma_hat = 4.0
    delta = _with_spectrum(spectrum, seed=3)
    out, info = restrain_delta(delta, sigma_hat, variant, alpha, beta)
    expected, _ = restrain_singular_values(torch.tensor(spectrum, dtype=torch.float64), sigma_hat, variant,
                                           alpha, beta)
    got = torch.linalg.svdvals(out)[: len(spectrum)]
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert info["sigma_max_before"] == pytest.approx(30.0, rel=1e-12)
    assert info["sigma_max_after"] == pytest.approx(float(expected[0]), rel=1e-12)
    assert info["sigma_max_after"] < info["sigma_max_before"]
    # Same singular directions: the part below σ̂ is left exactly as it was.
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    small = (u[:, 3:5] * torch.tensor([2.0, 0.5], dtype=torch.float64)) @ vh[3:5]
    top = u[:, :3] @ u[:, :3].T @ out
    assert torch.allclose(out - top, small, atol=1e-12)


def test_restrain_delta_counts_clipped_values_and_keeps_zero_delta():
    delta = _with_spectrum([0.6, 0.55, 0.3], seed=4)
    out, info = restrain_delta(delta, 0.5, "log", math.e, 2.0)  # σ̂·ln e = 0.5 < 1
    assert info["clipped"] == 2.0
    assert torch.allclose(out, delta, atol=1e-12)  # clipped back to σ: nothing changes
    zero, info0 = restrain_delta(torch.zeros(D, M, dtype=torch.float64), 1.0, "log", math.e, 2.0)
    assert torch.equal(zero, torch.zeros(D, M, dtype=torch.float64))
    assert info0["sigma_max_before"] == 0.0 and info0["clipped"] == 0.0


def test_restrain_delta_leaves_directions_below_numerical_rank_alone():
    # Rank-2 ΔW in a 10×16 matrix: the other 8 singular values are round-off; a tiny σ̂ would otherwise
    # send them through F (and count them as clipped).
    delta = _with_spectrum([2.0, 1.0], seed=9)
    _out, info = restrain_delta(delta, 1e-30, "log", math.e, 2.0)
    assert info["clipped"] == 2.0
    out_lin, _ = restrain_delta(delta, 1e-30, "linear", math.e, 2.0)
    assert torch.allclose(torch.linalg.svdvals(out_lin)[:2], torch.tensor([1.0, 0.5], dtype=torch.float64),
                          rtol=1e-12)


# ---------------------------------------------------------------- PruneRestraint


def _setup(seed: int = 5, scale: float = 20.0):
    w0 = _rand(D, M, seed=seed).float()
    live = w0.clone() + (scale * _with_spectrum([1.0, 0.3], seed=seed + 10)).float()
    return w0, live


def test_sigma_hat_is_sigma_max_of_w0_and_metrics():
    w0, live = _setup()
    restraint = PruneRestraint()
    restraint.prepare({3: w0})
    expected = float(torch.linalg.svdvals(w0.double())[0])
    assert restraint.sigma_hat(3) == pytest.approx(expected, rel=1e-14)
    restraint.restrained({3: live})
    m = restraint.metrics()
    assert m["prune/L3/sigma_hat"] == pytest.approx(expected, rel=1e-14)
    assert m["prune/L3/sigma_max_before"] == pytest.approx(20.0, rel=1e-5)
    assert m["prune/L3/sigma_max_after"] < m["prune/L3/sigma_max_before"]
    assert m["prune/L3/clipped"] == 0.0
    assert m["prune/log_guard_min"] == pytest.approx(expected * 1.0, rel=1e-14)  # ln e = 1
    new = restraint.restrained({3: live})[3].double()
    s = torch.linalg.svdvals(new)
    assert m["prune/L3/cond"] == pytest.approx(float(s[0] / s[-1]), rel=1e-4)
    assert "prune/log_guard_min" not in PruneRestraint(variant="linear").metrics()


def test_restrained_weight_is_w0_plus_f_of_delta_in_input_dtype():
    w0, live = _setup(seed=6)
    restraint = PruneRestraint(variant="linear", beta=2.0)
    restraint.prepare({1: w0})
    new = restraint.restrained({1: live})[1]
    assert new.dtype == torch.float32 and new.shape == live.shape
    ref, _ = restrain_delta(live.double() - w0.double(), restraint.sigma_hat(1), "linear", math.e, 2.0)
    assert torch.allclose(new.double(), w0.double() + ref, atol=1e-5)
    assert not torch.allclose(new, live, atol=1e-3)


def test_swapped_in_restores_bit_exactly_also_after_exception():
    w0, live = _setup(seed=7)
    param = torch.nn.Parameter(live.T.contiguous())  # stored m×d (GPT-2 Conv1D style)
    view = param.T  # non-contiguous d×m view of the float32 parameter
    assert not view.is_contiguous()
    restraint = PruneRestraint(mode="once")
    restraint.prepare({0: w0})
    before = param.detach().clone()
    expected = restraint.restrained({0: view})[0]
    with restraint.swapped_in({0: view}):
        assert torch.equal(view.detach(), expected)  # the restrained weights are live inside the block
        assert not torch.equal(param.detach(), before)
    assert torch.equal(param.detach(), before)
    with pytest.raises(RuntimeError, match="boom"), restraint.swapped_in({0: view}):
        raise RuntimeError("boom")
    assert torch.equal(param.detach(), before)
    assert param.requires_grad and param.dtype == torch.float32


def test_apply_in_place_changes_live_weights():
    w0, live = _setup(seed=8)
    param = torch.nn.Parameter(live.clone())
    restraint = PruneRestraint(mode="every_step")
    assert restraint.every_step
    restraint.prepare({2: w0})
    data_ptr = param.data_ptr()
    restraint.apply_in_place({2: param})
    assert param.data_ptr() == data_ptr  # written into, not replaced
    assert not torch.equal(param.detach(), live)
    sigma_after = torch.linalg.svdvals(param.detach().double() - w0.double())[0]
    assert float(sigma_after) < float(torch.linalg.svdvals(live.double() - w0.double())[0]) - 1.0


def test_unprepared_layer_raises():
    with pytest.raises(KeyError, match="prepare"):
        PruneRestraint().restrained({0: torch.zeros(D, M)})


def test_sigma_hat_scale_lowers_the_threshold_and_engages_the_restraint():
    g = torch.Generator().manual_seed(11)
    w0 = torch.randn(12, 20, generator=g, dtype=torch.float64)
    sigma_w0 = float(torch.linalg.svdvals(w0).max())
    small_edit = w0 + 0.2 * torch.randn(12, 20, generator=g, dtype=torch.float64)  # σ_max(ΔW) well below σ_max(W₀)
    paper, scaled = PruneRestraint(), PruneRestraint(sigma_hat_scale=0.1)
    paper.prepare({0: w0})
    scaled.prepare({0: w0})
    assert scaled.sigma_hat(0) == pytest.approx(0.1 * sigma_w0, rel=1e-12)
    torch.testing.assert_close(paper.restrained({0: small_edit})[0], small_edit)  # the paper's σ̂: untouched
    restrained = scaled.restrained({0: small_edit})[0]
    assert float(torch.linalg.svdvals(restrained - w0).max()) < float(torch.linalg.svdvals(small_edit - w0).max())
    with pytest.raises(ValueError, match="sigma_hat_scale"):
        PruneRestraint(sigma_hat_scale=0.0)
