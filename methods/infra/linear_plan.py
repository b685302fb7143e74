"""Backend ``auto``: which kernel computes each ``nn.Linear`` product on this machine, measured once and cached.

Few-row fp32 products (v* feeds 14–50 tokens per step, decoding one per answer) are bound by how fast a kernel
walks the weight, and which kernel does that best depends on the CPU (``benchmarks/bench_linear_backend.py``):
on the project's AMD EPYC VMs oneDNN's packed kernel ran SmolLM2's MLP shapes 1.2–1.7× faster than MKL at 7–128
rows; on its Intel Xeon VM MKL ran them faster (oneDNN at 0.4–1.0× of its speed) except the 49,152-word output
head at 4–16 rows (oneDNN 1.2–2.2×). So ``auto`` measures rather than guesses: for every weight shape that
methods/infra/cpu_linear.py may route (fp32, at least ``MIN_WEIGHT_ELEMENTS``) and every row band, the forward product
plus the input gradient's product, under PyTorch (``F.linear``) and under packed oneDNN, interleaved, cycling
through up to ``MODULES_PER_SHAPE`` layers of the shape so that the weights are not all in cache (as in a
forward pass). oneDNN gets a band when its median time is at most ``ONEDNN_SHARE`` of PyTorch's; a closer call
stays with PyTorch. The resulting plan, {weight shape: row ranges on oneDNN}, is cached on disk under a key of the
CPU, torch version, thread count and shapes: a machine measures once (~3 s for SmolLM2) and every trial on it
then routes the same way. Both kernels compute the same products up to summation order (~1e-6 relative).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from methods.infra.cache import cached_path, content_key, default_cache_dir
from methods.infra.cpu_linear import MAX_OUTPUT_ELEMENTS, MAX_ROWS, MIN_WEIGHT_ELEMENTS, ROUTABLE_CLASSES, onednn_linear_with_grad

PLAN_VERSION = 1  # bump when the measurement or the decision rule changes
# Row bands (inclusive), each timed at its geometric middle: 1 row is batch-1 decoding, 8–31 v* at batch 1,
# 32–255 v* at larger batches and short prompts.
ROW_BANDS = ((1, 1), (2, 7), (8, 31), (32, 127), (128, MAX_ROWS))
MODULES_PER_SHAPE = 4  # layers of one shape cycled through per timed call (4 SmolLM2 MLP weights: 14 MB > L2)
ROUNDS = 5  # timed samples per kernel and band, the kernels alternating
MIN_SAMPLE_SECONDS = 0.005  # a sample repeats the cycle until it lasts this long (timer resolution, jitter)
ONEDNN_SHARE = 0.9  # oneDNN takes a band only where it needs at most this share of PyTorch's time


@dataclass(frozen=True)
class LinearPlan:
    """Row ranges computed on oneDNN per weight shape (out_features, in_features), and the timings behind them."""

    rows_by_shape: dict[tuple[int, int], tuple[tuple[int, int], ...]]
    measurements: list[dict] = field(default_factory=list)
    path: Path | None = None  # the cache entry it was read from or written to

    def describe(self) -> str:
        """One line for logs and MLflow tags, e.g. ``oneDNN: 576->49152 at 2-31 rows; PyTorch otherwise``."""
        parts = [f"{in_features}->{out_features} at " + ", ".join(f"{low}-{high}" if low != high else f"{low}"
                                                                  for low, high in ranges) + " rows"
                 for (out_features, in_features), ranges in sorted(self.rows_by_shape.items()) if ranges]
        return ("oneDNN: " + "; ".join(parts) + "; PyTorch otherwise") if parts else "PyTorch for every product"

    def to_json(self) -> dict:
        return {"rows_by_shape": [{"shape": list(shape), "onednn_rows": [list(band) for band in ranges]}
                                  for shape, ranges in sorted(self.rows_by_shape.items())],
                "measurements": self.measurements}

    @classmethod
    def from_json(cls, payload: dict, path: Path | None = None) -> "LinearPlan":
        rows = {tuple(entry["shape"]): tuple(tuple(band) for band in entry["onednn_rows"])
                for entry in payload["rows_by_shape"]}
        return cls(rows_by_shape=rows, measurements=payload.get("measurements", []), path=path)


def routable_linears(model: torch.nn.Module) -> dict[tuple[int, int], list[torch.nn.Linear]]:
    """The model's ``nn.Linear`` modules (subclasses from methods/infra/cpu_linear.py included) whose products oneDNN
    may take over, by weight shape."""
    by_shape: dict[tuple[int, int], list[torch.nn.Linear]] = {}
    for module in model.modules():
        if type(module) not in ROUTABLE_CLASSES:
            continue
        weight = module.weight
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= MIN_WEIGHT_ELEMENTS:
            by_shape.setdefault(tuple(weight.shape), []).append(module)
    return by_shape


def machine_identity() -> dict:
    """What the kernels' speeds depend on besides the shapes: CPU model and features, threads, torch."""
    model_name, flags = "", ""
    try:  # Linux names the CPU and its instruction-set extensions here; elsewhere platform.processor() must do
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and not model_name:
                model_name = value
            elif key == "flags" and not flags:
                flags = hashlib.sha256(value.encode()).hexdigest()[:12]
            if model_name and flags:
                break  # the first processor's entry names them; a many-core machine lists the same for each core
    except OSError:
        pass
    return {"cpu": model_name or platform.processor(), "cpu_flags": flags,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def plan_linears(model: torch.nn.Module, cache_dir: Path | None = None, progress: bool = True) -> LinearPlan:
    """The plan for ``model``'s routable shapes on this machine: read from the cache, else measured and cached
    (under a file lock, so concurrent trials on one machine measure once)."""
    by_shape = routable_linears(model)
    if not by_shape:
        return LinearPlan(rows_by_shape={})
    description = {"what": "linear kernel plan (methods/infra/linear_plan.py)", "version": PLAN_VERSION,
                   "machine": machine_identity(), "shapes": sorted(by_shape), "row_bands": ROW_BANDS,
                   "max_output_elements": MAX_OUTPUT_ELEMENTS,
                   "onednn_share": ONEDNN_SHARE, "modules_per_shape": MODULES_PER_SHAPE}

    def build(tmp: Path) -> None:
        plan = measure_plan(by_shape, progress=progress)
        tmp.write_text(json.dumps({"description": description, **plan.to_json()}, indent=1), encoding="utf-8")

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cached_path(root, "linear_plans", content_key(description), build, suffix=".json")
    return LinearPlan.from_json(json.loads(path.read_text(encoding="utf-8")), path=path)


def measure_plan(by_shape: dict[tuple[int, int], list[torch.nn.Linear]], progress: bool = True) -> LinearPlan:
    """Times every shape × row band under both kernels (see the module docstring) and decides."""
    rows_by_shape, measurements = {}, []
    bar = tqdm(total=len(by_shape) * len(ROW_BANDS), desc="measuring linear kernels (once per machine)",
               unit="band", disable=not progress, leave=False)
    generator = torch.Generator().manual_seed(0)
    try:
        for shape, modules in sorted(by_shape.items()):
            spread = modules[::max(1, len(modules) // MODULES_PER_SHAPE)][:MODULES_PER_SHAPE]
            ranges = []
            cap = MAX_OUTPUT_ELEMENTS // shape[0]  # more rows never go to oneDNN (cpu_linear.MAX_OUTPUT_ELEMENTS)
            for low, high in ROW_BANDS:
                if low > cap:
                    bar.update(1)
                    continue
                high = min(high, cap)
                rows = round(math.sqrt(low * high))
                seconds = _time_band(spread, rows, generator)
                use_onednn = seconds["onednn"] <= ONEDNN_SHARE * seconds["aten"]
                measurements.append({"product": f"{shape[1]}->{shape[0]}", "band": [low, high], "rows": rows,
                                     "modules": len(spread), "aten_us": round(seconds["aten"] * 1e6, 1),
                                     "onednn_us": round(seconds["onednn"] * 1e6, 1), "onednn": use_onednn})
                if use_onednn:
                    if ranges and ranges[-1][1] == low - 1:
                        ranges[-1] = (ranges[-1][0], high)  # adjacent bands make one range
                    else:
                        ranges.append((low, high))
                bar.update(1)
            rows_by_shape[shape] = tuple(ranges)
    finally:
        bar.close()
    return LinearPlan(rows_by_shape=rows_by_shape, measurements=measurements)


def _time_band(modules: list[torch.nn.Linear], rows: int, generator: torch.Generator) -> dict[str, float]:
    """Median seconds of one forward product plus its input gradient per module, for each kernel."""
    out_features, in_features = modules[0].weight.shape
    x = torch.randn(rows, in_features, generator=generator)
    grad = torch.randn(rows, out_features, generator=generator)

    def aten(module, x_in):
        return F.linear(x_in, module.weight, module.bias)

    def cycle(product) -> None:
        for module in modules:
            x_in = x.detach().requires_grad_(True)
            torch.autograd.grad(product(module, x_in), x_in, grad)

    kernels = {"aten": aten, "onednn": onednn_linear_with_grad}
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    with torch.inference_mode(False), torch.enable_grad():
        repeats = {}
        for name, product in kernels.items():  # warm-up: oneDNN packs the weights and builds its primitive here
            cycle(product)
            started = time.perf_counter()
            cycle(product)
            repeats[name] = max(1, math.ceil(MIN_SAMPLE_SECONDS / max(time.perf_counter() - started, 1e-9)))
        count = max(repeats.values())
        for round_index in range(ROUNDS):
            for name in (list(kernels) if round_index % 2 == 0 else list(kernels)[::-1]):
                started = time.perf_counter()
                for _ in range(count):
                    cycle(kernels[name])
                samples[name].append((time.perf_counter() - started) / (count * len(modules)))
    return {name: statistics.median(values) for name, values in samples.items()}
