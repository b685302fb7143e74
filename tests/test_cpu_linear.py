"""oneDNN linear products (methods/infra/cpu_linear.py): the same numbers as PyTorch's own, gradients included, and
out of the way wherever they would not be the same computation."""

import pytest
import torch
import torch.nn.functional as F

from methods.infra.cpu_linear import (LinearBackendError, OneDnnLinear, onednn_available, resolve_linear_backend,
                                route_linears)
from methods.infra.models import ModelLoadError, load_model

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN linear")


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _logits_and_input_grad(model, ids):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    (logits.log_softmax(-1)[..., 7].sum()).backward()
    return logits.detach(), embeds.grad


def test_routed_model_gives_the_same_logits_and_input_gradients(monkeypatch):
    import methods.infra.cpu_linear as cpu_linear

    calls = []
    real = cpu_linear._onednn_product
    monkeypatch.setattr(cpu_linear, "_onednn_product", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 0)  # the tiny model's weights are all small
    model = _tiny_llama()
    ids = torch.randint(0, 96, (3, 9))
    plain_logits, plain_grad = _logits_and_input_grad(model, ids)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert route_linears(model, "onednn") == len(linears) == 3 * 7 + 1
    assert all(type(m) is OneDnnLinear for m in linears)
    routed_logits, routed_grad = _logits_and_input_grad(model, ids)
    torch.testing.assert_close(routed_logits, plain_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed_grad, plain_grad, rtol=1e-4, atol=1e-6)
    assert len(calls) == 2 * (3 * 7 + 1)  # every product, forward and backward, ran on oneDNN
    assert route_linears(model, "aten") == len(linears)
    assert all(type(m) is torch.nn.Linear for m in linears)
    again_logits, _ = _logits_and_input_grad(model, ids)
    assert torch.equal(again_logits, plain_logits)


def test_the_kernel_is_called_only_where_it_computes_the_same_product(monkeypatch):
    import methods.infra.cpu_linear as cpu_linear

    calls = []
    real = cpu_linear._onednn_product
    monkeypatch.setattr(cpu_linear, "_onednn_product", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 5)
    route_linears(layer, "onednn")
    x = torch.randn(4, 8)
    layer(x)  # a small weight stays with PyTorch (see MIN_WEIGHT_ELEMENTS)
    assert calls == []
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 0)

    layer.weight.requires_grad_(True)  # fine-tuning: the weight needs its gradient, so PyTorch's own path
    layer(x).sum().backward()
    assert calls == [] and layer.weight.grad is not None

    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would run the product in bf16
        assert layer(x).dtype == torch.bfloat16
    assert calls == []
    assert layer(x[:0]).shape == (0, 5) and calls == []
    many_rows = torch.randn(cpu_linear.MAX_ROWS + 1, 8)  # large products stay with PyTorch (see MAX_ROWS)
    torch.testing.assert_close(layer(many_rows), F.linear(many_rows, layer.weight, layer.bias))
    assert calls == []

    expected = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    assert calls == [(4, 8)]
    grad_x = x.clone().requires_grad_(True)
    layer(grad_x).pow(2).sum().backward()
    reference = x.clone().requires_grad_(True)
    F.linear(reference, layer.weight, layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(grad_x.grad, reference.grad)
    assert len(calls) == 3  # the forward, and the backward's product with the transposed weight


def test_backend_choice_and_errors(monkeypatch):
    assert resolve_linear_backend("auto", torch.device("cpu")) == "auto"  # a measured plan: tests/test_linear_plan.py
    assert resolve_linear_backend("auto", torch.device("cuda")) == "aten"
    assert resolve_linear_backend("aten", torch.device("cpu")) == "aten"
    with pytest.raises(LinearBackendError, match="'mkl' is not one of"):
        resolve_linear_backend("mkl", torch.device("cpu"))
    import methods.infra.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    assert resolve_linear_backend("auto", torch.device("cpu")) == "aten"
    with pytest.raises(ModelLoadError, match="no oneDNN linear"):
        load_model("smollm2-135m", linear_backend="onednn")


def test_loaded_model_records_its_backend(smollm2):
    assert smollm2.linear_backend == "auto"
    assert smollm2.linear_plan.startswith(("oneDNN: ", "PyTorch for every product"))
    explicit = load_model("smollm2-135m", linear_backend="onednn")
    assert explicit.linear_backend == "onednn" and explicit.linear_plan == ""
    assert type(explicit.model.get_output_embeddings()) is OneDnnLinear


def test_packed_weights_are_reused_and_repacked_after_an_in_place_edit(monkeypatch):
    import copy

    import methods.infra.cpu_linear as cpu_linear
    from methods.infra.arch import EditableModel

    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 0)
    model = _tiny_llama()
    route_linears(model, "onednn")
    editable = EditableModel.wrap(model)
    down = editable.mlp_out(1)
    ids = torch.randint(0, 96, (2, 7))
    with torch.inference_mode():  # packed in inference mode, used outside it below
        model(ids)
    packed_before = down.__dict__[cpu_linear.PACKED_ATTRIBUTE][False][1]
    with torch.no_grad():
        model(ids)
    # an unchanged weight: the same packed copy
    assert down.__dict__[cpu_linear.PACKED_ATTRIBUTE][False][1] is packed_before

    torch.manual_seed(1)
    with torch.no_grad():
        editable.weight(1).add_(0.5 * torch.randn_like(editable.weight(1)))  # an edit, as the editors make it
    edited_logits, edited_grad = _logits_and_input_grad(model, ids)
    assert down.__dict__[cpu_linear.PACKED_ATTRIBUTE][False][1] is not packed_before
    assert True in down.__dict__[cpu_linear.PACKED_ATTRIBUTE]  # the backward packed the transposed weight
    reference = copy.deepcopy(model)  # the packed copies are not copied: the deep copy starts without them
    assert not any(m.__dict__.get(cpu_linear.PACKED_ATTRIBUTE) for m in reference.modules())
    route_linears(reference, "aten")
    plain_logits, plain_grad = _logits_and_input_grad(reference, ids)
    torch.testing.assert_close(edited_logits, plain_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(edited_grad, plain_grad, rtol=1e-4, atol=1e-6)
    assert cpu_linear.drop_packed_weights(model) == 3 * 7 + 1 + 3 * 7 + 1  # forward and transposed, every linear
    assert cpu_linear.drop_packed_weights(model) == 0


def test_without_packing_support_the_dense_weight_is_used(monkeypatch):
    import methods.infra.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 0)
    monkeypatch.setattr(cpu_linear, "packing_available", lambda: False)
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 5)
    layer.requires_grad_(False)
    route_linears(layer, "onednn")
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).pow(2).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    F.linear(reference, layer.weight, layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
    assert cpu_linear.PACKED_ATTRIBUTE not in layer.__dict__


def test_dense_backend_computes_on_onednn_without_packed_copies(monkeypatch):
    import methods.infra.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 0)
    calls = []
    real = cpu_linear._onednn_product
    monkeypatch.setattr(cpu_linear, "_onednn_product", lambda *a: calls.append(1) or real(*a))
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 7))
    plain_logits, plain_grad = _logits_and_input_grad(model, ids)
    assert route_linears(model, "onednn") == 3 * 7 + 1
    _logits_and_input_grad(model, ids)
    assert cpu_linear.drop_packed_weights(model) > 0
    _logits_and_input_grad(model, ids)  # packs again, then the switch below drops them
    assert route_linears(model, "onednn-dense") == 3 * 7 + 1
    assert all(type(m) is cpu_linear.DenseOneDnnLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
    calls.clear()
    dense_logits, dense_grad = _logits_and_input_grad(model, ids)
    assert len(calls) == 2 * (3 * 7 + 1)  # still oneDNN, forward and backward
    assert cpu_linear.drop_packed_weights(model) == 0  # but nothing packed
    torch.testing.assert_close(dense_logits, plain_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_grad, plain_grad, rtol=1e-4, atol=1e-6)
    assert resolve_linear_backend("onednn-dense", torch.device("cpu")) == "onednn-dense"
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    with pytest.raises(LinearBackendError, match="'onednn-dense' asked for"):
        resolve_linear_backend("onednn-dense", torch.device("cpu"))
    with pytest.raises(LinearBackendError, match="route_linears takes one of"):
        route_linears(model, "mkl")
    with pytest.raises(LinearBackendError, match="needs rows_by_shape"):
        route_linears(model, "auto")


def test_switching_backends_can_keep_the_packed_copies(monkeypatch):
    import methods.infra.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 0)
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 7))
    route_linears(model, "onednn")
    with torch.no_grad():
        packed_logits = model(ids).logits
    head = model.get_output_embeddings()
    packed = head.__dict__[cpu_linear.PACKED_ATTRIBUTE][False][1]
    route_linears(model, "aten", keep_packed=True)
    assert head.__dict__[cpu_linear.PACKED_ATTRIBUTE][False][1] is packed
    route_linears(model, "onednn", keep_packed=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, packed_logits)
    assert head.__dict__[cpu_linear.PACKED_ATTRIBUTE][False][1] is packed  # used again, not packed again
    route_linears(model, "aten")
    assert cpu_linear.drop_packed_weights(model) == 0  # a plain switch frees them
