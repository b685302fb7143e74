"""Editing-cost benchmark: statistics, v*, solves and evaluation throughput per method × batch size.

For one model it measures, separately:

* second-moment statistics: seconds and tokens/s (and whether they came from the cache; ``--fresh-stats``
  computes them in a temporary cache folder so that the figure is an honest compute time);
* per method × v* precision (``--vstar-autocast``) × batch size cell, repeated ``--repeats`` times on the restored
  unedited weights: seconds per edit in total (``s/edit``: median over repeats of the run's mean; ``÷ batch 1``: its
  ratio to batch 1 of the same method and precision; ``batch median/min/max``: over every batch of every repeat,
  per edit), of which v* (target values) and solves (keys, residuals, Δ), from ``BatchReport``; v*'s passes per
  request (``v* steps``, early stop included) and the token slots it ran per edit (``v* tokens/edit``: its work,
  whatever the machine); the mean v* target probability; efficacy of the edited records; teacher-forced evaluation
  throughput on them (scored prompt/continuation pairs per second); peak memory of the editing alone
  (``edit peak MB``) and of the whole cell (``peak MB``): resident-set high-water mark reset per cell on Linux,
  CUDA max allocated on GPU (methods/infra/memory.py).

* autoregressive evaluation throughput (``--eval-generations N``): greedy answers to the first N evaluation
  prompts of the edited records per second, and the same model judging those answers (judgments/s);
* ``eval/edit``: seconds of one teacher-forced evaluation of all N edited records divided by the seconds it took
  to make those N edits (a checkpoint should cost less than the editing it checks).

Repeated figures are reported as median and min–max. The machine and library versions go into the JSON.

    .venv/bin/python benchmarks/bench_editing.py                      # SmolLM2, memit + alphaedit, 10 edits
    .venv/bin/python benchmarks/bench_editing.py --methods memit --batch-sizes 1,5 --repeats 3 --fresh-stats
    .venv/bin/python benchmarks/bench_editing.py --reference-workload <data>   # issue 7's side-by-side
    .venv/bin/python benchmarks/bench_editing.py --batch-sizes 1,10,100 --num-edits 100 \
        --data <data>/counterfact/counterfact-edit.json --offset 2000     # long-horizon batch sizes

``<data>``: a folder of the data sets laid out like the project's shared data folder (``counterfact/``,
``general/``, …).

``--reference-workload DATA`` is the setting the reference toolkit was timed on (benchmarks/RESULTS.md): layers 4–8,
the first 50 records of DATA/counterfact/counterfact-edit.json, batch 1, v* with v_lr 0.1 and 25 steps, and
statistics from every sentence field longer than 20 characters of DATA/general/*.jsonl, one per line (8,920
lines, 325k tokens), computed fresh. Options given explicitly still win.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from evals.autoregressive import GenerationSettings, answer_queries, generate_answers
from evals.datasets import load_records
from evals.judge import Judge, JudgeItem, TransformersJudge
from evals.jsonl import jsonl_objects
from evals.teacher_forced import count_scored_pairs, evaluate_records
from grid.assembly import assemble_method, resolve_layers
from grid.config import method_settings, parse_override
from grid.tracking import TrialTracker, format_summary_table, resolve_tracking_uri
from grid.trial import batches, to_request
from methods.infra.arch import EditableModel
from methods.context import generate_context_templates
from methods.corpus import parse_corpus
from methods.infra.cpu_linear import LINEAR_BACKENDS
from methods.infra.linear_plan import machine_identity
from methods.infra.memory import peak_memory_mb, reset_peak_memory
from methods.infra.models import load_model
from methods.stats import FORWARD_DTYPE_BY_NAME, second_moments
from methods.targets import AUTOCAST_DTYPES

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "bench_editing.json"
TABLE_COLUMNS = ["method", "v* autocast", "batch", "edits", "s/edit", "÷ batch 1", "÷ 1st method", "batch median", "batch min",
                 "batch max", "v* s/edit", "solve s/edit", "v* steps", "v* tokens/edit", "v* p", "efficacy",
                 "eval pairs/s", "eval/edit", "gen/s", "judge/s", "edit peak MB", "peak MB"]
REFERENCE = {  # what --reference-workload sets (benchmarks/RESULTS.md), unless given explicitly
    "methods": ["memit", "alphaedit", "rome"], "num_edits": 50, "layers": [4, 5, 6, 7, 8],
    "hparams": {"v_lr": 0.1, "v_num_grad_steps": 25}, "stats_max_length": 1024, "stats_tokens": 10**7,
    "fresh_stats": True,
}
REFERENCE_CORPUS_MIN_CHARS = 20


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in _comma_list(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"values must be >= 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder or embedded name")
    parser.add_argument("--methods", type=_comma_list, default=None,
                        help="comma list of presets in configs/presets (default memit,alphaedit)")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1], help="comma list of edits per step")
    parser.add_argument("--vstar-autocast", type=_comma_list, default=["none"],
                        help=f"comma list of v*'s step precision (as v_autocast: {', '.join(AUTOCAST_DTYPES)}); "
                             "each is a cell of its own, on the same edits")
    parser.add_argument("--num-edits", type=int, default=None, help="edits per cell (default 10)")
    parser.add_argument("--data", default=None, help="builtin (default), a JSON/JSONL file, or hf:<dataset>")
    parser.add_argument("--offset", type=int, default=0, help="first record of --data to use")
    parser.add_argument("--stats-corpus", default=None,
                        help="statistics corpus (as stats.corpus; default model-samples)")
    parser.add_argument("--stats-tokens", type=int, default=None, help="tokens averaged into C (default 20000)")
    parser.add_argument("--stats-max-length", type=int, default=None,
                        help="statistics documents are cut to this many tokens (default 256)")
    parser.add_argument("--stats-forward-dtype", choices=list(FORWARD_DTYPE_BY_NAME), default=None,
                        help="the statistics' forward pass under autocast in this dtype (as stats.forward_dtype; "
                             "default: the weights' dtype)")
    parser.add_argument("--linear-backend", choices=list(LINEAR_BACKENDS), default="auto",
                        help="kernel of the model's nn.Linear products (as model_args.linear_backend; auto = per "
                             "weight shape and row band whichever of oneDNN (packed weights) and PyTorch measured "
                             "faster on this machine, onednn = oneDNN with packed weights, onednn-dense = without "
                             "them, aten = PyTorch's)")
    parser.add_argument("--fresh-stats", action="store_true", default=None,
                        help="compute the statistics in a temporary cache folder (measures compute, not the cache)")
    parser.add_argument("--set", dest="hparams", action="append", default=[], metavar="NAME=VALUE",
                        help="a hyper-parameter for every method (YAML value), e.g. --set v_lr=0.1; repeatable")
    parser.add_argument("--reference-workload", metavar="DATA", default=None,
                        help="the reference toolkit's timed setting, from the shared data folder DATA (see above)")
    parser.add_argument("--eval-generations", type=int, default=8,
                        help="prompts answered by greedy generation and then judged, per cell (0: skip)")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of each method × batch-size cell")
    parser.add_argument("--layers", type=_int_list, default=None,
                        help="comma list of layers to edit (default: each preset's / the architecture's); "
                             "one-layer solvers (ROME) edit the last of them")
    parser.add_argument("--cache-dir", default=None, help="EditGrid cache folder (default the normal cache)")
    parser.add_argument("--json-out", default=str(DEFAULT_JSON), help="where to write the results JSON")
    parser.add_argument("--tracking-uri", default=None,
                        help="when given, log one MLflow run (params, metrics, the JSON as an artifact)")
    parser.add_argument("--experiment", default="editgrid-bench", help="MLflow experiment (with --tracking-uri)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


DEFAULTS = {"methods": ["memit", "alphaedit"], "num_edits": 10, "data": "builtin", "stats_corpus": "model-samples",
            "stats_tokens": 20_000, "stats_max_length": 256, "fresh_stats": False}


def _parse_hparams(items: list[str]) -> tuple[dict, list[str]]:
    """``--set NAME=VALUE`` items, each value read as YAML exactly as ``grid/launch.py --set`` reads it."""
    values, problems = {}, []
    for item in items:
        if "=" not in item or not item.partition("=")[0].strip():
            problems.append(f"--set expects NAME=VALUE, got {item!r}")
            continue
        name, value = parse_override(item)
        values[name] = value
    return values, problems


def write_reference_corpus(data_dir: Path, out: Path) -> Path:
    """DATA/general/*.jsonl → one line per sentence field (a string with a space, longer than 20 characters): the
    reference's statistics corpus."""
    files = sorted((data_dir / "general").glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"--reference-workload: no {data_dir / 'general'}/*.jsonl files")
    lines = []
    for path in files:
        # not splitlines: \u2028 occurs in the text
        for _, record in jsonl_objects(path.read_text(encoding="utf-8").split("\n"), path, sys.maxsize, ValueError):
            # Sentences, not labels: a category such as "high_school_macroeconomics" is long but has no space.
            lines += [" ".join(value.split()) for value in record.values()
                      if isinstance(value, str) and len(value) > REFERENCE_CORPUS_MIN_CHARS and " " in value.strip()]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def apply_reference_workload(args: argparse.Namespace, corpus_dir: Path) -> None:
    """Fill the options the user left unset with the reference setting (explicit options win)."""
    data_dir = Path(args.reference_workload).expanduser().resolve()
    edits = data_dir / "counterfact" / "counterfact-edit.json"
    if not edits.is_file():
        raise FileNotFoundError(f"--reference-workload: {edits} does not exist")
    for name, value in REFERENCE.items():
        if name == "hparams":
            args.hparam_values = {**value, **args.hparam_values}
        elif getattr(args, name) is None:
            setattr(args, name, value)
    if args.data is None:
        args.data = str(edits)
    if args.stats_corpus is None:
        args.stats_corpus = str(write_reference_corpus(data_dir, corpus_dir / "general_sentences.txt"))


def _check_args(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.num_edits < 1:
        problems.append(f"--num-edits must be >= 1, got {args.num_edits}")
    if args.repeats < 1:
        problems.append(f"--repeats must be >= 1, got {args.repeats}")
    if args.stats_tokens < 1000:
        problems.append(f"--stats-tokens must be >= 1000, got {args.stats_tokens}")
    if any(size < 1 for size in args.batch_sizes):
        problems.append(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    if args.stats_max_length < 1:
        problems.append(f"--stats-max-length must be >= 1, got {args.stats_max_length}")
    if args.eval_generations < 0:
        problems.append(f"--eval-generations must be >= 0, got {args.eval_generations}")
    unknown = [name for name in args.vstar_autocast if name not in AUTOCAST_DTYPES]
    if unknown:
        problems.append(f"--vstar-autocast: {unknown} not among {list(AUTOCAST_DTYPES)}")
    return problems


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    cpu = machine_identity()  # the CPU's model name: this project's VMs have run on AMD and Intel hosts
    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_model": cpu["cpu"], "cpu_capability": cpu["cpu_capability"],
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "git_commit": git_commit()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _summary(values: list[float]) -> dict:
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _statistics(args, editable, tokenizer, loaded, layers: list[int], cache_dir, device, progress: bool
                ) -> tuple[dict, dict]:
    """C per layer in one pass over the statistics corpus, and what to report about that pass. No layers (no
    locate-then-edit method in the run): nothing to compute."""
    if not layers:
        return {}, {"layers": [], "tokens": 0, "corpus": args.stats_corpus, "tokens_run": 0,
                    "forward_dtype": args.stats_forward_dtype or "weights", "from_cache": True, "computed_layers": [],
                    "fresh_cache": bool(args.fresh_stats), "from_cache_by_layer": {}, "seconds": 0.0,
                    "corpus_seconds": 0.0, "wall_seconds": 0.0, "tokens_per_s": None, "pass_tokens_per_s": None,
                    "peak_memory_mb": peak_memory_mb(device)}
    with tempfile.TemporaryDirectory(prefix="editgrid-bench-stats-") as fresh:
        stats_cache = Path(fresh) if args.fresh_stats else cache_dir
        reset_peak_memory(device)
        started = time.perf_counter()
        with warnings.catch_warnings():  # the reference workload asks for "every token" on purpose
            warnings.filterwarnings("ignore", message=".*the statistics average over those.*")
            stats = second_moments(editable, tokenizer, layers, parse_corpus(args.stats_corpus), args.stats_tokens,
                                   model_key=f"{loaded.model_id}@{loaded.fingerprint}", cache_dir=stats_cache,
                                   max_length=args.stats_max_length, progress=progress,
                                   forward_dtype=FORWARD_DTYPE_BY_NAME.get(args.stats_forward_dtype))
        stats_wall = time.perf_counter() - started
    from_cache = all(stats.from_cache.values())
    computed_layers = [layer for layer in layers if not stats.from_cache[layer]]
    return stats.moments, {
        "layers": layers, "tokens": stats.tokens, "corpus": args.stats_corpus,
        "tokens_run": stats.tokens_run,  # distinct documents' tokens: a repeated document runs once
        "forward_dtype": args.stats_forward_dtype or "weights",
        "from_cache": from_cache, "computed_layers": computed_layers, "fresh_cache": bool(args.fresh_stats),
        "from_cache_by_layer": {str(k): v for k, v in stats.from_cache.items()},
        "seconds": stats.seconds, "corpus_seconds": stats.corpus_seconds, "wall_seconds": stats_wall,
        "tokens_per_s": None if from_cache or stats.seconds <= 0 else stats.tokens / stats.seconds,
        # the forward pass alone (corpus reading / model sampling excluded)
        "pass_tokens_per_s": (None if from_cache or stats.seconds - stats.corpus_seconds <= 0
                              else stats.tokens / (stats.seconds - stats.corpus_seconds)),
        "peak_memory_mb": peak_memory_mb(device)}


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``args``; return the results dict (also what goes to the JSON)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    cache_dir = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else None

    started = time.perf_counter()
    loaded = load_model(args.model, cache_dir=cache_dir, linear_backend=args.linear_backend)
    load_seconds = time.perf_counter() - started
    editable = EditableModel.wrap(loaded.model)
    tokenizer = loaded.tokenizer
    device = editable.parameter_device()
    dtype = next(loaded.model.parameters()).dtype

    settings, layers_of = {}, {}
    for method in args.methods:
        spec = method_settings(method, args.hparam_values)
        if args.layers:  # a one-layer solver (ROME) edits the last layer of the given window
            window = sorted(args.layers)
            spec = method_settings(method, {**args.hparam_values,
                                            "layers": window[-spec.max_layers:] if spec.max_layers else window})
        settings[method] = spec
        layers_of[method] = resolve_layers(editable, spec, f"--methods {method}")
    all_layers = sorted({layer for layers in layers_of.values() for layer in layers})
    # C is only read by the locate-then-edit solvers (the other editor kinds need no statistics).
    stats_layers = sorted({layer for method, layers in layers_of.items() if settings[method].kind is None
                           for layer in layers})

    records = load_records(args.data, limit=args.num_edits, offset=args.offset)
    if len(records) < args.num_edits:
        raise ValueError(f"{args.data} has {len(records)} usable records after offset {args.offset}, "
                         f"fewer than --num-edits {args.num_edits}")
    requests = [to_request(record) for record in records]

    moments_of, stats_info = _statistics(args, editable, tokenizer, loaded, stats_layers, cache_dir, device, progress)

    started = time.perf_counter()
    context_groups = generate_context_templates(loaded.model, tokenizer, seed=args.seed)
    context_seconds = time.perf_counter() - started

    originals = {layer: editable.weight(layer).detach().clone() for layer in all_layers}

    def restore() -> None:
        with torch.no_grad():
            for layer, weight in originals.items():
                editable.weight(layer).copy_(weight)

    num_pairs = count_scored_pairs(records)
    # a target-scaling method (NAS) measures its anchor on the unedited model from the benchmark's own records
    reference = {"reference_requests": requests, "model_key": f"{loaded.model_id}@{loaded.fingerprint}",
                 "cache_dir": cache_dir}
    cells = []
    for method in args.methods:
        layers = layers_of[method]
        moments = {layer: moments_of[layer].to(device) for layer in layers if layer in moments_of}
        for autocast in args.vstar_autocast:
            spec = settings[method]
            if autocast != "none":
                spec = method_settings(method, {**spec.hparams, "v_autocast": autocast})
            for batch_size in args.batch_sizes:
                cells.append(_run_cell(args, method, spec, autocast, batch_size, layers, moments, editable, tokenizer,
                                       loaded.model, context_groups, requests, records, num_pairs, restore, device,
                                       progress, reference))
    for cell in cells:  # how much cheaper per edit than batch 1 of the same method and precision
        first = next((other for other in cells if other["method"] == cell["method"] and other["batch_size"] == 1
                      and other["vstar_autocast"] == cell["vstar_autocast"]), None)
        cell["seconds_per_edit_vs_batch_1"] = (cell["seconds_per_edit"]["median"] /
                                               first["seconds_per_edit"]["median"] if first else None)
        # ... and than the first method listed, at the same batch size and precision (paired in this run)
        baseline = next(other for other in cells if other["method"] == args.methods[0]
                        and other["batch_size"] == cell["batch_size"]
                        and other["vstar_autocast"] == cell["vstar_autocast"])
        cell["seconds_per_edit_vs_first_method"] = (cell["seconds_per_edit"]["median"] /
                                                    baseline["seconds_per_edit"]["median"])

    return {"benchmark": "bench_editing", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": list(getattr(args, "argv", [])),
            "config": {"model": args.model, "model_id": loaded.model_id, "fingerprint": loaded.fingerprint,
                       "methods": args.methods, "batch_sizes": args.batch_sizes, "num_edits": args.num_edits,
                       "vstar_autocast": args.vstar_autocast,
                       "data": args.data, "offset": args.offset, "stats_corpus": args.stats_corpus,
                       "stats_tokens": args.stats_tokens, "stats_max_length": args.stats_max_length,
                       "fresh_stats": bool(args.fresh_stats), "hparams": args.hparam_values,
                       "reference_workload": args.reference_workload, "eval_generations": args.eval_generations,
                       "repeats": args.repeats, "layers": args.layers, "eval_batch_size": args.eval_batch_size,
                       "seed": args.seed, "cache_dir": str(cache_dir) if cache_dir else None,
                       "linear_backend": loaded.linear_backend, "linear_plan": loaded.linear_plan},
            "machine": machine_info(device, dtype),
            "model_load_seconds": load_seconds, "context_templates_seconds": context_seconds,
            "stats": stats_info, "cells": cells}


def _run_cell(args, method: str, spec, autocast: str, batch_size: int, layers: list[int], moments: dict, editable,
              tokenizer, model, context_groups, requests, records, num_pairs: int, restore, device,
              progress: bool, reference: dict) -> dict:
    """One method × v* precision × batch size cell, ``args.repeats`` times from the unedited weights."""
    runs = []
    for repeat in range(args.repeats):
        restore()
        torch.manual_seed(args.seed)
        reset_peak_memory(device)
        editor = assemble_method(spec, editable, tokenizer, layers, moments, seed=args.seed,
                                 context_groups=context_groups, **(reference if spec.target_scaling else {})).editor
        total = target = solve = 0.0
        probs: list[float] = []
        request_steps: list[int] = []
        chunks: list[int] = []
        fed_tokens = 0
        batch_seconds: list[float] = []  # per edit, batch by batch
        for start, end in batches(len(requests), batch_size):
            if progress:
                print(f"[{method} v*={autocast} b={batch_size} r={repeat + 1}/{args.repeats}] "
                      f"edits {start + 1}–{end}", file=sys.stderr, flush=True)
            report = editor.apply(requests[start:end])
            total += report.seconds
            batch_seconds.append(report.seconds / (end - start))
            target += report.target_seconds
            solve += report.solve_seconds
            probs.extend(report.target_prob)
            request_steps.extend(report.target_request_steps)
            chunks.append(report.target_chunks)
            fed_tokens += report.target_fed_tokens
            if any(not torch.isfinite(editable.weight(layer)).all() for layer in layers):
                raise RuntimeError(f"{method} b={batch_size}: edited weights became NaN/Inf")
        edit_peak = peak_memory_mb(device)  # editing only (v* and solves), before any evaluation
        eval_started = time.perf_counter()
        evaluation = evaluate_records(model, tokenizer, records, batch_size=args.eval_batch_size)
        eval_seconds = time.perf_counter() - eval_started
        generation = _generation_throughput(model, tokenizer, records, args.eval_generations, args.eval_batch_size)
        editor.remove()  # a memory editor unwraps the model before the next cell
        n = len(requests)
        runs.append({"seconds_per_edit": total / n, "batch_seconds_per_edit": batch_seconds,
                     "target_seconds_per_edit": target / n,
                     "solve_seconds_per_edit": solve / n, "vstar_target_prob": sum(probs) / len(probs) if probs else None,
                     "vstar_target_prob_min": min(probs) if probs else None,
                     "vstar_steps_per_request": (sum(request_steps) / len(request_steps)) if request_steps else None,
                     "vstar_chunks_per_batch": max(chunks) if chunks else None,
                     # token slots run through the blocks above the site per edit: v*'s work, whatever the CPU
                     "vstar_fed_tokens_per_edit": fed_tokens / n,
                     "efficacy": evaluation.metrics.get("edit/efficacy"), "eval_seconds": eval_seconds,
                     "eval_pairs_per_s": num_pairs / eval_seconds if eval_seconds > 0 else None,
                     "eval_to_edit_ratio": eval_seconds / total if total > 0 else None,
                     **generation,
                     "edit_peak_memory_mb": edit_peak, "peak_memory_mb": peak_memory_mb(device),
                     "metrics": {k: v for k, v in evaluation.metrics.items() if k.startswith("edit/")}})
    restore()
    keys = ["seconds_per_edit", "target_seconds_per_edit", "solve_seconds_per_edit", "vstar_target_prob",
            "vstar_steps_per_request", "vstar_fed_tokens_per_edit", "efficacy", "eval_seconds", "eval_pairs_per_s",
            "eval_to_edit_ratio",
            "generations_per_s", "judgments_per_s", "edit_peak_memory_mb", "peak_memory_mb"]
    every_batch = [value for run in runs for value in run["batch_seconds_per_edit"]]
    return {"method": method, "solver": spec.solver, "vstar_autocast": autocast, "batch_size": batch_size,
            "edits": len(requests), "batch_seconds_per_edit": _summary(every_batch),
            "layers": layers, "repeats": args.repeats, "eval_pairs": num_pairs,
            **{key: _summary([run[key] for run in runs if run[key] is not None]) for key in keys},
            "runs": runs}


def _generation_throughput(model, tokenizer, records, count: int, batch_size: int) -> dict:
    """Greedy answers to the first ``count`` evaluation prompts, then the same model judging them (no cache)."""
    if count == 0:
        return {"generations_per_s": None, "judgments_per_s": None}
    queries = answer_queries(records)[:count]
    started = time.perf_counter()
    answers = generate_answers(model, tokenizer, [q.prompt for q in queries], GenerationSettings(),
                               batch_size=batch_size)
    generation_seconds = time.perf_counter() - started
    judge = Judge(TransformersJudge(model, tokenizer, name="bench-self-judge"), cache=None)
    judge.grade([JudgeItem(q.prompt, q.answers[0], a) for q, a in zip(queries, answers)])
    return {"generations_per_s": len(queries) / generation_seconds if generation_seconds > 0 else None,
            "judgments_per_s": judge.stats.judgments_per_second}


def table_rows(results: dict) -> list[dict]:
    rows = []
    for cell in results["cells"]:
        rows.append({"method": cell["method"], "v* autocast": cell.get("vstar_autocast", "none"),
                     "batch": cell["batch_size"], "edits": cell["edits"],
                     "s/edit": cell["seconds_per_edit"]["median"],
                     "÷ batch 1": cell.get("seconds_per_edit_vs_batch_1"),
                     "÷ 1st method": cell.get("seconds_per_edit_vs_first_method"),
                     "batch median": cell["batch_seconds_per_edit"]["median"],
                     "batch min": cell["batch_seconds_per_edit"]["min"],
                     "batch max": cell["batch_seconds_per_edit"]["max"],
                     "v* s/edit": cell["target_seconds_per_edit"]["median"],
                     "solve s/edit": cell["solve_seconds_per_edit"]["median"],
                     "v* steps": cell.get("vstar_steps_per_request", {}).get("median"),
                     "v* tokens/edit": cell.get("vstar_fed_tokens_per_edit", {}).get("median"),
                     "v* p": cell["vstar_target_prob"]["median"],
                     "efficacy": cell.get("efficacy", {}).get("median"),
                     "eval pairs/s": cell["eval_pairs_per_s"].get("median"),
                     "eval/edit": cell["eval_to_edit_ratio"].get("median"),
                     "gen/s": cell["generations_per_s"].get("median"),
                     "judge/s": cell["judgments_per_s"].get("median"),
                     "edit peak MB": cell.get("edit_peak_memory_mb", {}).get("median"),
                     "peak MB": cell["peak_memory_mb"]["median"]})
    return rows


def format_results(results: dict) -> str:
    stats, machine = results["stats"], results["machine"]
    rate = "rate n/a"
    if stats["tokens_per_s"]:
        rate = (f"{stats['tokens_per_s']:.0f} tokens/s, {stats['pass_tokens_per_s'] or 0:.0f} tokens/s without "
                f"the {stats['corpus_seconds']:.1f} s of corpus reading/sampling")
    computed = stats.get("computed_layers", [])
    if stats["from_cache"]:
        source = "from the cache"
    elif len(computed) < len(stats["layers"]):
        source = f"computed for layers {computed} in one pass, the others from the cache"
    else:
        source = "computed in a fresh cache" if stats["fresh_cache"] else "computed"
    if stats.get("tokens_run") and stats["tokens_run"] < stats["tokens"]:
        source += f", {stats['tokens_run']} of them run: repeated documents run once"
    plan = f": {results['config']['linear_plan']}" if results["config"].get("linear_plan") else ""
    head = (f"{results['config']['model']} on {machine['device']} ({machine['dtype']}, {machine['cpu_count']} CPUs, "
            f"{machine['torch_threads']} torch threads, linear products on "
            f"{results['config'].get('linear_backend', 'aten')}{plan}), {results['config']['num_edits']} edits of "
            f"{results['config']['data']}, repeats={results['config']['repeats']}\n"
            f"statistics: {stats['tokens']} tokens, layers {stats['layers']}, {stats['seconds']:.1f} s ({source}, "
            f"{rate}; forward pass in {stats.get('forward_dtype', 'weights')} precision)")
    return head + "\n" + format_summary_table(table_rows(results), TABLE_COLUMNS)


def _log_to_mlflow(results: dict, tracking_uri: str, experiment: str) -> str:
    config = results["config"]
    params = {**config, "machine": results["machine"]}
    metrics = {"stats/seconds": results["stats"]["seconds"], "stats/tokens": results["stats"]["tokens"],
               "stats/from_cache": float(results["stats"]["from_cache"])}
    if results["stats"]["tokens_per_s"]:
        metrics["stats/tokens_per_s"] = results["stats"]["tokens_per_s"]
    for cell in results["cells"]:
        precision = "" if cell.get("vstar_autocast", "none") == "none" else f"/{cell['vstar_autocast']}"
        prefix = f"{cell['method']}{precision}/b{cell['batch_size']}"
        for key in ("seconds_per_edit", "target_seconds_per_edit", "solve_seconds_per_edit", "vstar_target_prob",
                    "eval_pairs_per_s", "peak_memory_mb"):
            if cell[key].get("values"):
                metrics[f"{prefix}/{key}"] = cell[key]["median"]
    tags = {"editgrid.benchmark": "bench_editing", "editgrid.model": str(config["model"])}
    with TrialTracker(resolve_tracking_uri(tracking_uri), experiment, f"bench-{Path(str(config['model'])).name}",
                      params=params, tags=tags) as tracker:
        tracker.log_metrics(metrics, step=0)
        tracker.log_dict(results, "bench/bench_editing.json")
        return tracker.run_id


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.hparam_values, problems = _parse_hparams(args.hparams)
    with tempfile.TemporaryDirectory(prefix="editgrid-bench-corpus-") as corpus_dir:
        if args.reference_workload:
            try:
                apply_reference_workload(args, Path(corpus_dir))
            except (OSError, ValueError) as error:
                parser.error(str(error))
        for name, value in DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        problems += _check_args(args)
        if problems:
            parser.error("; ".join(problems))
        args.argv = argv
        results = run_benchmark(args)
    out = Path(args.json_out)
    if args.tracking_uri:
        results["mlflow_run_id"] = _log_to_mlflow(results, args.tracking_uri, args.experiment)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(format_results(results))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
