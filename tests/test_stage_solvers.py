"""The solver stages beyond MEMIT/AlphaEdit (LyapLock, ROME, FT) and how the editor composes stages, on small
random matrices and a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from methods.infra.arch import EditableModel
from methods.drift import preservation_drift
from methods.editor import LocateThenEditEditor
from methods.finetune import FineTuneEditor, FineTuneHParams, target_nll_batch
from methods.keys import compute_keys
from methods.requests import EditRequest
from methods.solvers.lyaplock import QUEUE_FLOOR, LyapLockSolver, lyaplock_update
from methods.solvers.memit import MemitSolver
from methods.solvers.rome import RomeSolver
from methods.stages import MethodSpec, build_editor
from methods.targets import TargetHParams, compute_target_values

D, M = 8, 20


pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(m: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(m, 3 * m, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * m) + 0.05 * torch.eye(m, dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


# ------------------------------------------------------------------------------------------------------------ LyapLock

def test_lyaplock_update_zeroes_the_gradient_of_its_objective():
    g = torch.Generator().manual_seed(0)
    c = _spd(M, g)
    w0 = torch.randn(D, M, generator=g, dtype=torch.float64)
    w = w0 + 0.1 * torch.randn(D, M, generator=g, dtype=torch.float64)
    past_keys = [torch.randn(M, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    past_values = [torch.randn(D, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    s_vk = sum(v @ k.T for v, k in zip(past_values, past_keys))
    s_kk = sum(k @ k.T for k in past_keys)
    keys = torch.randn(M, 4, generator=g, dtype=torch.float64)
    residuals = torch.randn(D, 4, generator=g, dtype=torch.float64)
    for lam, v, q in [(50.0, 1.0, 1.0), (3.0, 2.5, 4.0), (1000.0, 0.1, 1.7)]:
        delta = lyaplock_update(w, keys, residuals, c, w0, s_vk, s_kk, lam, v, q)
        w_new = (w + delta).clone().requires_grad_(True)
        objective = (v * ((w_new @ keys - (w @ keys + residuals)) ** 2).sum()
                     + v * sum(((w_new @ k - vh) ** 2).sum() for k, vh in zip(past_keys, past_values))
                     + lam * q * torch.trace((w_new - w0) @ c @ (w_new - w0).T))
        (grad,) = torch.autograd.grad(objective, w_new)
        scale = float((v * residuals @ keys.T).norm() + lam * q * float(((w0 - w) @ c).norm()))
        assert float(grad.norm()) <= 1e-9 * scale
        # and a perturbation only increases it (a minimum, not a saddle)
        worse = w_new.detach() + 1e-3 * torch.randn(D, M, generator=g, dtype=torch.float64)
        worse_objective = (v * ((worse @ keys - (w @ keys + residuals)) ** 2).sum()
                           + v * sum(((worse @ k - vh) ** 2).sum() for k, vh in zip(past_keys, past_values))
                           + lam * q * torch.trace((worse - w0) @ c @ (worse - w0).T))
        assert float(worse_objective) > float(objective.detach())


@pytest.mark.parametrize("rho", [1.5, 60.0])  # small ρ: the queue must rise; large ρ: it is held at its floor
def test_lyaplock_first_step_is_memit_then_the_queue_follows_the_drift(rho):
    g = torch.Generator().manual_seed(1)
    c = _spd(M, g)
    w0 = torch.randn(D, M, generator=g, dtype=torch.float64)
    solver = LyapLockSolver(mom2_update_weight=2.0, V=1.0, rho=rho)
    memit = MemitSolver(mom2_update_weight=2.0)
    solver.prepare([0], {0: c}, {0: w0})
    memit.prepare([0], {0: c}, {})
    weight = w0.clone()
    queue, threshold, drifts, queues = QUEUE_FLOOR, None, [], []
    for step in range(8):
        keys = torch.randn(M, 3, generator=g, dtype=torch.float64) * 2
        residuals = torch.randn(D, 3, generator=g, dtype=torch.float64) * 3
        delta = solver.solve(0, keys, residuals, weight)
        if step == 0:
            torch.testing.assert_close(delta, memit.solve(0, keys, residuals, weight))
        weight = weight + delta
        solver.after_update(0, keys, weight)
        drift = preservation_drift(weight, w0, c)
        if threshold is None:
            threshold = rho * drift
        else:
            queue = max(queue + drift / threshold - 1, QUEUE_FLOOR)
        metrics = solver.metrics()
        assert metrics["lyaplock/L0/drift"] == pytest.approx(drift, rel=1e-12)
        assert metrics["lyaplock/L0/threshold"] == pytest.approx(threshold, rel=1e-12)
        assert metrics["lyaplock/L0/queue"] == pytest.approx(queue, rel=1e-12)
        assert metrics["lyaplock/L0/queue"] >= QUEUE_FLOOR
        drifts.append(drift)
        queues.append(metrics["lyaplock/L0/queue"])
    if rho < 2:
        assert max(queues) > QUEUE_FLOOR, "ρ = 1.5 should have pushed the drift over the threshold"
    else:
        assert queues == [QUEUE_FLOOR] * len(queues), "with D_t far below D̄ the queue sits at its floor"
    assert solver.metrics()["lyaplock/L0/drift_mean"] == pytest.approx(sum(drifts) / len(drifts), rel=1e-12)
    # a larger queue means a stronger drift penalty: the same request moves the weights less
    keys = torch.randn(M, 2, generator=g, dtype=torch.float64)
    residuals = torch.randn(D, 2, generator=g, dtype=torch.float64)
    st = solver._state[0]
    small_q = lyaplock_update(weight, keys, residuals, c, w0, st.s_vk, st.s_kk, 2.0, 1.0, 1.0)
    large_q = lyaplock_update(weight, keys, residuals, c, w0, st.s_vk, st.s_kk, 2.0, 1.0, 50.0)
    assert preservation_drift(weight + large_q, w0, c) < preservation_drift(weight + small_q, w0, c)


def test_lyaplock_memory_is_the_weight_actually_written_and_state_round_trips():
    g = torch.Generator().manual_seed(2)
    c = _spd(M, g)
    w0 = torch.randn(D, M, generator=g, dtype=torch.float64)
    solver = LyapLockSolver(mom2_update_weight=1.0)
    solver.prepare([4], {4: c}, {4: w0})
    written = w0 + 0.05 * torch.randn(D, M, generator=g, dtype=torch.float64)  # e.g. after a RECT transform
    keys = torch.randn(M, 2, generator=g, dtype=torch.float64)
    solver.after_update(4, keys, written)
    st = solver._state[4]
    torch.testing.assert_close(st.s_vk, written @ keys @ keys.T)
    torch.testing.assert_close(st.s_kk, keys @ keys.T)
    restored = LyapLockSolver(mom2_update_weight=1.0)
    restored.prepare([4], {4: c}, {4: w0})
    restored.load_state_dict(solver.state_dict())
    assert restored.metrics() == solver.metrics()


# ------------------------------------------------------------------------------------------------------------ ROME

def test_rome_maps_the_key_exactly_onto_the_target():
    g = torch.Generator().manual_seed(3)
    c = _spd(M, g)
    weight = torch.randn(D, M, generator=g, dtype=torch.float64)
    solver = RomeSolver()
    solver.prepare([2], {2: c}, {2: weight})
    key = torch.randn(M, 1, generator=g, dtype=torch.float64)
    target = torch.randn(D, 1, generator=g, dtype=torch.float64)
    delta = solver.solve(2, key, target - weight @ key, weight)
    assert torch.linalg.matrix_rank(delta) == 1
    assert _rel((weight + delta) @ key, target) <= 1e-12
    # the row space is C⁻¹k*: directions orthogonal to it in the C-inner product are untouched
    inv_c_key = torch.linalg.solve(c, key)[:, 0]
    other = torch.randn(M, generator=g, dtype=torch.float64)
    other -= (other @ inv_c_key) / (key[:, 0] @ inv_c_key) * key[:, 0]  # now (C⁻¹k*)ᵀ other = 0
    assert float((delta @ other).norm()) <= 1e-10 * float(delta.norm())
    # a batch is applied as successive rank-one edits: the last one is exact, the rank is the batch size
    keys = torch.randn(M, 3, generator=g, dtype=torch.float64)
    targets = torch.randn(D, 3, generator=g, dtype=torch.float64)
    delta = solver.solve(2, keys, targets - weight @ keys, weight)
    assert torch.linalg.matrix_rank(delta) == 3
    assert _rel((weight + delta) @ keys[:, 2:], targets[:, 2:]) <= 1e-10


REQUESTS = [EditRequest(prompt="The capital city of {} is", subject="Norland", target="Paris"),
            EditRequest(prompt="{} plays the", subject="Maria Cole", target="violin")]


def _restore(editable, saved):
    with torch.no_grad():
        for layer, weight in saved.items():
            editable.weight(layer).copy_(weight)


def test_rome_editor_inserts_v_star_at_its_layer(monkeypatch, smol_tokenizer, tiny_llama):
    editable = EditableModel.wrap(tiny_llama)
    layer = 2
    saved = {layer: editable.weight(layer).clone()}
    g = torch.Generator().manual_seed(4)
    m = editable.key_dim(layer)
    groups = [["{}"], ["Hello. {}"]]
    hp = TargetHParams(v_num_grad_steps=5)
    request = REQUESTS[:1]
    try:
        expected = compute_target_values(tiny_llama, smol_tokenizer, editable.mlp(layer), request, groups, hp).values
        editor = LocateThenEditEditor(editable, smol_tokenizer, [layer], RomeSolver(), {layer: _spd(m, g).float()},
                                      groups, hp, target_site="mlp")
        editor.apply(request)
        key = compute_keys(editable, smol_tokenizer, request, [layer], groups)[layer]  # W's own input: unchanged
        reached = editable.weight(layer).double() @ key.double()
        assert _rel(reached[:, 0], expected[0].double()) <= 1e-4
        with pytest.raises(ValueError, match="at most 1 layer"):
            LocateThenEditEditor(editable, smol_tokenizer, [1, 2], RomeSolver(), {}, groups, hp, target_site="mlp")
    finally:
        _restore(editable, saved)


# ------------------------------------------------------------------------------------------------------------ composition

def test_transforms_shape_the_written_update_and_solvers_see_it(smol_tokenizer, tiny_llama):
    editable = EditableModel.wrap(tiny_llama)
    layers = [1, 2]
    saved = {layer: editable.weight(layer).clone() for layer in layers}
    g = torch.Generator().manual_seed(5)
    moments = {layer: _spd(editable.key_dim(layer), g).float() for layer in layers}
    spec = MethodSpec(solver="lyaplock", transforms=("rect",),
                      hparams={"rect_k": 0.25, "mom2_update_weight": 0.5, "v_num_grad_steps": 3})
    try:
        editor = build_editor(spec, editable, smol_tokenizer, layers, moments, [["{}"]])
        editor.apply(REQUESTS)
        for layer in layers:
            change = editable.weight(layer) - saved[layer]
            nonzero = float((change != 0).double().mean())
            assert nonzero == pytest.approx(0.25, abs=2 / change.numel())
            # LyapLock measured its drift on the weight that was written (after RECT), not on its own Δ
            drift = editor.metrics()[f"lyaplock/L{layer}/drift"]
            assert drift == pytest.approx(preservation_drift(editable.weight(layer), saved[layer], moments[layer]),
                                          rel=1e-5)
            assert editor.metrics()[f"rect/L{layer}/energy_kept"] < 1.0
    finally:
        _restore(editable, saved)


# ------------------------------------------------------------------------------------------------------------ FT

def _mean_target_nll(model, tokenizer, requests) -> float:
    batch, rows, cols, tokens = target_nll_batch(tokenizer, requests)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    return float(-torch.log_softmax(logits[rows, cols], -1).gather(1, tokens[:, None]).mean())


def test_fine_tuning_lowers_the_target_nll_inside_its_linf_ball(smol_tokenizer, tiny_llama):
    editable = EditableModel.wrap(tiny_llama)
    layers = [1, 3]
    saved = {layer: editable.weight(layer).clone() for layer in range(editable.num_layers)}
    eps = 2e-3
    try:
        before = _mean_target_nll(tiny_llama, smol_tokenizer, REQUESTS)
        editor = FineTuneEditor(editable, smol_tokenizer, layers, FineTuneHParams(ft_lr=1e-3, ft_num_steps=10,
                                                                                  ft_norm_constraint=eps))
        report = editor.apply(REQUESTS)
        after = _mean_target_nll(tiny_llama, smol_tokenizer, REQUESTS)
        assert after < before - 0.01
        assert len(report.target_prob) == 2 and all(0.0 < p <= 1.0 for p in report.target_prob)
        for layer in range(editable.num_layers):
            change = (editable.weight(layer) - saved[layer]).abs().max()
            if layer in layers:
                assert 0 < float(change) <= eps * (1 + 1e-5)
            else:
                assert float(change) == 0.0
        assert all(not p.requires_grad for p in tiny_llama.parameters())
    finally:
        _restore(editable, saved)
