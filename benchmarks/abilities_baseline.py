"""The unedited model's general abilities (evals/abilities.py) beside SmolLM2-135M's published figures.

Scores the likelihood tasks of an abilities folder (laid out like the shared data's ``abilities/``) on a model as loaded
by EditGrid (the embedded SmolLM2-135M-Instruct by default: a Q4_1 GGUF dequantised to fp32), prints a table of acc
and acc_norm beside the published figures, and writes the results with the machine, versions and commit to JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/abilities_baseline.py --data <data>/abilities \\
        --n-items 500 --wikitext-chars 0 --threads 1

``<data>``: a folder of the data sets laid out like the project's shared data folder (``counterfact/``,
``general/``, …).

The published figures (``PUBLISHED``) are from the SmolLM2-135M-Instruct model card's "Evaluation" section
(huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct; read here in the copy of that card at remyolson/llm-lab
``models/small-llms/smollm-135m/README.md`` @ 0d44ab1f): zero-shot, run with lighteval, one table for the base
model (SmolLM2-135M-8k) and one for the instruct model. They are not lm-evaluation-harness numbers and were not
computed on these subsets; docs/abilities.md discusses the differences.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evals.abilities import (ACC, ACC_NORM, CHOICE_TASKS, DEFAULT_TASKS, TASK_NAMES, evaluate_abilities,  # noqa: E402
                             load_abilities, metric_name)
from methods.infra.models import load_model  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "abilities_baseline_smollm2.json"
CARD = ("SmolLM2-135M-Instruct model card, Evaluation (lighteval, 0-shot); copy at remyolson/llm-lab "
        "models/small-llms/smollm-135m/README.md @ 0d44ab1f")
# row label -> (tasks averaged, metric compared, base SmolLM2-135M-8k, SmolLM2-135M-Instruct); None = not published
PUBLISHED = {
    "HellaSwag": (("hellaswag",), ACC_NORM, 42.1, 40.9),
    "ARC (avg of easy, challenge)": (("arc_easy", "arc_challenge"), ACC_NORM, 43.9, 37.3),
    "PIQA": (("piqa",), ACC_NORM, 68.4, 66.3),
    "OpenBookQA": (("openbookqa",), ACC_NORM, 34.6, None),
    "WinoGrande": (("winogrande",), ACC, 51.3, None),
}


def _comma_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in TASK_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(TASK_NAMES)}; unknown: {unknown}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the abilities folder (e.g. <data>/abilities)")
    parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder or embedded name")
    parser.add_argument("--tasks", type=_comma_list, default=[*DEFAULT_TASKS, "winogrande"],
                        help="comma list (default: the trial defaults and winogrande)")
    parser.add_argument("--n-items", type=int, default=200, help="first N items of every task")
    parser.add_argument("--wikitext-chars", type=int, default=20_000, help="characters of WikiText (0 = all)")
    parser.add_argument("--max-length", type=int, default=1024, help="WikiText window in tokens")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--cache-dir", default=None, help="EditGrid cache folder (default the normal cache)")
    parser.add_argument("--json-out", default=str(DEFAULT_JSON))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def comparison_rows(metrics: dict[str, float]) -> list[dict]:
    """One row per published figure whose tasks were all measured: ours (percent) beside the card's."""
    rows = []
    for label, (tasks, kind, base, instruct) in PUBLISHED.items():
        names = [metric_name(t, kind) for t in tasks]
        if all(name in metrics for name in names):
            ours = 100 * sum(metrics[name] for name in names) / len(names)
            rows.append({"benchmark": label, "metric": kind, "ours": ours, "published_base": base,
                         "published_instruct": instruct,
                         "gap_to_instruct": None if instruct is None else ours - instruct})
    return rows


def format_tables(metrics: dict[str, float], items: dict[str, int], comparison: list[dict]) -> str:
    lines = ["| task | items | acc | acc_norm |", "|---|---:|---:|---:|"]
    for task in CHOICE_TASKS:
        if metric_name(task, ACC) in metrics:
            norm = metrics.get(metric_name(task, ACC_NORM))
            lines.append(f"| {task} | {items[task]} | {100 * metrics[metric_name(task, ACC)]:.1f} | "
                         f"{'—' if norm is None else f'{100 * norm:.1f}'} |")
    if metric_name("lambada", ACC) in metrics:
        lines.append(f"| lambada (last word, greedy) | {items['lambada']} | "
                     f"{100 * metrics[metric_name('lambada', ACC)]:.1f} | — |")
    lines += ["", "| benchmark | metric | ours | published base | published instruct |", "|---|---|---:|---:|---:|"]
    for row in comparison:
        instruct = "—" if row["published_instruct"] is None else f"{row['published_instruct']:.1f}"
        lines.append(f"| {row['benchmark']} | {row['metric']} | {row['ours']:.1f} | {row['published_base']:.1f} | "
                     f"{instruct} |")
    other = {k: v for k, v in metrics.items() if k.startswith(("abilities/lambada/perplexity", "abilities/wikitext2"))}
    if other:
        lines += [""] + [f"{name}: {value:.3f}" for name, value in other.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model(args.model, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    load_seconds = time.perf_counter() - started
    wikitext_chars = args.wikitext_chars or sys.maxsize
    data = load_abilities(args.data, args.tasks, args.n_items, wikitext_chars)
    started = time.perf_counter()
    result = evaluate_abilities(loaded.model, loaded.tokenizer, data, batch_size=args.batch_size,
                                max_length=args.max_length, progress=not args.quiet)
    seconds = time.perf_counter() - started
    items = {task: len(task_items) for task, task_items in data.items.items()}
    comparison = comparison_rows(result.metrics)
    print(format_tables(result.metrics, items, comparison))
    print(f"\n{seconds:.0f} s to evaluate ({torch.get_num_threads()} threads); published: {CARD}")
    import transformers

    report = {
        "what": "evals/abilities.py on the unedited model beside the published SmolLM2-135M figures",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "model_fingerprint": loaded.fingerprint,
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "settings": {"tasks": args.tasks, "n_items": args.n_items, "wikitext_chars": args.wikitext_chars,
                     "wikitext_chars_scored": len(data.wikitext or ""), "max_length": args.max_length,
                     "batch_size": args.batch_size},
        "items": items, "file_sha256": data.file_hashes,
        "metrics": result.metrics, "comparison": comparison, "published_source": CARD,
        "seconds": {"load": load_seconds, "evaluate": seconds},
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "git_commit": git_commit()},
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
