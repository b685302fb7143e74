"""Linear layers through oneDNN on CPU: the same products, computed by a faster kernel for the few-row shapes.

The v* optimisation (methods/targets.py) feeds 7–50 tokens per step through every block above the edit site, and
decoding feeds one token per answer: ``nn.Linear`` products with few rows. PyTorch sends fp32 products to MKL,
whose few-row kernel was slow on this project's AMD EPYC VMs (2 cores): at 14 rows it spends more time
rearranging the weight than multiplying. oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the kernel
PyTorch's own compiler uses on CPU) computes the same product faster there, and faster still from a weight it
has laid out in its own blocked format once ("packed", ``torch.ops.mkldnn._reorder_linear_weight``). Measured
there on SmolLM2's shapes, weights not in cache, 14 rows: 576→1536 forward 439 µs on MKL, 338 µs on oneDNN,
227 µs packed; its input gradient 468, 269 and 235 µs; the 576→576 projections 174 µs on MKL, 89 µs packed; the
49,152-word output head on 7 rows 33.7 ms on MKL, 7.9 ms on oneDNN, 4.7 ms packed. On the project's Intel Xeon
VM it is the other way round for the MLP and attention shapes (MKL faster; oneDNN only wins on the output head at
2–31 rows), which is why the default backend ``auto`` measures per shape and row band (methods/infra/linear_plan.py)
instead of routing everything (``benchmarks/bench_linear_backend.py`` times the model's products and whole v*
requests under each backend).

``route_linears(model, "onednn")`` turns every plain ``nn.Linear`` of ``model`` into a ``OneDnnLinear``, a
subclass whose ``forward`` calls that kernel (its class is swapped, nothing else: same parameters, state dict and
hooks). It only takes over where the result is the same product up to summation order (relative differences
~1e-6 in fp32): fp32 weights and input on CPU, no autocast, at most ``MAX_ROWS`` rows (and only the row counts
in the module's ``onednn_rows``, which ``route_linears(model, "auto", rows_by_shape)`` narrows per weight shape),
weights of at least ``MIN_WEIGHT_ELEMENTS``, and no weight or bias that wants a gradient (fine-tuning falls back
to ``F.linear``). The input's gradient is a second oneDNN product, with the transposed weight.

Packed weights: each module packs its weight the first time oneDNN computes a product with it (and the
transposed weight the first time a gradient flows through it), and keeps the packed copy next to the parameter
(not in the state dict). A copy is reused only while the parameter has the same storage and version counter, so
an edit made in place (``weight.add_``, ``copy_``, an optimiser step: anything but writes through ``.data``,
which PyTorch does not count) repacks it on the next product. The price is memory: one more copy of each
weight used this way, two for the blocks v* backpropagates through (~0.9 GB for SmolLM2 in fp32 after a run of
edits and evaluations, when every shape is routed). ``drop_packed_weights(model)`` frees them; the
``onednn-dense`` backend never makes them, and ``auto`` only for the shapes it routes.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

LINEAR_BACKENDS = ("auto", "onednn", "onednn-dense", "aten")


class LinearBackendError(RuntimeError):
    pass


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packing_available() -> bool:
    return onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` (``weight`` dense, a transposed view, or packed by ``_packed_weight``).

    The product runs on the 2-D [rows, in] view: oneDNN keeps a primitive, with its buffers, per distinct input
    shape, and a [batch, length, in] input made one per (batch, length) pair — on a 10,000-record evaluation that
    was hundreds of shapes, ~19 MB each for the output head, and the process grew to 18 GB. Flattened, the shapes
    are the row counts (at most MAX_ROWS of them)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


# The row count oneDNN lays a packed weight out for. Any row count can use the packed weight; 32 was as fast as
# a layout for the exact count from 7 to 100 rows on SmolLM2's shapes.
PACKING_ROWS_HINT = 32


PACKED_ATTRIBUTE = "_onednn_packed"  # where a module keeps its packed copies (in its __dict__, not its state dict)


class _PackedWeights(dict):
    """A module's packed copies, {transposed: (signature, packed tensor)}: derived data, so a deep copy or a pickle
    of the model starts without them (oneDNN's blocked tensors cannot be copied like ordinary ones)."""

    def __deepcopy__(self, memo):
        return _PackedWeights()

    def __reduce__(self):
        return (_PackedWeights, ())


def _packed_weight(module: torch.nn.Linear, transposed: bool) -> torch.Tensor:
    """``module.weight`` (or its transpose) in oneDNN's packed format, packed once per storage and version.

    Without packing support in this PyTorch build, the dense weight (or a transposed view of it)."""
    weight = module.weight
    # A plain nn.Linear packs too: methods/infra/linear_plan.py times oneDNN on modules before routing them.
    if not (getattr(module, "packs_weights", True) and packing_available()):
        return weight.t() if transposed else weight
    signature = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
    store = module.__dict__.get(PACKED_ATTRIBUTE)
    if store is None:
        store = module.__dict__[PACKED_ATTRIBUTE] = _PackedWeights()
    entry = store.get(transposed)
    if entry is None or entry[0] != signature:
        store.pop(transposed, None)  # free a stale copy before making its replacement
        with torch.no_grad(), torch.inference_mode(False):  # a packed copy made in inference mode is used outside
            source = weight.detach().t().contiguous() if transposed else weight.detach()
            entry = (signature, torch.ops.mkldnn._reorder_linear_weight(source, PACKING_ROWS_HINT))
        store[transposed] = entry
    return entry[1]


def drop_packed_weights(model: torch.nn.Module) -> int:
    """Free every packed weight copy in ``model`` (they are rebuilt on the next oneDNN product); returns how many."""
    dropped = 0
    for module in model.modules():
        store = module.__dict__.pop(PACKED_ATTRIBUTE, None)
        dropped += len(store or ())
    return dropped


class _OneDnnLinearFunction(torch.autograd.Function):
    """``x @ Wᵀ + b`` with the gradient for ``x`` only (W and b are constants here: see ``_takes_over``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, module):
        ctx.save_for_backward(weight)  # so that autograd refuses a backward after W was changed in place
        ctx.module = module
        return _onednn_product(x, _packed_weight(module, transposed=False), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        _ = ctx.saved_tensors  # reading them is autograd's check that W was not changed since the forward
        # dL/dx = g · W, i.e. a linear product with weight Wᵀ.
        return _onednn_product(grad_output.contiguous(), _packed_weight(ctx.module, transposed=True), None), \
            None, None, None


# oneDNN keeps a primitive per product shape (up to 1,024), each holding ~0.6 MB of buffers for these layer sizes;
# with one shape per corpus batch length, the statistics pass grew the process by 1 GB, for no speed gain at
# thousands of rows. Below this many rows the kernel is clearly faster and the shapes are few.
MAX_ROWS = 256
# The buffers of each cached primitive grow with rows × output features (one output block per shape). For the
# output head (49,152 outputs) every row count up to 256 would hold ~6.4 GB in all — a 10,000-record evaluation grew
# the process to 18 GB — so a product goes to oneDNN only while rows × outputs stays within this many elements
# (SmolLM2: the 1536-wide layers up to 256 rows, the head up to 8 rows; ~0.3 GB of primitives at most).
MAX_OUTPUT_ELEMENTS = 256 * 1536
# Packed, SmolLM2's 576×576 projections run ~2× faster than on MKL (see the module docstring); its 576×192 ones
# ran no faster (38 against 36 µs forward at 14 rows), so weights that small stay with PyTorch.
MIN_WEIGHT_ELEMENTS = 1 << 18


ALL_ROWS = ((1, MAX_ROWS),)  # row ranges (inclusive) a module computes on oneDNN: by default every eligible count


def _takes_over(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                row_ranges: tuple[tuple[int, int], ...]) -> bool:
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() > 0 and weight.numel() >= MIN_WEIGHT_ELEMENTS and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and not torch.is_autocast_enabled("cpu")):
        return False
    rows = x.numel() // x.shape[-1]
    if rows * weight.shape[0] > MAX_OUTPUT_ELEMENTS:
        return False
    return any(low <= rows <= high for low, high in row_ranges)


class OneDnnLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose product runs on oneDNN when that gives the same product (see module docstring).

    ``onednn_rows``: the row counts it computes there, as inclusive ranges within 1..MAX_ROWS; every other count
    goes to ``F.linear``. The backend ``auto`` sets it per module from a measurement (methods/infra/linear_plan.py)."""

    packs_weights = True
    onednn_rows: tuple[tuple[int, int], ...] = ALL_ROWS

    def takes_over(self, x: torch.Tensor) -> bool:
        """Whether ``self(x)`` runs on oneDNN."""
        return _takes_over(x, self.weight, self.bias, self.onednn_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes_over(x):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and x.requires_grad:
            return _OneDnnLinearFunction.apply(x, self.weight, self.bias, self)
        return _onednn_product(x, _packed_weight(self, transposed=False), self.bias)


def onednn_linear_with_grad(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module``'s product on oneDNN from its packed weight, with the input gradient, whatever the module's class
    and row ranges (for timing the kernel before routing: methods/infra/linear_plan.py)."""
    return _OneDnnLinearFunction.apply(x, module.weight, module.bias, module)


class DenseOneDnnLinear(OneDnnLinear):
    """``OneDnnLinear`` on the dense weight: no packed copies, so no extra memory, and slower few-row products
    (backend ``onednn-dense``)."""

    packs_weights = False


_CLASS_OF_BACKEND = {"onednn": OneDnnLinear, "onednn-dense": DenseOneDnnLinear, "aten": torch.nn.Linear}
ROUTABLE_CLASSES = tuple(_CLASS_OF_BACKEND.values())  # what route_linears switches (exact types, not subclasses)
RowRangesByShape = Mapping[tuple[int, int], tuple[tuple[int, int], ...]]


def resolve_linear_backend(backend: str, device: torch.device) -> str:
    """``auto`` stays ``auto`` on CPU where oneDNN can pack weights (each weight shape and row band then goes to
    whichever kernel measured faster on this machine: methods/infra/linear_plan.py), else ``aten`` (PyTorch's own
    dispatch)."""
    if backend not in LINEAR_BACKENDS:
        raise LinearBackendError(f"linear backend {backend!r} is not one of {list(LINEAR_BACKENDS)}")
    if backend == "auto":
        return "auto" if device.type == "cpu" and packing_available() else "aten"
    if backend.startswith("onednn") and not onednn_available():
        raise LinearBackendError(f"linear backend {backend!r} asked for, but this PyTorch build has no oneDNN linear "
                                 "(torch.ops.mkldnn._linear_pointwise); use 'aten' or 'auto'")
    return backend


def route_linears(model: torch.nn.Module, backend: str, keep_packed: bool = False,
                  rows_by_shape: RowRangesByShape | None = None) -> int:
    """Make every plain ``nn.Linear`` of ``model`` use ``backend`` (``onednn``, ``onednn-dense``, ``aten``, or
    ``auto`` with ``rows_by_shape``); returns how many modules changed class or row ranges.

    ``auto``: a module whose weight shape (out, in) has row ranges in ``rows_by_shape`` becomes a packing
    ``OneDnnLinear`` for those row counts only; the others stay with PyTorch. Subclasses of ``nn.Linear``
    (quantised or adapter layers) are left alone. A module that leaves oneDNN frees its packed weight copies unless
    ``keep_packed`` (for switching back without packing again, as a paired benchmark does; a kept copy is still
    checked against the weight's storage and version before use)."""
    if backend == "auto":
        if rows_by_shape is None:
            raise LinearBackendError("route_linears(backend='auto') needs rows_by_shape (methods/infra/linear_plan.py)")
    elif backend not in _CLASS_OF_BACKEND:
        raise LinearBackendError(f"route_linears takes one of {[*_CLASS_OF_BACKEND, 'auto']}, got {backend!r}")
    changed = 0
    for module in model.modules():
        if type(module) not in ROUTABLE_CLASSES:
            continue
        wanted, rows = _CLASS_OF_BACKEND.get(backend), ALL_ROWS
        if backend == "auto":
            rows = tuple((int(low), int(high)) for low, high in rows_by_shape.get(tuple(module.weight.shape), ()))
            wanted = OneDnnLinear if rows else torch.nn.Linear
            rows = rows or ALL_ROWS
        changed += (type(module), getattr(module, "onednn_rows", ALL_ROWS)) != (wanted, rows)
        module.__class__ = wanted
        module.__dict__.pop("onednn_rows", None)  # the class default (ALL_ROWS) unless a plan narrows it
        if rows != ALL_ROWS:
            module.onednn_rows = rows
        if not getattr(wanted, "packs_weights", False) and not keep_packed:
            module.__dict__.pop(PACKED_ATTRIBUTE, None)
    return changed
