"""The grid's comparison report, built from MLflow alone (so ``--report <grid id>`` regenerates it any time).

One row per (trial, checkpoint): the trial's method, its grid-axis values, its status, ``edits`` (the step) and
every evaluation metric logged at that step (``edit/*``, ``scr/*``, ``cost/*``; per-matrix ``diag/L<i>/<name>`` and
``diag/L<i>.<path>/<name>`` averaged over the edited matrices as ``diag/mean/<name>``). Logged to the parent run as ``report/comparison.csv``
and the MLflow table ``report/comparison.json``, with ``report/metrics_vs_edits.png`` (each edit metric against
edits, one line per trial, its 95 % interval as a band), ``report/diagnostics_vs_edits.png`` (the layer-averaged
diagnostics), ``report/retention_vs_edits.png`` (the oldest quarter of the edits beside the newest batch) and
``report/abilities_vs_edits.png`` (general abilities, when the trials evaluated them).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections import defaultdict
from pathlib import Path

from evals.abilities import metric_name
from evals.metric_names import (DIAG_PREFIX, EDIT_SCORE, EFFICACY, GENERALIZATION, LOCALITY, PORTABILITY,
                                RETENTION_PREFIX, SCR_PREFIX, SPECIFICITY, EDIT_PREFIX, diag_metric, gen_metric,
                                judge_metric, report_prefixes, retention_metric, scr_metric)
from evals.retention import CI_HIGH_SUFFIX, CI_LOW_SUFFIX, NEWEST_BATCH, age_stratum
from grid.gridrun import GRID_ID_TAG, ROLE_TAG, child_runs
from grid.tracking import _mlflow_client, _rows_to_csv

EVAL_MARKER = EFFICACY  # logged at every evaluation (step 0 and each checkpoint)
ROW_PREFIXES = report_prefixes()  # the families evals/metric_names.py marks for the report
PLOTTED_EDIT_METRICS = (EFFICACY, GENERALIZATION, SPECIFICITY, EDIT_SCORE, LOCALITY, PORTABILITY,
                        scr_metric("recall_at_k/generalization"), scr_metric("locality_rejection_rate"))
PLOTTED_GENERATION = (*(judge_metric(d) for d in ("reliability", "generalization", "portability", "locality")),
                      gen_metric("locality_unchanged"), gen_metric("contains"), gen_metric("fluency"))
PLOTTED_DIAGNOSTICS = tuple(diag_metric("mean", name) for name in ("drift", "weight_change", "sigma_max_delta", "cond"))
# The oldest quarter of the edits against the newest batch (evals/retention.py with its default 4 age bins).
PLOTTED_RETENTION = tuple(retention_metric(stratum, rate) for rate in ("efficacy", "generalization")
                          for stratum in (age_stratum(0, 4), NEWEST_BATCH))
PLOTTED_ABILITIES = (*(metric_name(task, "acc_norm") for task in ("arc_easy", "arc_challenge", "piqa", "hellaswag",
                                                                  "openbookqa")),
                     metric_name("lambada", "acc"), metric_name("wikitext2", "token_perplexity"))
# diag/L<i>/<name> of an output projection, diag/L<i>.<path>/<name> of another matrix (UltraEdit's ultra_targets)
_LAYER_METRIC = re.compile(rf"^{DIAG_PREFIX}L\d+(?:\.[^/]+)?/(?P<name>.+)$")


class ReportError(LookupError):
    pass


def find_grid_run(client, grid_id: str):
    """The parent run whose grid id is ``grid_id`` (in any experiment of the store)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{GRID_ID_TAG}` = '{grid_id}' and "
                                                         f"tags.`{ROLE_TAG}` = 'grid'") if experiments else []
    if not runs:
        raise ReportError(f"no grid with id {grid_id!r} in this MLflow store (the id is printed when a grid starts "
                          "and is the editgrid.grid_id tag of its parent run)")
    return runs[0]


def _history_by_step(client, run_id: str, name: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, name)}


def comparison_rows(tracking_uri: str, parent_run) -> list[dict]:
    children = child_runs(tracking_uri, parent_run.info.experiment_id, parent_run.info.run_id)
    return trial_rows(tracking_uri, sorted(children, key=lambda r: int(r.data.tags.get("editgrid.trial_index", 0))))


def trial_rows(tracking_uri: str, runs) -> list[dict]:
    """One row per trial run × evaluation step: identity, axes, status, the report families' metrics and the
    layer-averaged diag/mean/*."""
    client = _mlflow_client(tracking_uri)
    rows = []
    for run in runs:
        histories = {name: _history_by_step(client, run.info.run_id, name) for name in run.data.metrics
                     if name.startswith(ROW_PREFIXES) or _LAYER_METRIC.match(name)}
        steps = sorted(histories.get(EVAL_MARKER, {}))
        per_step: dict[int, dict[str, float]] = defaultdict(dict)
        layer_values: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for name, history in histories.items():
            for step, value in history.items():
                if step not in steps:
                    continue  # per-batch stage diagnostics are in the child run, not the checkpoint table
                layer = _LAYER_METRIC.match(name)
                if layer:
                    layer_values[step][layer.group("name")].append(value)
                else:
                    per_step[step][name] = value
        axes = json.loads(run.data.tags.get("editgrid.axes", "{}"))
        identity = {"trial": run.info.run_name, "method": run.data.tags.get("editgrid.method"),
                    **{f"axis:{k}": v for k, v in axes.items() if k != "method"},
                    "status": run.info.status, "trial_id": run.data.tags.get("editgrid.trial_id"),
                    "run_id": run.info.run_id}
        if run.data.tags.get("editgrid.stopped_early"):  # the collapse stopper ended it (grid/collapse.py)
            identity["stopped_early"] = run.data.tags["editgrid.stopped_early"]
        if not steps:
            rows.append({**identity, "edits": None, "failure_reason": run.data.tags.get("failure_reason")})
        for step in steps:
            diag = {diag_metric("mean", name): sum(values) / len(values) for name, values in layer_values[step].items()}
            rows.append({**identity, "edits": step, **dict(sorted(per_step[step].items())), **diag})
    return rows


def plot_rows(rows: list[dict], metrics: tuple[str, ...], title: str):
    """One panel per metric, one line per trial against edits (95 % bands where logged); None if no metric is there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in metrics if any(isinstance(r.get(m), (int, float)) and not math.isnan(r[m]) for r in rows)]
    if not present:
        return None
    columns = min(3, len(present))
    lines = (len(present) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.6 * lines), squeeze=False)
    by_trial: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("edits") is not None:
            by_trial[row["trial"]].append(row)
    for axis, metric in zip(axes.flat, present):
        for trial, trial_rows in by_trial.items():
            points = sorted((r["edits"], r[metric]) for r in trial_rows if isinstance(r.get(metric), (int, float)))
            if points:
                (line,) = axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=trial)
                band = sorted((r["edits"], r[metric + CI_LOW_SUFFIX], r[metric + CI_HIGH_SUFFIX]) for r in trial_rows
                              if isinstance(r.get(metric + CI_LOW_SUFFIX), (int, float))
                              and isinstance(r.get(metric + CI_HIGH_SUFFIX), (int, float)))
                if band:  # the 95 % interval logged with the rate (evals/retention.py)
                    axis.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                                      color=line.get_color(), alpha=0.15, linewidth=0)
        values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float))]
        if metric.startswith((EDIT_PREFIX, SCR_PREFIX, RETENTION_PREFIX)) and values and 0 <= min(values) and max(values) <= 1:
            axis.set_ylim(-0.03, 1.03)  # rates: the same scale in every panel and every report
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_title(metric)
        axis.set_xlabel("edits applied")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(present):]:
        axis.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8,
                  bbox_to_anchor=(0.5, 0.0))
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(labels) / 3), 1, 0.97))
    return figure


def write_report(tracking_uri: str, grid_id: str, out_dir: str | Path | None = None
                 ) -> tuple[list[dict], dict[str, Path]]:
    """Build the report of grid ``grid_id``, log it to the grid's parent run, and also keep it in ``out_dir``;
    returns the rows and the files written."""
    client = _mlflow_client(tracking_uri)
    parent = find_grid_run(client, grid_id)
    rows = comparison_rows(tracking_uri, parent)
    folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix=f"editgrid-report-{grid_id}-"))
    folder.mkdir(parents=True, exist_ok=True)
    written = {"csv": folder / "comparison.csv"}
    written["csv"].write_text(_rows_to_csv(rows))
    client.log_artifact(parent.info.run_id, str(written["csv"]), "report")
    if rows:
        import pandas as pd
        table = pd.DataFrame.from_records(rows)
        if "report/comparison.json" in [f.path for f in client.list_artifacts(parent.info.run_id, "report")]:
            # log_table would append to the existing table; a regenerated report replaces it (same format).
            written["table"] = folder / "comparison.json"
            table.to_json(written["table"], orient="split", index=False, date_format="iso")
            client.log_artifact(parent.info.run_id, str(written["table"]), "report")
        else:
            client.log_table(parent.info.run_id, table, "report/comparison.json")
    for name, metrics in (("metrics_vs_edits", PLOTTED_EDIT_METRICS),
                          ("generation_vs_edits", PLOTTED_GENERATION),
                          ("diagnostics_vs_edits", PLOTTED_DIAGNOSTICS),
                          ("retention_vs_edits", PLOTTED_RETENTION),
                          ("abilities_vs_edits", PLOTTED_ABILITIES)):
        figure = plot_rows(rows, metrics, f"grid {grid_id}: {name.replace('_', ' ')}")
        if figure is None:
            continue
        written[name] = folder / f"{name}.png"
        figure.savefig(written[name], dpi=110)
        client.log_artifact(parent.info.run_id, str(written[name]), "report")
        import matplotlib.pyplot as plt
        plt.close(figure)
    return rows, written
