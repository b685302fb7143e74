"""Backend auto (methods/infra/linear_plan.py): each weight shape and row band goes to the kernel measured faster, the
plan is measured once per machine, and the routed model computes the same products."""

import pytest
import torch
import torch.nn.functional as F

import methods.infra.cpu_linear as cpu_linear
import methods.infra.linear_plan as linear_plan
from methods.infra.cpu_linear import OneDnnLinear, onednn_available, route_linears
from methods.infra.linear_plan import LinearPlan, measure_plan, plan_linears, routable_linears

pytestmark = pytest.mark.skipif(not cpu_linear.packing_available(), reason="this PyTorch build cannot pack for oneDNN")

SIDE = 512  # 512 × 512 = 2¹⁸ elements: the smallest weight oneDNN takes over


def _two_shapes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(SIDE, SIDE), torch.nn.Linear(SIDE, SIDE),
                                torch.nn.Linear(SIDE, 2 * SIDE, bias=False), torch.nn.Linear(8, 8))
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _count_onednn_products(monkeypatch):
    calls = []
    original = cpu_linear._onednn_product

    def counting(x, weight, bias):
        calls.append(x.numel() // x.shape[-1])
        return original(x, weight, bias)

    monkeypatch.setattr(cpu_linear, "_onednn_product", counting)
    return calls


def test_row_ranges_decide_which_kernel_computes_a_product(monkeypatch):
    model = _two_shapes()
    assert route_linears(model, "auto", rows_by_shape={(SIDE, SIDE): ((2, 7), (32, 40))}) == 2
    square, wide, small = model[0], model[2], model[3]
    assert type(square) is OneDnnLinear and square.onednn_rows == ((2, 7), (32, 40))
    assert type(wide) is torch.nn.Linear and type(small) is torch.nn.Linear  # no ranges, or not routable at all
    calls = _count_onednn_products(monkeypatch)
    for shape, expected in (((1, SIDE), []), ((4, SIDE), [4]), ((2, 3, SIDE), [6]), ((8, SIDE), []),
                            ((36, SIDE), [36]), ((41, SIDE), [])):
        calls.clear()
        x = torch.randn(*shape)
        torch.testing.assert_close(square(x), F.linear(x, square.weight, square.bias), rtol=1e-5, atol=1e-5)
        assert calls == expected, shape
    # with a gradient: the backward is a oneDNN product too, and matches PyTorch's
    calls.clear()
    x = torch.randn(5, SIDE, requires_grad=True)
    square(x).pow(2).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    F.linear(reference, square.weight, square.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-5, atol=1e-5)
    assert calls == [5, 5]
    # another plan re-routes; a fixed backend forgets the ranges and frees the packed copies
    assert route_linears(model, "auto", rows_by_shape={(2 * SIDE, SIDE): ((1, 256),)}) == 3
    assert type(square) is torch.nn.Linear and type(wide) is OneDnnLinear and wide.onednn_rows == ((1, 256),)
    assert route_linears(model, "onednn") == 3  # the squares and the 8×8; wide already ran every row on oneDNN
    assert "onednn_rows" not in square.__dict__ and square.onednn_rows == cpu_linear.ALL_ROWS
    assert route_linears(model, "aten") == 4 and cpu_linear.drop_packed_weights(model) == 0


def _fake_timings(onednn_share_by_rows, calls=None):
    def fake(modules, rows, generator):
        if calls is not None:
            calls.append((tuple(modules[0].weight.shape), rows))
        share = onednn_share_by_rows(tuple(modules[0].weight.shape), rows)
        return {"aten": 1e-3, "onednn": share * 1e-3}
    return fake


def test_bands_where_onednn_is_clearly_faster_go_to_it(monkeypatch):
    model = _two_shapes()
    # square: faster at 4 and 16 rows (adjacent bands merge), just under the margin at 64 rows, faster again at 181;
    # wide: never faster
    shares = {(SIDE, SIDE): {1: 1.3, 4: 0.5, 16: 0.8, 64: 0.95, 181: 0.9}, (2 * SIDE, SIDE): {}}
    monkeypatch.setattr(linear_plan, "_time_band", _fake_timings(lambda shape, rows: shares[shape].get(rows, 1.2)))
    by_shape = routable_linears(model)
    assert sorted(by_shape) == [(SIDE, SIDE), (2 * SIDE, SIDE)] and len(by_shape[(SIDE, SIDE)]) == 2
    plan = measure_plan(by_shape, progress=False)
    assert plan.rows_by_shape == {(SIDE, SIDE): ((2, 31), (128, cpu_linear.MAX_ROWS)), (2 * SIDE, SIDE): ()}
    assert plan.describe() == "oneDNN: 512->512 at 2-31, 128-256 rows; PyTorch otherwise"
    assert [entry["onednn"] for entry in plan.measurements[:5]] == [False, True, True, False, True]
    assert LinearPlan.from_json(plan.to_json()).rows_by_shape == plan.rows_by_shape
    assert LinearPlan(rows_by_shape={(SIDE, SIDE): ()}).describe() == "PyTorch for every product"


def test_a_machine_measures_its_plan_once(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(linear_plan, "_time_band", _fake_timings(lambda shape, rows: 0.5 if rows == 1 else 1.0, calls))
    first = plan_linears(_two_shapes(), tmp_path, progress=False)
    assert len(calls) == 2 * len(linear_plan.ROW_BANDS) and first.path.exists()
    assert first.rows_by_shape == {(SIDE, SIDE): ((1, 1),), (2 * SIDE, SIDE): ((1, 1),)}
    second = plan_linears(_two_shapes(), tmp_path, progress=False)  # another model of the same shapes
    assert len(calls) == 2 * len(linear_plan.ROW_BANDS) and second.rows_by_shape == first.rows_by_shape
    assert second.path == first.path
    # another CPU (or thread count, torch version) is another entry
    machine = linear_plan.machine_identity()
    monkeypatch.setattr(linear_plan, "machine_identity", lambda: {**machine, "cpu": "another CPU"})
    third = plan_linears(_two_shapes(), tmp_path, progress=False)
    assert len(calls) == 4 * len(linear_plan.ROW_BANDS) and third.path != first.path
    assert plan_linears(torch.nn.Linear(8, 8), tmp_path).rows_by_shape == {}  # nothing routable: nothing measured


def test_the_real_measurement_times_both_kernels_on_every_band(tmp_path):
    model = _two_shapes()
    plan = plan_linears(model, tmp_path, progress=False)
    assert len(plan.measurements) == 2 * len(linear_plan.ROW_BANDS)
    for entry in plan.measurements:
        assert entry["aten_us"] > 0 and entry["onednn_us"] > 0
        threshold = linear_plan.ONEDNN_SHARE * entry["aten_us"]
        if abs(entry["onednn_us"] - threshold) > 0.2:  # the JSON rounds to 0.1 µs
            assert entry["onednn"] == (entry["onednn_us"] < threshold)
        low, high = entry["band"]
        assert low <= entry["rows"] <= high
    for ranges in plan.rows_by_shape.values():
        assert all(1 <= low <= high <= cpu_linear.MAX_ROWS for low, high in ranges)
    # timing used the weights only: they are unchanged, and the model still computes its own products
    x = torch.randn(3, SIDE)
    route_linears(model, "auto", rows_by_shape=plan.rows_by_shape)
    torch.testing.assert_close(model[1](x), F.linear(x, model[1].weight, model[1].bias), rtol=1e-5, atol=1e-5)


def test_the_loaded_model_follows_its_plan(smollm2):
    if not onednn_available():
        pytest.skip("no oneDNN linear")
    plan = plan_linears(smollm2.model)  # the cached entry load_model used
    assert smollm2.linear_plan == plan.describe()
    for module in smollm2.model.modules():
        if isinstance(module, torch.nn.Linear):
            ranges = plan.rows_by_shape.get(tuple(module.weight.shape), ())
            assert (type(module) is OneDnnLinear) == bool(ranges)
            if ranges:
                assert module.onednn_rows == ranges
