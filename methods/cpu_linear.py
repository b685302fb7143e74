"""Linear layers through oneDNN on CPU: the same products, computed by a faster kernel for the few-row shapes.

The v* optimisation (methods/targets.py) feeds 7–50 tokens per step through every block above the edit site, and
decoding feeds one token per answer: ``nn.Linear`` products with few rows. PyTorch sends fp32 products to MKL,
whose few-row kernel is slow on this project's CPU machines (AMD EPYC, 2 cores). oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise``, the kernel PyTorch's own compiler uses on CPU) computes the same
product faster there. Measured on SmolLM2's shapes, weights not in cache, 14 rows: 576→1536 forward 301 µs
against MKL's 411 µs, its input gradient 254 µs against 456 µs; the 49,152-word output head on 7 rows 6.6 ms
against 12.7 ms in MKL's best (chunked) form. Whole v* requests took a median 1.12–1.22× less time in three
paired runs (benchmarks/bench_linear_backend.py; README, "Benchmark and speed").

``route_linears(model, "onednn")`` turns every plain ``nn.Linear`` of ``model`` into a ``OneDnnLinear``, a
subclass whose ``forward`` calls that kernel (its class is swapped, nothing else: same parameters, state dict and
hooks). It only takes over where the result is the same product up to summation order (relative differences
~1e-6 in fp32): fp32 weights and input on CPU, no autocast, at most ``MAX_ROWS`` rows, weights of at least
``MIN_WEIGHT_ELEMENTS``, and no weight or bias that wants a gradient (fine-tuning falls back to ``F.linear``).
The input's gradient is a second oneDNN product, with the transposed weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LINEAR_BACKENDS = ("auto", "onednn", "aten")


class LinearBackendError(RuntimeError):
    pass


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` (``weight`` may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinearFunction(torch.autograd.Function):
    """``x @ Wᵀ + b`` with the gradient for ``x`` only (W and b are constants here: see ``_takes_over``)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _onednn_product(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        # dL/dx = g · W, i.e. a linear product with weight Wᵀ (a view: oneDNN reads it strided).
        return _onednn_product(grad_output.contiguous(), weight.t(), None), None, None


# oneDNN keeps a primitive per product shape (up to 1,024), each holding ~0.6 MB of buffers for these layer sizes;
# with one shape per corpus batch length, the statistics pass grew the process by 1 GB, for no speed gain at
# thousands of rows. Below this many rows the kernel is clearly faster and the shapes are few.
MAX_ROWS = 256
# Smaller weights (SmolLM2's 576×576 and 576×192 projections) ran no faster on oneDNN once the autograd
# function's own overhead is counted (benchmarks/bench_linear_backend.py), so they stay with PyTorch.
MIN_WEIGHT_ELEMENTS = 1 << 19


def _takes_over(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and weight.numel() >= MIN_WEIGHT_ELEMENTS
            and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and not torch.is_autocast_enabled("cpu"))


class OneDnnLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose product runs on oneDNN when that gives the same product (see module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _takes_over(x, self.weight, self.bias):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and x.requires_grad:
            return _OneDnnLinearFunction.apply(x, self.weight, self.bias)
        return _onednn_product(x, self.weight, self.bias)


def resolve_linear_backend(backend: str, device: torch.device) -> str:
    """``auto`` → ``onednn`` on CPU where the kernel exists, else ``aten`` (PyTorch's own dispatch)."""
    if backend not in LINEAR_BACKENDS:
        raise LinearBackendError(f"linear backend {backend!r} is not one of {list(LINEAR_BACKENDS)}")
    if backend == "auto":
        return "onednn" if device.type == "cpu" and onednn_available() else "aten"
    if backend == "onednn" and not onednn_available():
        raise LinearBackendError("linear backend 'onednn' asked for, but this PyTorch build has no oneDNN linear "
                                 "(torch.ops.mkldnn._linear_pointwise); use 'aten' or 'auto'")
    return backend


def route_linears(model: torch.nn.Module, backend: str) -> int:
    """Make every plain ``nn.Linear`` of ``model`` use ``backend`` (``onednn`` or ``aten``); returns how many
    modules were switched. Subclasses of ``nn.Linear`` (quantised or adapter layers) are left alone."""
    if backend not in ("onednn", "aten"):
        raise LinearBackendError(f"route_linears takes 'onednn' or 'aten', got {backend!r}")
    wanted, other = (OneDnnLinear, torch.nn.Linear) if backend == "onednn" else (torch.nn.Linear, OneDnnLinear)
    switched = 0
    for module in model.modules():
        if type(module) is other:
            module.__class__ = wanted
            switched += 1
    return switched
