"""oneDNN against PyTorch's own dispatch for the model's linear products: a paired comparison.

This machine's speed drifts by 10–20 % over minutes, so two benchmark runs taken at different times cannot tell
a 1.2× kernel gain from drift. Here the backends run interleaved in one process on the same model
(``methods.infra.cpu_linear.route_linears`` switches them; ``onednn`` multiplies by packed weights, ``onednn-dense`` by
the dense ones): first single products of the model's own shapes (weights not in cache, as in a forward pass),
then whole v* requests of the reference setting (layers 4–8, 25 steps, v_lr 0.1, the first N CounterFact
records), each request timed under every backend (the order reversed from one request to the next), and the v*
compared with aten's. ``auto`` is the default backend: the per-shape, per-row-band plan this machine measured
(methods/infra/linear_plan.py; read from ``--cache-dir`` or measured there first), whose measurements are printed too.
The packed copies are kept across the switches (``keep_packed``), as in a run that stays on one backend.

    .venv/bin/python benchmarks/bench_linear_backend.py --data <data>/counterfact/counterfact-edit.json

``<data>``: a folder of the data sets laid out like the project's shared data folder (``counterfact/``,
``general/``, …).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from grid.trial import to_request  # noqa: E402
from methods.infra.memory import peak_memory_mb  # noqa: E402
from evals.datasets import load_records  # noqa: E402
from methods.infra.arch import EditableModel  # noqa: E402
from methods.context import generate_context_templates  # noqa: E402
from methods.infra.cache import default_cache_dir  # noqa: E402
from methods.infra.cpu_linear import LinearBackendError, resolve_linear_backend, route_linears  # noqa: E402
from methods.infra.linear_plan import plan_linears  # noqa: E402
from methods.infra.models import load_model  # noqa: E402
from methods.targets import TargetHParams, compute_target_values  # noqa: E402

KERNELS = ("aten", "onednn-dense", "onednn")  # the single-product table's columns
BACKENDS = (*KERNELS, "auto")  # the v* comparison's


def switch(model: torch.nn.Module, backend: str, plan) -> None:
    route_linears(model, backend, keep_packed=True, rows_by_shape=plan.rows_by_shape if backend == "auto" else None)


def product_timings(model: torch.nn.Module, rows: list[int], repeats: int) -> list[dict]:
    """Seconds per product (forward, and the input gradient's product) for each distinct weight shape of the
    model's linear layers, cycling through every layer of that shape so the weights are not in cache."""
    by_shape: dict[tuple[int, int], list[torch.nn.Linear]] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            by_shape.setdefault(tuple(module.weight.shape), []).append(module)
    results = []
    for (out_features, in_features), layers in sorted(by_shape.items()):
        for count in rows:
            x = torch.randn(count, in_features)
            grad = torch.randn(count, out_features)
            row = {"shape": f"{in_features}->{out_features}", "rows": count, "layers": len(layers)}
            for backend in KERNELS:
                route_linears(model, backend, keep_packed=True)

                def forward_and_grad():
                    for layer in layers:
                        x_in = x.clone().requires_grad_(True)
                        layer(x_in).backward(grad)

                forward_and_grad()  # warm-up (oneDNN builds its primitive for the shape here)
                started = time.perf_counter()
                for _ in range(repeats):
                    forward_and_grad()
                row[f"{backend}_us"] = (time.perf_counter() - started) / (repeats * len(layers)) * 1e6
            for backend in KERNELS[1:]:
                row[f"{backend}_speedup"] = row["aten_us"] / row[f"{backend}_us"]
            results.append(row)
    return results


def paired_vstar(loaded, data: str, num_edits: int, layers: list[int], steps: int, v_lr: float, plan) -> dict:
    model, tokenizer = loaded.model, loaded.tokenizer
    editable = EditableModel.wrap(model)
    context = generate_context_templates(model, tokenizer, seed=0)
    requests = [to_request(record) for record in load_records(data, limit=num_edits)]
    hparams = TargetHParams(v_lr=v_lr, v_num_grad_steps=steps, early_stop_loss=0.0)
    site = layers[-1]

    def one(request):
        return compute_target_values(model, tokenizer, editable.block(site), [request], context, hparams,
                                     blocks=editable.blocks, site_layer=site)

    for backend in BACKENDS:  # warm-up (and the packed copies made once)
        switch(model, backend, plan)
        one(requests[0])
    seconds: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
    differences: dict[str, list[float]] = {backend: [] for backend in BACKENDS[1:]}
    for index, request in enumerate(requests):
        values = {}
        for backend in BACKENDS if index % 2 == 0 else BACKENDS[::-1]:
            switch(model, backend, plan)
            started = time.perf_counter()
            values[backend] = one(request).values
            seconds[backend].append(time.perf_counter() - started)
        for backend in BACKENDS[1:]:
            differences[backend].append(float((values[backend] - values["aten"]).norm() / values["aten"].norm()))
    speedups = {}
    for backend in BACKENDS[1:]:
        ratios = [a / o for a, o in zip(seconds["aten"], seconds[backend])]
        speedups[backend] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    packed_vs_dense = [d / p for d, p in zip(seconds["onednn-dense"], seconds["onednn"])]
    return {"requests": len(requests), "seconds": seconds,
            "median_s": {b: statistics.median(s) for b, s in seconds.items()},
            "total_s": {b: sum(s) for b, s in seconds.items()},
            "speedup_over_aten": speedups,
            "packed_over_dense": {"median": statistics.median(packed_vs_dense), "min": min(packed_vs_dense),
                                  "max": max(packed_vs_dense)},
            "vstar_relative_difference_max": {b: max(d) for b, d in differences.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True, help="CounterFact-style records (the first --num-edits are used)")
    parser.add_argument("--num-edits", type=int, default=10)
    parser.add_argument("--layers", default="4,5,6,7,8", help="edited layers; v* sits on the last")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--v-lr", type=float, default=0.1)
    parser.add_argument("--rows", default="1,7,14,42,128", help="row counts of the single-product table")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--cache-dir", default=None, help="where backend auto's plan is read or measured into "
                        "(default: $EDITGRID_CACHE or ~/.cache/editgrid)")
    args = parser.parse_args(argv)
    try:
        resolve_linear_backend("onednn", torch.device("cpu"))
    except LinearBackendError as err:
        print(f"bench_linear_backend: {err}", file=sys.stderr)
        return 2
    loaded = load_model(args.model, device="cpu", linear_backend="aten")
    layers = [int(v) for v in args.layers.split(",")]
    plan = plan_linears(loaded.model, Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    products = product_timings(loaded.model, [int(v) for v in args.rows.split(",")], args.repeats)
    vstar = paired_vstar(loaded, args.data, args.num_edits, layers, args.steps, args.v_lr, plan)

    print(f"{args.model}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print("single products (forward + input gradient), µs per layer, weights cycled through every layer:")
    print(f"  {'shape':>12} {'rows':>5} " + " ".join(f"{b:>12}" for b in KERNELS) + "  speedup over aten")
    for row in products:
        print(f"  {row['shape']:>12} {row['rows']:>5} " + " ".join(f"{row[b + '_us']:12.0f}" for b in KERNELS)
              + "  " + " / ".join(f"{row[b + '_speedup']:.2f}" for b in KERNELS[1:]))
    print(f"backend auto's plan on this machine ({plan.path}): {plan.describe()}")
    for entry in plan.measurements:
        low, high = entry["band"]
        print(f"  {entry['product']:>12} rows {low:>3}-{high:<3} (timed at {entry['rows']:>3}): "
              f"aten {entry['aten_us']:9.1f} µs, onednn {entry['onednn_us']:9.1f} µs -> "
              f"{'onednn' if entry['onednn'] else 'aten'}")
    print(f"v* (layer {layers[-1]}, {args.steps} steps, v_lr {args.v_lr}), {vstar['requests']} requests, each timed "
          f"under every backend:")
    for backend in BACKENDS:
        line = f"  {backend:>12}: median {vstar['median_s'][backend]:.2f} s, total {vstar['total_s'][backend]:.1f} s"
        if backend in vstar["speedup_over_aten"]:
            speedup = vstar["speedup_over_aten"][backend]
            line += (f"; per request {speedup['median']:.2f}× faster than aten (min {speedup['min']:.2f}, max "
                     f"{speedup['max']:.2f}), v* differs by ≤ {vstar['vstar_relative_difference_max'][backend]:.1e}")
        print(line)
    packed = vstar["packed_over_dense"]
    print(f"  packed over dense oneDNN, per request: {packed['median']:.2f}× (min {packed['min']:.2f}, max "
          f"{packed['max']:.2f}); peak RSS {peak_memory_mb(torch.device('cpu')):.0f} MB")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"config": vars(args), "products": products, "vstar": vstar,
                                                   "auto_plan": {"describe": plan.describe(), **plan.to_json()},
                                                   "peak_rss_mb": peak_memory_mb(torch.device("cpu"))}, indent=2))
        print(f"results written to {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
