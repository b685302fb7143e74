"""Properties of the Δ transforms: RECT, SRFusion and AdaEdit's sparsifying baselines (ALGORITHMS.md §6, §7)."""

from __future__ import annotations

import warnings

import pytest
import torch

from methods.transforms.rect import Rect, rect
from methods.transforms.sparsify import (
    MagnitudeTopK,
    RandomDrop,
    magnitude_topk,
    n_keep,
    random_drop,
)
from methods.transforms.srfusion import (
    SRFusion,
    sparsify_columns,
    srfusion,
    srfusion_parts,
)

D, M = 12, 20


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _low_rank(rank: int, seed: int = 0) -> torch.Tensor:
    return _rand(D, rank, seed=seed) @ _rand(rank, M, seed=seed + 100)


# ---------------------------------------------------------------- counts


def test_n_keep_rounds_and_never_drops_to_zero():
    assert n_keep(240, 0.2) == 48
    assert n_keep(12, 0.2) == 2  # round(2.4)
    assert n_keep(3, 0.01) == 1
    assert n_keep(10, 1.0) == 10
    assert n_keep(10, 0.29) == 3  # rounds, does not truncate


@pytest.mark.parametrize("make", [lambda: Rect(keep=0.0), lambda: SRFusion(keep=1.5), lambda: SRFusion(rank=0),
                                  lambda: RandomDrop(keep=-0.1), lambda: MagnitudeTopK(keep=2.0)])
def test_bad_parameters_raise(make):
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------------------- RECT


def test_rect_keeps_exactly_the_top_relative_changes():
    delta, weight = _rand(D, M, seed=1), _rand(D, M, seed=2).float()
    out = rect(delta, weight, 0.2)
    k = n_keep(D * M, 0.2)
    assert int((out != 0).sum()) == k
    # Brute force: sort the entries by |Δ|/|W| in Python and take the first k.
    scores = [(abs(float(delta[i, j])) / abs(float(weight[i, j])), i, j) for i in range(D) for j in range(M)]
    top = {(i, j) for _, i, j in sorted(scores, reverse=True)[:k]}
    assert {tuple(ij) for ij in (out != 0).nonzero().tolist()} == top
    kept = out != 0
    assert torch.equal(out[kept], delta[kept])  # kept entries are not rescaled


def test_rect_ranks_zero_weight_entries_first_without_warnings():
    delta, weight = _rand(D, M, seed=3), _rand(D, M, seed=4)
    zero_positions = [(0, 0), (5, 7), (11, 19)]
    for i, j in zero_positions:
        weight[i, j] = 0.0
        delta[i, j] = 1e-9  # tiny absolute change, yet infinite relative change
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = rect(delta, weight, 3 / (D * M))  # n_keep = 3
    assert {tuple(ij) for ij in (out != 0).nonzero().tolist()} == set(zero_positions)


def test_rect_zero_changes_take_no_slot_even_where_weight_is_zero():
    delta, weight = _rand(D, M, seed=16), _rand(D, M, seed=17)
    weight[:, 0] = 0.0
    delta[:, 0] = 0.0  # W = 0 and Δ = 0: nothing changes there, so these must not rank first
    weight[3, 4], delta[3, 4] = 0.0, 0.5
    out = rect(delta, weight, 2 / (D * M))
    assert out[3, 4] == 0.5
    assert int((out != 0).sum()) == 2
    ratio = (delta.abs() / weight.abs()).nan_to_num(nan=0.0, posinf=0.0)
    assert out.reshape(-1)[ratio.reshape(-1).argmax()] != 0  # the second slot goes to the largest finite ratio


def test_rect_reads_a_transposed_float32_view():
    param = torch.nn.Parameter(_rand(M, D, seed=5).float())
    view = param.T  # non-contiguous d×m view, as for GPT-2's Conv1D
    delta = _rand(D, M, seed=6)
    before = param.detach().clone()
    out = Rect(keep=0.25)(0, delta, view)
    assert torch.equal(out, rect(delta, view.detach().contiguous(), 0.25))
    assert torch.equal(param.detach(), before)
    assert out.dtype == torch.float64


# ---------------------------------------------------------------- SRFusion


def _brute_sparse_unit(col: torch.Tensor, keep: float) -> torch.Tensor:
    order = sorted(range(len(col)), key=lambda i: -abs(float(col[i])))[: n_keep(len(col), keep)]
    out = torch.zeros_like(col)
    out[order] = col[order]
    return out / out.norm()


def test_srfusion_matches_brute_force_rebuild_and_rank():
    delta, keep, rank = _low_rank(6, seed=7), 0.25, 4
    out, r = srfusion_parts(delta, rank, keep)
    assert r == 4
    assert int(torch.linalg.matrix_rank(out)) <= r
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    expected = sum(sigma[i] * torch.outer(_brute_sparse_unit(u[:, i], keep), _brute_sparse_unit(vh[i], keep))
                   for i in range(r))
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)


def test_sparsify_columns_exact_count_and_original_norm():
    vectors = _rand(D, 5, seed=15) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    out = sparsify_columns(vectors, 0.3)
    assert torch.equal((out != 0).sum(0), torch.full((5,), n_keep(D, 0.3)))
    assert torch.allclose(out.norm(dim=0), vectors.norm(dim=0), rtol=1e-13, atol=0)


def test_srfusion_rank_one_norm_and_support():
    # Δ' = σ₁ u'₁ v'₁ᵀ with unit u'₁, v'₁: ‖Δ'‖_F = σ₁ and the support is n_keep(d) rows × n_keep(m) columns.
    delta, keep = _low_rank(6, seed=7), 0.25
    sigma = torch.linalg.svdvals(delta)
    one = srfusion(delta, 1, keep)
    assert torch.isclose(torch.linalg.norm(one), sigma[0], rtol=1e-12)
    s1 = torch.linalg.svdvals(one)
    assert int((s1 > s1[0] * 1e-12).sum()) == 1
    assert int((one.abs().sum(1) != 0).sum()) == n_keep(D, keep)
    assert int((one.abs().sum(0) != 0).sum()) == n_keep(M, keep)


def test_srfusion_kept_vectors_have_exact_count_and_unit_norm():
    # Factor Δ' back: for rank 1 Δ' = σ u' v'ᵀ, so u' = Δ' v'/σ and the column/row profiles give u', v' up to sign.
    delta = _low_rank(3, seed=8)
    sigma = torch.linalg.svdvals(delta)
    one = srfusion(delta, 1, 0.3)
    u_prime = one[:, one.abs().sum(0).argmax()]
    u_prime = u_prime / u_prime.norm()
    v_prime = one.T @ u_prime / sigma[0]
    assert int((u_prime != 0).sum()) == n_keep(D, 0.3)
    assert int((v_prime != 0).sum()) == n_keep(M, 0.3)
    assert torch.isclose(v_prime.norm(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12)


def test_srfusion_rank_is_capped_by_numerical_rank_and_full_keep_reproduces():
    delta = _low_rank(3, seed=9)
    out, r = srfusion_parts(delta, 8, 1.0)
    assert r == 3  # numerical rank, not the requested 8
    assert torch.allclose(out, delta, atol=1e-12, rtol=0)


def test_srfusion_truncates_rank_with_full_keep():
    delta = _rand(D, M, seed=10)
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    best_rank_2 = (u[:, :2] * sigma[:2]) @ vh[:2]
    assert torch.allclose(srfusion(delta, 2, 1.0), best_rank_2, atol=1e-12, rtol=0)


def test_srfusion_zero_delta_gives_zeros_and_full_energy():
    t = SRFusion()
    out = t(3, torch.zeros(D, M, dtype=torch.float64), torch.ones(D, M))
    assert torch.equal(out, torch.zeros(D, M, dtype=torch.float64))
    assert t.metrics()["srfusion/L3/energy_kept"] == 1.0
    assert t.metrics()["srfusion/L3/rank_kept"] == 0.0


def test_srfusion_metrics():
    delta = _low_rank(5, seed=11)
    t = SRFusion(rank=2, keep=0.5)
    out = t(4, delta, torch.ones(D, M))
    m = t.metrics()
    assert m["srfusion/L4/rank_kept"] == 2.0
    expected = float(out.pow(2).sum() / delta.pow(2).sum())
    assert m["srfusion/L4/energy_kept"] == pytest.approx(expected, rel=1e-12)
    assert 0 < m["srfusion/L4/energy_kept"] < 1


# ---------------------------------------------------------------- random drop / magnitude top-k


def test_random_drop_exact_count_no_rescaling_and_determinism():
    delta = _rand(D, M, seed=12)
    k = n_keep(D * M, 0.2)
    a, b, c = RandomDrop(seed=1), RandomDrop(seed=1), RandomDrop(seed=2)
    torch.manual_seed(123)
    out_a = a(0, delta, delta)
    torch.manual_seed(456)  # global RNG use must not matter
    out_b = b(0, delta, delta)
    out_c = c(0, delta, delta)
    assert int((out_a != 0).sum()) == k
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a != 0, out_c != 0)
    kept = out_a != 0
    assert torch.equal(out_a[kept], delta[kept])
    # Successive calls draw fresh masks (the generator advances) yet stay reproducible.
    assert not torch.equal(a(1, delta, delta) != 0, kept)


def test_random_drop_state_round_trip():
    delta = _rand(D, M, seed=13)
    a = RandomDrop(seed=5)
    a(0, delta, delta)
    state = a.state_dict()
    nxt = a(1, delta, delta)
    b = RandomDrop(seed=99)
    b.load_state_dict(state)
    assert torch.equal(b(1, delta, delta), nxt)


def test_random_drop_is_roughly_uniform():
    counts = torch.zeros(D * M)
    gen = torch.Generator().manual_seed(0)
    delta = torch.ones(D, M, dtype=torch.float64)
    for _ in range(500):
        counts += (random_drop(delta, 0.2, gen) != 0).reshape(-1).double()
    assert int(counts.sum()) == 500 * n_keep(D * M, 0.2)
    assert 0.1 < float(counts.min()) / 500 and float(counts.max()) / 500 < 0.3


def test_magnitude_topk_keeps_the_largest():
    delta = _rand(D, M, seed=14)
    out = magnitude_topk(delta, 0.2)
    k = n_keep(D * M, 0.2)
    kept = out != 0
    assert int(kept.sum()) == k
    threshold = delta.abs().reshape(-1).sort(descending=True).values[k - 1]
    assert torch.equal(kept, delta.abs() >= threshold)
    assert torch.equal(out[kept], delta[kept])


def test_energy_kept_metric_values():
    delta = torch.zeros(D, M, dtype=torch.float64)
    delta[0, 0], delta[1, 1], delta[2, 2] = 3.0, 4.0, 1.0  # energies 9, 16, 1 → total 26
    t = MagnitudeTopK(keep=2 / (D * M))
    t(7, delta, torch.ones(D, M))
    assert t.metrics()["magnitude_topk/L7/energy_kept"] == pytest.approx(25 / 26, rel=1e-15)
    r = Rect(keep=1 / (D * M))
    weight = torch.ones(D, M)
    weight[2, 2] = 0.01  # relative change 100: RECT keeps this small entry, not the largest one
    r(2, delta, weight)
    assert r.metrics()["rect/L2/energy_kept"] == pytest.approx(1 / 26, rel=1e-15)
    t(8, torch.zeros(D, M, dtype=torch.float64), weight)
    assert t.metrics()["magnitude_topk/L8/energy_kept"] == 1.0
    assert "magnitude_topk/L7/energy_kept" in t.metrics()  # earlier layers stay reported
