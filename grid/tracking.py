"""MLflow tracking for grid trials: where the store lives, creating it safely, and logging one trial's run.

Every trial is one MLflow run. Trials run in separate processes (Ray Tune actors) whose working directory is
changed by Tune, so tracking URIs are always made absolute, and the SQLite database plus the experiment are created
once, under a file lock, before any trial opens them (a fresh SQLite file opened by several processes at once
races on MLflow's schema migration and every process fails).

All logging goes through ``MlflowClient`` with an explicit run id rather than MLflow's fluent "active run"
API, so that a tracker never depends on (or disturbs) process-global MLflow state.

This module is generic: it knows nothing about editing methods or evaluations, only metric names by prefix
(``edit/...`` fractions, ``diag/<layer>/<kind>`` diagnostics).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence
from urllib.parse import unquote, urlparse

from evals.retention import CI_HIGH_SUFFIX, CI_LOW_SUFFIX, SAMPLE_SIZE_SUFFIX

if TYPE_CHECKING:  # imported lazily at run time: MLflow and matplotlib take seconds to import
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

DEFAULT_DATABASE_NAME = "mlflow.db"
# Name of the folder, next to the SQLite file, that holds the experiments' artifacts (so a store is one folder).
ARTIFACTS_FOLDER_NAME = "mlartifacts"
# How long a process waits for another one to finish creating the store before giving up.
STORE_LOCK_TIMEOUT_S = 300.0
# Limits of MLflow 3.x (mlflow.utils.validation); the installed version's values are read when available.
FALLBACK_MAX_PARAM_VALUE_LENGTH = 6000
FALLBACK_MAX_TAG_VALUE_LENGTH = 8000
FALLBACK_MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
# A failure message longer than this is cut in the ``failure_reason`` tag (the full traceback is an artifact).
MAX_FAILURE_REASON_LENGTH = 1000
FAILURE_TRACEBACK_ARTIFACT = "failure/traceback.txt"
MISSING_CELL = "–"
# Diagnostic kinds in the order their panels are drawn; other kinds follow alphabetically.
DIAGNOSTIC_KIND_ORDER = ("weight_norm", "weight_change", "cond", "sigma_max_delta")
# A panel whose positive values span at least this ratio is drawn on a log scale (condition numbers).
LOG_SCALE_MIN_SPAN = 100.0

# MLflow 3's UI has two faces: GenAI (traces, the default) and model training (the runs table). EditGrid's
# experiments are model-training ones: they carry this experiment tag (what the UI's experiment-kind selector writes),
# and the links EditGrid prints ask for the model-training face with UI_WORKFLOW_QUERY, which is what the 3.17 UI
# reads to pick the landing tab (its global switch, default GenAI, overrides the tag there; ui_url below).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"  # the UI's other value, genai_development, opens the GenAI overview
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
# Where `mlflow ui` serves a local store by default.
DEFAULT_UI_ADDRESS = "http://127.0.0.1:5000"

_SCHEME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_SQLITE_FILE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_TRUTHY = ("1", "true", "yes", "on")


class TrackingConfigError(ValueError):
    """A tracking URI or store that cannot be used, with the reason and what to use instead."""


# --------------------------------------------------------------------------------------------------------------
# Tracking URI and store
# --------------------------------------------------------------------------------------------------------------

def resolve_tracking_uri(cli_value: str | None) -> str:
    """The tracking URI to use, always absolute for local stores.

    Precedence: ``cli_value`` (``--tracking-uri``), else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<absolute cwd>/mlflow.db``. Relative SQLite paths and bare paths are made absolute against the
    current directory, because Ray Tune later changes each trial's working directory. A bare path ending in
    ``.db``/``.sqlite``/``.sqlite3`` means a SQLite file. A bare directory or ``file:`` URI (MLflow's file store)
    is accepted only when ``MLFLOW_ALLOW_FILE_STORE`` is true, since MLflow 3 refuses that store otherwise.
    Remote URIs (``http(s)://``, ``postgresql://``, ...) are returned unchanged.
    """
    value = (cli_value or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not value:
        return _sqlite_uri(Path.cwd() / DEFAULT_DATABASE_NAME)
    if value.startswith("sqlite:"):
        return _absolute_sqlite_uri(value)
    if value.startswith("file:"):
        return _file_store_uri(_file_uri_to_path(value), original=value)
    if _SCHEME_PATTERN.match(value):
        return value
    path = Path(value).expanduser()
    if path.suffix.lower() in _SQLITE_FILE_SUFFIXES:
        return _sqlite_uri(path)
    return _file_store_uri(path, original=value)


def sqlite_database_path(tracking_uri: str) -> Path | None:
    """The database file of an absolute ``sqlite:///`` URI, or None for any other kind of URI."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path_part = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path_part) if path_part.startswith("/") else None


def prepare_store(tracking_uri: str, experiment: str, proxied_artifacts: bool = False) -> str:
    """Create the store (for SQLite: the database with MLflow's schema) and the experiment; return its id.

    Idempotent. For SQLite the work happens under ``<database>.lock``, so several processes may call it at
    once on a fresh path: one creates, the others wait and then find everything in place. New experiments in a
    SQLite store keep their artifacts in ``<database folder>/mlartifacts/<experiment>`` rather than MLflow's
    default ``./mlruns`` of whatever directory the creating process happened to run in; with
    ``proxied_artifacts`` (the store is about to be served by ``mlflow server``, grid/mlflow_server.py) they go
    through the server instead: ``mlflow-artifacts:/<experiment>``.
    """
    if not experiment or not experiment.strip():
        raise TrackingConfigError("the MLflow experiment name is empty; give a name such as 'editgrid'")
    uri = resolve_tracking_uri(tracking_uri)
    database = sqlite_database_path(uri)
    if database is None:
        return _get_or_create_experiment(_mlflow_client(uri), experiment, artifact_location=None)

    from filelock import FileLock, Timeout

    # Import MLflow's SQL store (SQLAlchemy, alembic: ~2 s) before taking the lock, so that processes queued
    # on it do not each spend that time while holding it.
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    database.parent.mkdir(parents=True, exist_ok=True)
    lock_path = f"{database}.lock"
    try:
        with FileLock(lock_path, timeout=STORE_LOCK_TIMEOUT_S):
            # Opening the client's store on a missing/empty file runs MLflow's schema migration.
            client = _mlflow_client(uri)
            artifact_location = (f"mlflow-artifacts:/{_path_safe_name(experiment)}" if proxied_artifacts else
                                 (database.parent / ARTIFACTS_FOLDER_NAME / _path_safe_name(experiment)).as_uri())
            return _get_or_create_experiment(client, experiment, artifact_location=artifact_location)
    except Timeout as error:
        raise TrackingConfigError(
            f"waited {STORE_LOCK_TIMEOUT_S:.0f} s for the lock {lock_path} held by another process creating the "
            f"MLflow store; if no such process is running, delete the lock file"
        ) from error


def _sqlite_uri(path: Path) -> str:
    return "sqlite:///" + os.path.abspath(path.expanduser())


def _absolute_sqlite_uri(uri: str) -> str:
    """``sqlite:///rel.db`` → ``sqlite:////abs/rel.db``; keeps a ``?query``; rejects in-memory databases."""
    if not uri.startswith("sqlite:///"):
        raise TrackingConfigError(
            f"unsupported SQLite URI {uri!r}: write 'sqlite:///relative/path.db' or 'sqlite:////absolute/path.db'"
        )
    path_part, separator, query = uri[len("sqlite:///"):].partition("?")
    if not path_part or path_part == ":memory:":
        raise TrackingConfigError(
            f"in-memory SQLite ({uri!r}) cannot be shared by trial processes; give a file, e.g. "
            f"'sqlite:///{DEFAULT_DATABASE_NAME}'"
        )
    return _sqlite_uri(Path(path_part)) + separator + query


def _file_uri_to_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise TrackingConfigError(f"file URI {uri!r} names a remote host; only local file URIs are supported")
    return Path(unquote(parsed.path))


def _file_store_uri(path: Path, original: str) -> str:
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in _TRUTHY:
        raise TrackingConfigError(
            f"tracking URI {original!r} is a directory (MLflow's file store), which MLflow 3 refuses unless "
            f"MLFLOW_ALLOW_FILE_STORE=true is set. Use a SQLite database instead, e.g. "
            f"--tracking-uri sqlite:///{DEFAULT_DATABASE_NAME} (or a path ending in .db), or set "
            f"MLFLOW_ALLOW_FILE_STORE=true to keep the file store."
        )
    return Path(os.path.abspath(path.expanduser())).as_uri()


def _path_safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._") or "experiment"


def _mlflow_client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    existing = client.get_experiment_by_name(name)
    if existing is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except MlflowException as error:
            # A remote store has no file lock: another process may have created it between our two calls.
            if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            existing = client.get_experiment_by_name(name)
            if existing is None:
                raise
    if existing.lifecycle_stage == "deleted":
        raise TrackingConfigError(
            f"MLflow experiment {name!r} (id {existing.experiment_id}) is deleted; restore it with "
            f"'mlflow experiments restore --experiment-id {existing.experiment_id}' or choose another name"
        )
    if EXPERIMENT_KIND_TAG not in existing.tags:  # created before EditGrid set it, or by someone else
        client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return existing.experiment_id


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """The MLflow UI's page of an experiment's runs table (or of one run), on its model-training face.

    Local stores (SQLite, file) are served by ``mlflow ui`` at DEFAULT_UI_ADDRESS; an http(s) tracking URI is its
    own UI. None for other stores (a database URI names no UI).
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("sqlite:", "file:")):
        base = DEFAULT_UI_ADDRESS
    elif uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
    else:
        return None
    page = f"/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base}/#{page}?{UI_WORKFLOW_QUERY}"


# --------------------------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------------------------

def flatten_params(config: Mapping[str, Any], prefix: str = "", *,
                   max_value_length: int | None = None) -> dict[str, str]:
    """Nested config → MLflow params: dotted keys (``edits.batch_size``), string values.

    Lists/tuples become compact JSON; an empty mapping becomes ``{}`` (so the key is still recorded). Values
    longer than MLflow's param limit (the installed version's, 6000 in MLflow 3) are cut and end with a
    ``...[truncated N chars]`` marker. Two entries that flatten to the same key are an error.
    """
    if max_value_length is None:
        max_value_length = _mlflow_limit("MAX_PARAM_VAL_LENGTH", FALLBACK_MAX_PARAM_VALUE_LENGTH)
    flat: dict[str, str] = {}
    _flatten_into(flat, config, prefix, max_value_length)
    return flat


def _flatten_into(flat: dict[str, str], config: Mapping[str, Any], prefix: str, max_value_length: int) -> None:
    for raw_key, value in config.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if isinstance(value, Mapping) and value:
            _flatten_into(flat, value, key, max_value_length)
            continue
        if key in flat:
            raise ValueError(f"config entries collide on the flattened param name {key!r}; rename one of them")
        flat[key] = truncate_text(_param_text(value), max_value_length)


def _param_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if getattr(value, "ndim", 0) > 0 and hasattr(value, "tolist"):  # numpy arrays, torch tensors
        value = value.tolist()
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return json.dumps(items, separators=(",", ":"), default=_json_fallback, ensure_ascii=False)
    return str(_as_python_scalar(value))


def _json_fallback(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays/scalars, torch tensors
        return value.tolist()
    return str(value)


def _as_python_scalar(value: Any) -> Any:
    """numpy / torch scalars → the Python number they hold (so params read ``0.5``, not ``tensor(0.5)``)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def truncate_text(text: str, max_length: int) -> str:
    """``text`` cut to at most ``max_length`` characters, ending with a marker saying how much was cut."""
    if len(text) <= max_length:
        return text
    # The marker's own length depends on the count it reports; a second pass settles it.
    marker = f"...[truncated {len(text) - max_length} chars]"
    keep = max(max_length - len(marker), 0)
    marker = f"...[truncated {len(text) - keep} chars]"
    keep = max(max_length - len(marker), 0)
    return (text[:keep] + marker)[:max_length]


def _mlflow_limit(name: str, fallback: int) -> int:
    try:
        from mlflow.utils import validation
    except ImportError:
        return fallback
    return int(getattr(validation, name, fallback))


# --------------------------------------------------------------------------------------------------------------
# One trial's run
# --------------------------------------------------------------------------------------------------------------

class TrialTracker:
    """One MLflow run for one trial, used as a context manager.

    On enter: makes sure the store and experiment exist (locked, idempotent), starts the run (as a child of
    ``parent_run_id`` when given) and logs the flattened ``params`` and the ``tags``. On exit: the run ends
    FINISHED, or FAILED when an exception escapes; the exception's type and message then go to the
    ``failure_reason`` tag and its traceback to ``failure/traceback.txt``, and the exception propagates.

    >>> with TrialTracker(uri, "editgrid", "memit-seed0", params=config) as tracker:
    ...     tracker.log_metrics({"edit/efficacy": 0.9}, step=100)
    ...     tracker.log_curves()
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
                 tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = params
        self.tags = dict(tags or {})
        self.parent_run_id = parent_run_id
        self.experiment_id: str | None = None
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._ended = False
        self._history: dict[str, list[tuple[int, float]]] = {}
        # Rows logged so far per table artifact: MLflow appends to an existing JSON table, the CSV copy must too.
        self._table_rows: dict[str, list[dict[str, Any]]] = {}

    # -- lifecycle ------------------------------------------------------------------------------------------

    def __enter__(self) -> TrialTracker:
        if self._run_id is not None:
            raise RuntimeError(f"TrialTracker for run {self.run_name!r} was already entered; create a new one")
        self.tracking_uri = resolve_tracking_uri(self.tracking_uri)
        database = sqlite_database_path(self.tracking_uri)
        if self.parent_run_id and database is not None and not database.is_file():
            # A grid's driver created this file before any trial started: a trial that cannot see it runs on
            # another node, where creating it would log the run to a database the driver never reads.
            raise TrackingConfigError(self._not_the_grids_store(f"{database} does not exist on this node"))
        self.experiment_id = prepare_store(self.tracking_uri, self.experiment)
        self._client = _mlflow_client(self.tracking_uri)
        # Flatten before creating the run so a bad config fails without leaving an empty RUNNING run behind.
        flat_params = flatten_params(self.params)
        _check_key_lengths(flat_params, "param")
        run = self._client.create_run(self.experiment_id, run_name=self.run_name, tags=self._initial_tags())
        self._run_id = run.info.run_id
        try:
            self._log_params(flat_params)
        except BaseException as error:
            self._end_run(type(error), error, error.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._run_id is not None and not self._ended:
            self._end_run(exc_type, exc, tb)
        return False  # never swallow the exception

    def _initial_tags(self) -> dict[str, str]:
        tags = {str(key): str(value) for key, value in self.tags.items()}
        if self.parent_run_id:
            self._check_parent_run()
            tags["mlflow.parentRunId"] = self.parent_run_id
        try:
            # The same context tags (user, source, git commit) that mlflow.start_run would record.
            from mlflow.tracking.context.registry import resolve_tags
            tags = resolve_tags(tags)
        except Exception as error:  # noqa: BLE001 — context tags are a convenience, never a reason to fail
            logger.debug("could not resolve MLflow context tags: %s", error)
        max_length = _mlflow_limit("MAX_TAG_VAL_LENGTH", FALLBACK_MAX_TAG_VALUE_LENGTH)
        return {key: truncate_text(str(value), max_length) for key, value in tags.items()}

    def _check_parent_run(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(self.parent_run_id)
        except MlflowException as error:
            raise TrackingConfigError(self._not_the_grids_store(
                f"it holds no run {self.parent_run_id!r} ({error})")) from error

    def _not_the_grids_store(self, what: str) -> str:
        import socket

        return (f"trial {self.run_name!r} on node {socket.gethostname()}: the tracking store {self.tracking_uri} is "
                f"not the one its grid's driver opened: {what}. Trials on other nodes need the same store: run the "
                "grid with --mlflow-server (and --mlflow-server-host this node's address), or keep the SQLite file "
                "on a folder every node mounts at the same path (docs/cluster.md)")

    def _end_run(self, exc_type, exc, tb) -> None:
        self._ended = True
        if exc_type is None:
            self._client.set_terminated(self._run_id, status="FINISHED")
            return
        # While an exception propagates, a tracking error must not replace it: log and move on.
        try:
            reason = f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__
            self._client.set_tag(self._run_id, "failure_reason", truncate_text(reason, MAX_FAILURE_REASON_LENGTH))
            self._client.log_text(self._run_id, "".join(traceback.format_exception(exc_type, exc, tb)),
                                  FAILURE_TRACEBACK_ARTIFACT)
        except Exception as error:  # noqa: BLE001
            logger.warning("could not record the failure of run %s: %s", self._run_id, error)
        try:
            self._client.set_terminated(self._run_id, status="FAILED")
        except Exception as error:  # noqa: BLE001
            logger.warning("could not mark run %s as FAILED: %s", self._run_id, error)

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self._active_run_id()

    @property
    def metric_history(self) -> dict[str, list[tuple[int, float]]]:
        """Everything logged with :meth:`log_metrics` so far: ``{name: [(step, value), ...]}`` (a copy)."""
        return {name: list(points) for name, points in self._history.items()}

    def _active_run_id(self) -> str:
        if self._run_id is None:
            raise RuntimeError("the run has not started: use `with TrialTracker(...) as tracker:`")
        if self._ended:
            raise RuntimeError(f"run {self._run_id} ({self.run_name!r}) has already ended")
        return self._run_id

    # -- logging --------------------------------------------------------------------------------------------

    def _log_params(self, flat_params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in flat_params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one checkpoint's metrics at ``step`` (edits applied so far) in one batch; None values are skipped.

        numpy/torch scalars are converted to float. Values are also kept in :attr:`metric_history` for plots.
        """
        from mlflow.entities import Metric

        run_id = self._active_run_id()
        step = int(step)
        timestamp_ms = int(time.time() * 1000)
        values: dict[str, float] = {}
        for name, value in metrics.items():
            if value is None:
                continue
            values[str(name)] = _metric_float(name, value)
        _check_key_lengths(values, "metric")
        self._log_points(run_id, [Metric(name, value, timestamp_ms, step) for name, value in values.items()])

    def _log_points(self, run_id: str, points: list) -> None:
        """Metric points (mlflow Metric) to the run in MLflow-sized batches, and into :attr:`metric_history`."""
        for start in range(0, len(points), MAX_METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=points[start:start + MAX_METRICS_PER_BATCH])
        for m in points:
            self._history.setdefault(m.key, []).append((m.step, m.value))

    def carry_over(self, source_run_id: str, up_to_step: int) -> int:
        """Copy into this run what ``source_run_id`` (an earlier, interrupted attempt of the same trial) logged up to
        ``up_to_step``: every metric point with step ≤ it, and the artifacts except the ``step_<n>`` files of later
        steps and the failure record. The attempt resumed from a checkpoint thus continues one clean history.
        Returns the number of metric points copied."""
        import tempfile

        from mlflow.entities import Metric

        run_id = self._active_run_id()
        source = self._client.get_run(source_run_id)
        points: list[Metric] = []
        for key in source.data.metrics:
            for m in self._client.get_metric_history(source_run_id, key):
                if m.step <= up_to_step:
                    points.append(Metric(m.key, m.value, m.timestamp, m.step))
        points.sort(key=lambda m: (m.step, m.timestamp))
        self._log_points(run_id, points)
        with tempfile.TemporaryDirectory() as folder:
            local = Path(self._client.download_artifacts(source_run_id, "", folder))
            for path in sorted(local.rglob("*")):
                later = re.search(r"step_(\d+)", path.name)
                relative = path.relative_to(local).as_posix()
                if path.is_file() and (later and int(later.group(1)) > up_to_step
                                       or relative == FAILURE_TRACEBACK_ARTIFACT):
                    path.unlink()
            if any(p.is_file() for p in local.rglob("*")):
                self._client.log_artifacts(run_id, str(local))
        return len(points)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        run_id = self._active_run_id()
        max_length = _mlflow_limit("MAX_TAG_VAL_LENGTH", FALLBACK_MAX_TAG_VALUE_LENGTH)
        items = [RunTag(str(key), truncate_text(str(value), max_length)) for key, value in tags.items()]
        _check_key_lengths({item.key: item.value for item in items}, "tag")
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, tags=items[start:start + MAX_PARAMS_PER_BATCH])

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """A JSON (or YAML, by extension) artifact; objects JSON cannot encode are written as strings."""
        self._client.log_dict(self._active_run_id(), obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self._active_run_id(), text, artifact_file)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        """Every file under ``local_dir`` to ``artifact_path`` (logging again to the same path replaces them)."""
        self._client.log_artifacts(self._active_run_id(), local_dir, artifact_path)

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """An MLflow table artifact (``.json``, shown in the UI's artifact view) plus a ``.csv`` copy beside it.

        Logging again to the same file appends rows, as MLflow does for tables; the CSV always holds every row.
        """
        import pandas as pd

        run_id = self._active_run_id()
        if not artifact_file.endswith((".json", ".parquet")):
            raise ValueError(f"table artifact {artifact_file!r} must end in .json or .parquet (MLflow's table "
                             f"formats), e.g. 'tables/per_edit_results.json'")
        rows = [dict(row) for row in rows]
        self._client.log_table(run_id, pd.DataFrame.from_records(rows), artifact_file)
        all_rows = self._table_rows.setdefault(artifact_file, [])
        all_rows.extend(rows)
        csv_file = artifact_file.rsplit(".", 1)[0] + ".csv"
        self._client.log_text(run_id, _rows_to_csv(all_rows), csv_file)

    def log_curves(self, artifact_file: str = "plots/metrics_vs_edits.png",
                   prefixes: Sequence[str] = ("edit/",)) -> str | None:
        """A PNG of the logged metrics whose names start with ``prefixes`` against edits applied.

        See :func:`metric_curves_figure` for the layout. Returns the artifact path, or None (with nothing
        logged) when no metric matches, e.g. diagnostics were turned off.
        """
        run_id = self._active_run_id()
        figure = metric_curves_figure(self._history, prefixes=prefixes, title=self.run_name)
        if figure is None:
            logger.info("run %s: no metrics start with %s; %s not drawn", run_id, tuple(prefixes), artifact_file)
            return None
        self._client.log_figure(run_id, figure, artifact_file, save_kwargs={"dpi": 120})
        return artifact_file


def _metric_float(name: str, value: Any) -> float:
    value = _as_python_scalar(value)
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"metric {name!r} must be a number (or a numpy/torch scalar), got "
                        f"{type(value).__name__}: {value!r}") from error


def _check_key_lengths(entries: Mapping[str, Any], kind: str) -> None:
    max_length = _mlflow_limit("MAX_ENTITY_KEY_LENGTH", FALLBACK_MAX_KEY_LENGTH)
    too_long = [key for key in entries if len(key) > max_length]
    if too_long:
        raise ValueError(f"{kind} names longer than MLflow's {max_length}-character limit: {too_long}")


def _rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_cell(value) for key, value in row.items()})
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        return _param_text(value)  # compact JSON keeps nested cells machine-readable
    return _as_python_scalar(value)


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------

def metric_curves_figure(history: Mapping[str, Sequence[tuple[int, float]]], prefixes: Sequence[str] = ("edit/",),
                         title: str = "") -> Figure | None:
    """A figure of metric value vs edits applied, for the metrics in ``history`` starting with ``prefixes``.

    Names with a further level, ``<prefix><series>/<kind>`` (``diag/L4/cond``), get one panel per kind with one
    line per series (layer). Flat names (``edit/efficacy``) share a panel: those whose values all lie in [0, 1]
    (fractions; names containing "gap" excluded, probability gaps can be negative) on a fixed [0, 1] axis, any
    others in a second panel with a free axis. A panel whose positive values span two or more orders of magnitude
    uses a log scale. Non-finite points are left out; markers show the checkpoints. Returns None when no metric
    matches. Rendering uses matplotlib's Agg canvas directly, so no display or pyplot state is involved.
    """
    prefixes = tuple(prefixes)
    panels = _group_into_panels(history, prefixes)
    if not panels:
        return None

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(7.0 * columns, 4.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    for axes, panel in zip(axes_grid.flat, panels):
        for label, points in panel.series:
            steps, values = zip(*points)
            (line,) = axes.plot(steps, values, marker="o", markersize=3.5, linewidth=1.4, label=label)
            if label in panel.bands:  # the 95 % interval logged beside the rate
                band_steps, lows, highs = panel.bands[label]
                axes.fill_between(band_steps, lows, highs, color=line.get_color(), alpha=0.18, linewidth=0)
        all_values = [value for _, points in panel.series for _, value in points]
        if panel.unit_interval:
            axes.set_ylim(-0.02, 1.02)
        elif _spans_orders_of_magnitude(all_values):
            axes.set_yscale("log")
        axes.set_title(panel.title, fontsize=11)
        axes.set_xlabel("edits applied")
        axes.set_ylabel(panel.y_label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        axes.grid(True, alpha=0.3)
        many = len(panel.series) > 10
        axes.legend(fontsize=7 if many else 8, ncol=2 if many else 1, loc="upper left",
                    bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    for axes in list(axes_grid.flat)[len(panels):]:
        axes.set_visible(False)
    figure.suptitle(title or "metrics vs edits", fontsize=12)
    return figure


class _Panel:
    def __init__(self, title: str, y_label: str, series: list[tuple[str, list[tuple[int, float]]]],
                 unit_interval: bool, bands: dict | None = None) -> None:
        self.title = title
        self.y_label = y_label
        self.series = series
        self.unit_interval = unit_interval
        self.bands = bands or {}  # series label -> (steps, lows, highs) of its interval


def _interval_bands(history: Mapping[str, Sequence[tuple[int, float]]]) -> tuple[dict, set[str]]:
    """Rates logged with an interval and a sample size (evals/retention.py: ``<name>_ci95_low|high``, ``<name>_n``):
    {name: (steps, lows, highs)}, and the companion names, which are drawn as the band, not as lines."""
    bands, companions = {}, set()
    for name in history:
        low, high, size = name + CI_LOW_SUFFIX, name + CI_HIGH_SUFFIX, name + SAMPLE_SIZE_SUFFIX
        if low in history and high in history:
            lows, highs = dict(_finite_points_by_step(history[low])), dict(_finite_points_by_step(history[high]))
            steps = sorted(set(lows) & set(highs))
            bands[name] = (steps, [lows[s] for s in steps], [highs[s] for s in steps])
            companions.update((low, high, size))
    return bands, companions


def _group_into_panels(history: Mapping[str, Sequence[tuple[int, float]]], prefixes: tuple[str, ...]) -> list[_Panel]:
    flat: list[tuple[str, list[tuple[int, float]]]] = []
    by_kind: dict[str, list[tuple[str, list[tuple[int, float]]]]] = {}
    bands, companions = _interval_bands(history)
    flat_bands: dict[str, tuple] = {}
    kind_bands: dict[str, dict[str, tuple]] = {}
    for name in sorted(history, key=_natural_key):
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None or name in companions:
            continue
        points = _finite_points_by_step(history[name])
        if not points:
            continue
        rest = name[len(prefix):]
        if "/" in rest:
            series_label, kind = rest.rsplit("/", 1)
            by_kind.setdefault(kind, []).append((series_label, points))
            if name in bands:
                kind_bands.setdefault(kind, {})[series_label] = bands[name]
        else:
            flat.append((rest or name, points))
            if name in bands:
                flat_bands[rest or name] = bands[name]

    panels: list[_Panel] = []
    prefix_text = ", ".join(prefixes)
    fractions = [(label, points) for label, points in flat if _is_fraction_series(label, points)]
    others = [(label, points) for label, points in flat if not _is_fraction_series(label, points)]
    if fractions:
        panels.append(_Panel(f"{prefix_text} fractions", "fraction", fractions, unit_interval=True,
                             bands=flat_bands))
    if others:
        panels.append(_Panel(f"{prefix_text} other values" if fractions else prefix_text, "value", others,
                             unit_interval=False))
    known_order = {kind: index for index, kind in enumerate(DIAGNOSTIC_KIND_ORDER)}
    for kind in sorted(by_kind, key=lambda k: (known_order.get(k, len(known_order)), k)):
        unit = all(_is_fraction_series(label, points) for label, points in by_kind[kind])
        panels.append(_Panel(kind, kind, by_kind[kind], unit_interval=unit and kind in kind_bands,
                             bands=kind_bands.get(kind)))
    return panels


def _finite_points_by_step(points: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """Sorted by step; a step logged twice keeps its last value; NaN/inf points are dropped."""
    by_step: dict[int, float] = {}
    for step, value in points:
        by_step[int(step)] = float(value)
    return [(step, value) for step, value in sorted(by_step.items()) if math.isfinite(value)]


def _is_fraction_series(label: str, points: Sequence[tuple[int, float]]) -> bool:
    return "gap" not in label.lower() and all(0.0 <= value <= 1.0 for _, value in points)


def _spans_orders_of_magnitude(values: Sequence[float]) -> bool:
    if not values or min(values) <= 0:
        return False
    return max(values) / min(values) >= LOG_SCALE_MIN_SPAN


def _natural_key(text: str) -> list[Any]:
    """Sort key that puts ``L2`` before ``L10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------------------------------------------
# End-of-run summary
# --------------------------------------------------------------------------------------------------------------

def format_summary_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A monospace table of ``rows``: floats with 3 decimals, missing/None/NaN as "–", numbers right-aligned.

    ``columns`` defaults to every key in order of first appearance.
    """
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    columns = [str(column) for column in columns]
    if not columns:
        return "(no results)"
    cells = [[_summary_cell(row.get(column)) for column in columns] for row in rows]
    numeric = [all(_is_number(row.get(column)) or _is_missing(row.get(column)) for row in rows)
               for column in columns]
    widths = [max([len(column)] + [len(line[index]) for line in cells]) for index, column in enumerate(columns)]

    def render(values: Sequence[str]) -> str:
        parts = [value.rjust(width) if right else value.ljust(width)
                 for value, width, right in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    lines = [render(columns), "  ".join("-" * width for width in widths)]
    lines.extend(render(line) for line in cells)
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    value = _as_python_scalar(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_missing(value: Any) -> bool:
    value = _as_python_scalar(value)
    return value is None or (isinstance(value, float) and math.isnan(value))


def _summary_cell(value: Any) -> str:
    value = _as_python_scalar(value)
    if _is_missing(value):
        return MISSING_CELL
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
