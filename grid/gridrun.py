"""One grid submission in MLflow: the parent run, its identity, and which of its trials are already done.

The grid id is a content hash of the expanded trials' ids (each itself a hash of the trial's full configuration),
so submitting the same grid again finds the same parent run: trials whose child run FINISHED are skipped, and a
child left RUNNING (driver killed) or FAILED is superseded by the trial's next attempt — which first copies what
that child logged up to the trial's last checkpoint (grid/trial_checkpoint.py) and then deletes it — so that each
cell ends with exactly one child run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from grid.config import Trial
from grid.tracking import _mlflow_client, prepare_store, ui_url

logger = logging.getLogger(__name__)

GRID_ID_TAG = "editgrid.grid_id"
ROLE_TAG = "editgrid.role"  # "grid" on the parent run, "trial" on each child
TRIAL_ID_TAG = "editgrid.trial_id"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (Markdown)


def grid_id_of(trials: list[Trial]) -> str:
    blob = json.dumps(sorted(t.trial_id for t in trials)).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def grid_description(grid_id: str, trials: list[Trial]) -> str:
    """The parent run's description: what it is and what to click in the MLflow UI to compare its trials."""
    names = ", ".join(f"`{t.name}`" for t in trials[:12]) + (", ..." if len(trials) > 12 else "")
    return (f"**EditGrid grid `{grid_id}`**: {len(trials)} trial(s), one child run each ({names}).\n\n"
            f"**Compare its trials**: in the experiment's runs table expand this run (the **+** beside "
            f"`grid-{grid_id}`), tick its trials and click **Compare**; the metric charts (e.g. `edit/efficacy`, "
            f"`edit/generalization`, `edit/specificity`) put every trial against `step` = edits applied (pick *Step* "
            f"as the x axis where a chart offers *Time*). The runs table's chart view shows the same curves.\n\n"
            f"**This run's artifacts**: the grid's configuration (`grid/config.yaml`) and, once the grid has run, "
            f"the comparison report (`report/comparison.csv`, `report/metrics_vs_edits.png`).")


def git_commit() -> str:
    """The project's commit (with "+dirty" when the tree has changes), or "unknown" outside a git checkout.

    A ``ray job submit --working-dir`` upload carries no .git folder: pass the commit as ``EDITGRID_GIT_COMMIT``
    in the job's runtime environment (docs/cluster.md).
    """
    if os.environ.get("EDITGRID_GIT_COMMIT"):
        return os.environ["EDITGRID_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


@dataclass(frozen=True)
class GridRun:
    tracking_uri: str
    experiment_id: str
    run_id: str
    grid_id: str
    resumed: bool

    def client(self):
        return _mlflow_client(self.tracking_uri)


def open_grid_run(tracking_uri: str, trials: list[Trial], config: dict, source: str) -> GridRun:
    """The parent run of this grid: found by its grid id (a resubmission), or created with the grid's identity
    (grid id, git commit, config hash) and the effective configuration as ``grid/config.yaml``."""
    experiment = trials[0].config["experiment"]
    experiment_id = prepare_store(tracking_uri, experiment)
    client = _mlflow_client(tracking_uri)
    grid_id = grid_id_of(trials)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{GRID_ID_TAG}` = '{grid_id}' and "
                                                              f"tags.`{ROLE_TAG}` = 'grid'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        if NOTE_TAG not in found[0].data.tags:  # a grid first run before EditGrid wrote the description
            client.set_tag(run_id, NOTE_TAG, grid_description(grid_id, trials))
        return GridRun(tracking_uri, experiment_id, run_id, grid_id, resumed=True)
    config_text = yaml.safe_dump(config, sort_keys=False)
    tags = {ROLE_TAG: "grid", GRID_ID_TAG: grid_id, "editgrid.git_commit": git_commit(),
            "editgrid.config_hash": hashlib.sha256(config_text.encode()).hexdigest()[:12],
            "editgrid.source": source, "mlflow.runName": f"grid-{grid_id}",
            NOTE_TAG: grid_description(grid_id, trials)}
    run = client.create_run(experiment_id, run_name=f"grid-{grid_id}", tags=tags)
    run_id = run.info.run_id
    client.log_param(run_id, "num_trials", len(trials))
    client.log_text(run_id, config_text, "grid/config.yaml")
    client.log_dict(run_id, [{"index": t.index, "name": t.name, "trial_id": t.trial_id, "axes": t.axes}
                             for t in trials], "grid/trials.json")
    return GridRun(tracking_uri, experiment_id, run_id, grid_id, resumed=False)


def ui_links(tracking_uri: str, experiment: str, grid_id: str | None = None, run_id: str | None = None
             ) -> list[tuple[str, str]]:
    """(what, URL) of the MLflow UI pages to open after a grid (its runs table and its parent run, found by
    ``grid_id``) or a ``--local`` trial (its run); empty when the store names no UI or cannot be read."""
    try:
        client = _mlflow_client(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None or ui_url(tracking_uri, found.experiment_id) is None:
            return []
        links = []
        if grid_id:
            parents = client.search_runs([found.experiment_id], max_results=1, filter_string=(
                f"tags.`{GRID_ID_TAG}` = '{grid_id}' and tags.`{ROLE_TAG}` = 'grid'"))
            links.append((f"the grid's runs (expand grid-{grid_id} to compare its trials)",
                          ui_url(tracking_uri, found.experiment_id)))
            if parents:
                links.append(("its parent run", ui_url(tracking_uri, found.experiment_id, parents[0].info.run_id)))
        elif run_id:
            links.append(("the trial's run", ui_url(tracking_uri, found.experiment_id, run_id)))
        else:
            links.append(("the experiment's runs", ui_url(tracking_uri, found.experiment_id)))
        return links
    except Exception as err:  # noqa: BLE001 - the links are a convenience; the results are in the store regardless
        logger.debug("no MLflow UI links: %s", err)
        return []


def child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> list:
    client = _mlflow_client(tracking_uri)
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=50_000)


def finished_trial_ids(grid: GridRun) -> set[str]:
    return {run.data.tags.get(TRIAL_ID_TAG) for run in child_runs(grid.tracking_uri, grid.experiment_id, grid.run_id)
            if run.info.status == "FINISHED"}


def unfinished_trial_runs(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> list[str]:
    """Run ids of this trial's child runs that did not finish (a killed driver, a failed earlier attempt)."""
    return [run.info.run_id for run in child_runs(tracking_uri, experiment_id, parent_run_id)
            if run.data.tags.get(TRIAL_ID_TAG) == trial_id and run.info.status != "FINISHED"]


def delete_runs(tracking_uri: str, run_ids: list[str]) -> None:
    """Delete superseded attempts, so the attempt now running is its cell's only child run."""
    client = _mlflow_client(tracking_uri)
    for run_id in run_ids:
        logger.info("deleting run %s: superseded by the attempt now running", run_id)
        client.delete_run(run_id)


def close_grid_run(grid: GridRun, all_finished: bool) -> None:
    grid.client().set_terminated(grid.run_id, status="FINISHED" if all_finished else "FAILED")
