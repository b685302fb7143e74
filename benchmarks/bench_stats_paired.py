"""The statistics pass against another version of methods/stats.py: a paired comparison.

This machine's speed drifts by 10–20 % over minutes, so two statistics passes timed at different times cannot
show a 10 % gain. Here the current ``methods.stats`` and another version of that file (for example one taken from
an earlier commit with ``git show <commit>:methods/stats.py > /tmp/stats_old.py``) compute the same statistics,
fresh, alternating in one process on one loaded model (the order flips every round), and their C are compared.

    git show 8eafcb6:methods/stats.py > /tmp/stats_8eafcb6.py
    .venv/bin/python benchmarks/bench_stats_paired.py --against /tmp/stats_8eafcb6.py --data <data>

``<data>``: a folder of the data sets laid out like the project's shared data folder (``counterfact/``,
``general/``, …).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import methods.stats as current_stats  # noqa: E402
from benchmarks.bench_editing import git_commit, write_reference_corpus  # noqa: E402
from methods.infra.arch import EditableModel  # noqa: E402
from methods.corpus import parse_corpus  # noqa: E402
from methods.infra.models import load_model  # noqa: E402


def load_stats_module(path: Path):
    """``path`` imported as a module of its own (it may import the rest of the project as usual)."""
    spec = importlib.util.spec_from_file_location(f"stats_against_{abs(hash(str(path)))}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--against {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    if not hasattr(module, "second_moments"):
        raise ValueError(f"--against {path}: defines no second_moments; give a version of methods/stats.py")
    return module


def paired_passes(editable, tokenizer, versions: dict, corpus: str, layers: list[int], num_tokens: int,
                  max_length: int, rounds: int) -> dict:
    seconds: dict[str, list[float]] = {name: [] for name in versions}
    moments, tokens = {}, {}
    for round_index in range(rounds):
        order = list(versions) if round_index % 2 == 0 else list(versions)[::-1]
        for name in order:
            with tempfile.TemporaryDirectory(prefix="editgrid-stats-paired-") as fresh, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*the statistics average over those.*")
                result = versions[name].second_moments(editable, tokenizer, layers, parse_corpus(corpus), num_tokens,
                                                       model_key="paired", cache_dir=Path(fresh),
                                                       max_length=max_length, progress=False)
            seconds[name].append(result.seconds)
            moments[name], tokens[name] = result.moments, result.tokens
            print(f"  round {round_index + 1}: {name} {result.seconds:.1f} s", flush=True)
    first, second = versions
    ratios = [b / a for a, b in zip(seconds[first], seconds[second])]
    differences = {layer: float((moments[second][layer].double() - moments[first][layer].double()).norm()
                                / moments[first][layer].double().norm()) for layer in layers}
    return {"seconds": seconds, "median_s": {name: statistics.median(s) for name, s in seconds.items()},
            "ratio_per_round": ratios, "ratio_median": statistics.median(ratios), "tokens": tokens,
            "moment_relative_difference": differences}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, type=Path, help="another version of methods/stats.py")
    parser.add_argument("--model", default="smollm2-135m")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="the shared data folder: the reference workload's corpus")
    source.add_argument("--corpus", help="a statistics corpus (as stats.corpus)")
    parser.add_argument("--layers", default="4,5,6,7,8")
    parser.add_argument("--tokens", type=int, default=10**7, help="tokens averaged into C (default: every token)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4, help="passes of each version, alternating")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if not args.against.is_file():
        print(f"bench_stats_paired: --against {args.against}: no such file", file=sys.stderr)
        return 2
    try:
        against = load_stats_module(args.against)
    except (ValueError, ImportError, SyntaxError) as err:
        print(f"bench_stats_paired: {err}", file=sys.stderr)
        return 2
    loaded = load_model(args.model, device="cpu")
    editable = EditableModel.wrap(loaded.model)
    layers = [int(v) for v in args.layers.split(",")]
    with tempfile.TemporaryDirectory(prefix="editgrid-stats-corpus-") as folder:
        corpus = args.corpus or str(write_reference_corpus(args.data, Path(folder) / "general_sentences.txt"))
        print(f"{args.model}, {torch.get_num_threads()} torch threads, layers {layers}; 'current' is this checkout "
              f"({git_commit()}), 'against' is {args.against}")
        results = paired_passes(editable, loaded.tokenizer, {"against": against, "current": current_stats}, corpus,
                                layers, args.tokens, args.max_length, args.rounds)
    for name, values in results["seconds"].items():
        print(f"  {name:>8}: median {results['median_s'][name]:.1f} s (min {min(values):.1f}, max {max(values):.1f})"
              f", {results['tokens'][name]} tokens")
    ratios = results["ratio_per_round"]
    print(f"  current / against per round: median {results['ratio_median']:.3f} (min {min(ratios):.3f}, max "
          f"{max(ratios):.3f}); C differs by at most {max(results['moment_relative_difference'].values()):.1e} "
          f"(relative Frobenius)")
    if args.json_out:
        config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        Path(args.json_out).write_text(json.dumps({"config": config, "git_commit": git_commit(), **results},
                                                  indent=2))
        print(f"results written to {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
