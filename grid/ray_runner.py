"""Running a grid's trials: on Ray Tune (the default), or one after another in this process (``--no-ray``).

Ray: ``ray.init()`` joins the cluster a ``ray job submit`` driver runs in (``RAY_ADDRESS``) or one already
started on this machine, and otherwise starts a local one. One Tune ``Tuner`` runs every pending trial as a
``grid_search`` entry: FIFO order (a complete table is the point), resources per trial from ``ray:`` (by model),
``reuse_actors=False`` so every trial gets a fresh worker process, and ``max_failures`` retries. A trial's
exception marks its MLflow child run FAILED with the reason (grid/tracking.py) and the other trials go on.

A retried or resubmitted trial continues from its last checkpoint and supersedes its unfinished child runs
(grid/trial.py), so every cell ends with one child run.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from evals.metric_names import (COST_EVAL_SHARE, COST_SECONDS_PER_EDIT, EDIT_SCORE, EFFICACY, GENERALIZATION,
                                SPECIFICITY)
from grid.config import Trial, trial_resources
from grid.gridrun import GridRun

logger = logging.getLogger(__name__)


@dataclass
class TrialOutcome:
    trial: Trial
    finished: bool
    error: str | None = None


def _run_one(trial_spec: dict, tracking_uri: str, parent_run_id: str, progress: bool, on_checkpoint=None
             ) -> list[dict]:
    """Run one trial as the only child run of its cell; returns its checkpoint rows."""
    from grid.trial import run_trial

    trial = Trial(index=trial_spec["index"], config=trial_spec["config"], axes=trial_spec["axes"])
    return run_trial(trial, tracking_uri, parent_run_id=parent_run_id, progress=progress,
                     on_checkpoint=on_checkpoint).checkpoints


# What Ray Tune reports per trial, in this order, every key at every report (NaN until known): Tune's status table
# shows the first four numeric columns it sees, so edits applied, the ETA, the edit score (harmonic mean of
# efficacy, generalization and specificity) and the seconds per edit; the others reach Tune's results.
TUNE_COLUMNS = (EDIT_SCORE, COST_SECONDS_PER_EDIT, EFFICACY, GENERALIZATION, SPECIFICITY, COST_EVAL_SHARE)


def tune_row(checkpoint: dict, eta: TrialEta | None = None) -> dict:
    """A checkpoint's headline row as Ray Tune reports it: ``edits`` applied, ``eta_min`` (the minutes the trial
    still needs at its pace so far, given its ``eta``), then TUNE_COLUMNS (``/`` → ``_``)."""
    edits = checkpoint.get("step", 0)
    minutes = eta.update(edits) if eta is not None else None
    row = {"edits": edits, "eta_min": round(minutes, 1) if minutes is not None else float("nan")}
    for key in TUNE_COLUMNS:
        value = checkpoint.get(key)
        row[key.replace("/", "_")] = float(value) if isinstance(value, (int, float)) else float("nan")
    return row


@dataclass
class TrialEta:
    """Minutes a trial still needs: the wall time per edit since its first report in this attempt (editing and
    evaluation together, so a resumed trial is timed on what it runs now) × the edits still to apply."""

    total_edits: int
    clock: Callable[[], float] = time.monotonic
    first: tuple[int, float] | None = None

    def update(self, edits: int) -> float | None:
        now = self.clock()
        if self.first is None:
            self.first = (edits, now)
        done = edits - self.first[0]
        if edits >= self.total_edits:
            return 0.0
        if done <= 0:
            return None  # no pace yet
        return (now - self.first[1]) / done * (self.total_edits - edits) / 60.0


def _spec(trial: Trial) -> dict:
    return {"index": trial.index, "config": trial.config, "axes": trial.axes, "name": trial.name}


def run_in_process(trials: list[Trial], grid: GridRun, progress: bool = True) -> list[TrialOutcome]:
    outcomes = []
    for trial in trials:
        try:
            _run_one(_spec(trial), grid.tracking_uri, grid.run_id, progress)
        except Exception as err:  # noqa: BLE001 - one failed trial must not stop the grid; it is marked FAILED
            logger.error("trial %s failed: %s: %s", trial.name, type(err).__name__, err)
            outcomes.append(TrialOutcome(trial, False, f"{type(err).__name__}: {err}"))
            continue
        outcomes.append(TrialOutcome(trial, True))
    return outcomes


def _tune_trainable(config: dict, specs: dict, tracking_uri: str, parent_run_id: str) -> None:
    """One trial inside a Ray worker process (``config`` holds only its index; the specs travel once, by
    ``tune.with_parameters``, so Tune's status table stays short)."""
    from ray import tune

    from grid.launch import configure_logging

    configure_logging()  # the trial's own INFO lines (e.g. "resuming after N edits") reach the driver's output
    # Every evaluation checkpoint reaches Tune's status table (edits applied and the headline metrics) as it
    # happens, so a multi-hour trial shows its progress; a trial without any reports its (empty) end.
    reported = []
    eta = TrialEta(total_edits=max(specs[config["trial"]]["config"]["edits"]["checkpoints"]))

    def report(row: dict) -> None:
        reported.append(row)
        tune.report(tune_row(row, eta))

    _run_one(specs[config["trial"]], tracking_uri, parent_run_id, progress=False, on_checkpoint=report)
    if not reported:
        tune.report(tune_row({}))


def run_on_ray(trials: list[Trial], grid: GridRun, ray_cfg: dict, storage_path: str | None = None
               ) -> list[TrialOutcome]:
    import ray
    from ray import tune
    from ray.tune import FailureConfig, RunConfig, TuneConfig

    if not ray.is_initialized():
        sigterm = signal.getsignal(signal.SIGTERM)
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING,
                 log_to_driver=True)
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            # ray.init replaces SIGTERM's handler with sys.exit; the driver's own (grid/launch.py) marks the grid's
            # runs as interrupted and stops the MLflow server it started before it exits.
            signal.signal(signal.SIGTERM, sigterm)
    logger.info("Ray cluster resources: %s", ray.cluster_resources())
    by_index = {t.index: t for t in trials}

    def resources(config: dict):
        wanted = trial_resources(by_index[config["trial"]], ray_cfg)
        return tune.PlacementGroupFactory([{k: v for k, v in wanted.items() if v}])

    trainable = tune.with_parameters(_tune_trainable, specs={t.index: _spec(t) for t in trials},
                                     tracking_uri=grid.tracking_uri, parent_run_id=grid.run_id)
    storage = storage_path or str(Path("~/ray_results").expanduser())
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"trial": tune.grid_search([t.index for t in trials])},
        tune_config=TuneConfig(reuse_actors=False, max_concurrent_trials=ray_cfg.get("max_concurrent_trials"),
                               trial_name_creator=lambda t: by_index[t.config["trial"]].name,
                               trial_dirname_creator=lambda t: f"trial{t.config['trial']:04d}_{t.trial_id}"),
        run_config=RunConfig(name=f"editgrid-{grid.grid_id}", storage_path=storage, verbose=1,
                             failure_config=FailureConfig(max_failures=ray_cfg["max_failures"], fail_fast=False)),
    )
    results = tuner.fit()
    outcomes = []
    for result in results:
        trial = by_index[result.config["trial"]]
        cause = getattr(result.error, "cause", None) or result.error  # a RayTaskError wraps the trial's own
        error = None if result.error is None else f"{type(cause).__name__}: {cause}"
        outcomes.append(TrialOutcome(trial, result.error is None, error))
    return sorted(outcomes, key=lambda o: o.trial.index)
