"""The table and curves of a study that ran as several grids (or in several MLflow stores): every trial run of the
named experiments, at the steps asked for.

    python benchmarks/study_report.py --store sqlite:///runs_a.db --store sqlite:///runs_b.db \\
        --experiment editgrid-lifelong-1k --steps 0,100,500,1000 --out docs/figures/lifelong_1k

writes ``<out>.md`` (a Markdown table: one row per trial and step; rates with their 95 % interval where the trial
logged one) and ``<out>_curves.png`` (one panel per metric, one line per trial against edits), and prints the
table. Runs of the same trial name in several stores are all shown (their store is in the row). The grid report
(``python grid/launch.py --report <grid id>``) does the same for one grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evals.metric_names import (COST_SECONDS_PER_EDIT, EFFICACY, GENERALIZATION, SPECIFICITY,  # noqa: E402
                                abilities_metric, retention_metric)
from evals.retention import CI_HIGH_SUFFIX, CI_LOW_SUFFIX  # noqa: E402
from grid.report import plot_rows, trial_rows  # noqa: E402
from grid.tracking import _mlflow_client  # noqa: E402

TABLE_METRICS = (EFFICACY, GENERALIZATION, SPECIFICITY, retention_metric("age_1_of_4", "efficacy"),
                 abilities_metric("hellaswag", "acc_norm"), abilities_metric("lambada", "acc"),
                 abilities_metric("wikitext2", "token_perplexity"), COST_SECONDS_PER_EDIT)
CURVE_METRICS = (EFFICACY, GENERALIZATION, SPECIFICITY, retention_metric("age_1_of_4", "efficacy"),
                 abilities_metric("lambada", "acc"), abilities_metric("wikitext2", "token_perplexity"))


def study_rows(stores: list[str], experiments: list[str], include_failed: bool = False) -> list[dict]:
    rows = []
    for store in stores:
        client = _mlflow_client(store)
        ids = [e.experiment_id for name in experiments if (e := client.get_experiment_by_name(name)) is not None]
        if not ids:
            continue
        runs = [r for r in client.search_runs(ids, max_results=10_000) if r.data.tags.get("editgrid.role") == "trial"
                and (include_failed or r.info.status != "FAILED")]
        runs.sort(key=lambda r: (r.data.tags.get("editgrid.method", ""), r.info.start_time))
        for row in trial_rows(store, runs):
            rows.append({**row, "store": store})
    return rows


def _cell(row: dict, metric: str) -> str:
    value = row.get(metric)
    if not isinstance(value, (int, float)):
        return "–"
    low, high = row.get(metric + CI_LOW_SUFFIX), row.get(metric + CI_HIGH_SUFFIX)
    digits = 1 if "perplexity" in metric else 3
    text = f"{value:.{digits}f}"
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def markdown_table(rows: list[dict], steps: list[int] | None, metrics=TABLE_METRICS) -> str:
    shown = [r for r in rows if r.get("edits") is not None and (steps is None or r["edits"] in steps)]
    header = ["trial", "status", "edits", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in shown:
        lines.append("| " + " | ".join([str(row["trial"]), str(row["status"]), str(row["edits"]),
                                         *(_cell(row, m) for m in metrics)]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", action="append", required=True, help="an MLflow tracking URI (repeatable)")
    parser.add_argument("--experiment", action="append", required=True, help="an experiment name (repeatable)")
    parser.add_argument("--steps", help="comma-separated steps for the table (default: every evaluation)")
    parser.add_argument("--out", help="write <out>.md and <out>_curves.png")
    parser.add_argument("--include-failed", action="store_true", help="also show FAILED trial runs (left out by "
                        "default: a resubmitted trial's successful attempt is the one to read)")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    rows = study_rows(args.store, args.experiment, args.include_failed)
    if not rows:
        print(f"no trial runs of {args.experiment} in {args.store}", file=sys.stderr)
        return 1
    table = markdown_table(rows, steps)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table + "\n")
        figure = plot_rows(rows, CURVE_METRICS, f"{', '.join(args.experiment)}: metrics against edits")
        if figure is not None:
            figure.savefig(out.parent / f"{out.name}_curves.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
