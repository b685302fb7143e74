"""grid.tracking against a real SQLite MLflow store in tmp_path (no server, no network)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from grid.tracking import (
    TrackingConfigError,
    TrialTracker,
    flatten_params,
    format_summary_table,
    metric_curves_figure,
    prepare_store,
    resolve_tracking_uri,
    sqlite_database_path,
    truncate_text,
)

EXPERIMENT = "editgrid-test"


def _prepare_store_after_barrier(uri: str, barrier, results) -> None:
    """Child process: import MLflow first, then start prepare_store together with the other children."""
    import mlflow  # noqa: F401 — so that the barrier releases the processes close together

    barrier.wait(timeout=120)
    try:
        results.put(("ok", prepare_store(uri, EXPERIMENT)))
    except Exception as error:  # noqa: BLE001 — reported to the parent test
        results.put(("error", f"{type(error).__name__}: {error}"))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A folder for SQLite stores, on tmpfs when there is one: creating a database runs MLflow's ~100 schema
    migrations with an fsync each (about 10 s on this disk, 3 s in memory)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path_factory.mktemp("stores")
        return
    directory = Path(tempfile.mkdtemp(prefix="editgrid-test-tracking-", dir=shm))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_uri(store_dir: Path) -> str:
    """One store shared by the tests of this module (each test uses its own runs)."""
    uri = f"sqlite:///{store_dir / 'shared' / 'mlflow.db'}"
    prepare_store(uri, EXPERIMENT)
    return uri


@pytest.fixture(scope="module")
def client(tracking_uri):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=tracking_uri)


CONFIG = {
    "method": "memit",
    "edits": {"batch_size": 10, "total": 100, "layers": [4, 5, 6]},
    "model": {"name": "smollm2-135m", "dtype": "float32"},
    "seed": 0,
}


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, path):
        if entry.is_dir:
            found |= _artifact_paths(client, run_id, entry.path)
        else:
            found.add(entry.path)
    return found


# ---------------------------------------------------------------------------------------------------------------
# resolve_tracking_uri
# ---------------------------------------------------------------------------------------------------------------

def test_resolve_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from_env.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/from_env.db"
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path}/from_env.db"
    assert resolve_tracking_uri("sqlite:///cli.db") == f"sqlite:///{tmp_path}/cli.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_resolve_uri_makes_local_paths_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("sqlite:///runs/x.db?timeout=30") == f"sqlite:///{tmp_path}/runs/x.db?timeout=30"
    assert resolve_tracking_uri("runs/grid.db") == f"sqlite:///{tmp_path}/runs/grid.db"
    uri = resolve_tracking_uri("sqlite:///a.db")
    assert sqlite_database_path(uri) == tmp_path / "a.db"
    assert sqlite_database_path("http://host") is None
    with pytest.raises(TrackingConfigError, match="in-memory"):
        resolve_tracking_uri("sqlite:///:memory:")


def test_resolve_uri_file_store_needs_opt_in(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for value in ("mlruns", "file:///tmp/mlruns"):
        with pytest.raises(TrackingConfigError, match="MLFLOW_ALLOW_FILE_STORE.*sqlite"):
            resolve_tracking_uri(value)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert resolve_tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert resolve_tracking_uri("file:///tmp/mlruns") == "file:///tmp/mlruns"


# ---------------------------------------------------------------------------------------------------------------
# flatten_params / truncate_text / format_summary_table
# ---------------------------------------------------------------------------------------------------------------

def test_flatten_params_nested_and_lists():
    flat = flatten_params({**CONFIG, "empty": {}, "lr": np.float64(0.5), "none": None, "pairs": [(1, "a")],
                           "weights": np.array([1.5, 2.0])})
    assert flat == {
        "method": "memit",
        "edits.batch_size": "10",
        "edits.total": "100",
        "edits.layers": "[4,5,6]",
        "model.name": "smollm2-135m",
        "model.dtype": "float32",
        "seed": "0",
        "empty": "{}",
        "lr": "0.5",
        "none": "None",
        "pairs": '[[1,"a"]]',
        "weights": "[1.5,2.0]",
    }
    assert flatten_params({"b": 1}, prefix="cfg") == {"cfg.b": "1"}
    with pytest.raises(ValueError, match="collide"):
        flatten_params({"a.b": 1, "a": {"b": 2}})


def test_flatten_params_truncates_to_the_mlflow_limit():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    value = flatten_params({"long": "x" * 10_000})["long"]
    assert len(value) == MAX_PARAM_VAL_LENGTH
    assert value.endswith("chars]") and "truncated" in value
    assert truncate_text("short", 10) == "short"
    cut = truncate_text("y" * 100, 40)
    assert len(cut) == 40 and cut.endswith(f"[truncated {100 - cut.index('.')} chars]")


def test_format_summary_table_aligns_columns():
    rows = [
        {"trial": "memit-0", "method": "memit", "edits": 100, "edit/efficacy": 0.98765},
        {"trial": "alphaedit-long-name", "method": "alphaedit", "edits": 1000, "edit/efficacy": None},
        {"trial": "ft-0", "method": "ft", "edits": 5, "edit/efficacy": float("nan"), "extra": "x"},
    ]
    table = format_summary_table(rows, columns=["trial", "method", "edits", "edit/efficacy", "missing"])
    lines = table.splitlines()
    assert len(lines) == 5
    header, rule, first, second, third = lines
    assert header.split() == ["trial", "method", "edits", "edit/efficacy", "missing"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert "0.988" in first and "0.98765" not in first
    assert second.split()[-2:] == ["–", "–"] and third.split()[-2:] == ["–", "–"]
    # Numeric columns are right-aligned: the values end where the header ends.
    edits_end = header.index("edits") + len("edits")
    assert first[:edits_end].endswith("100") and third[:edits_end].endswith("5")
    efficacy_end = header.index("edit/efficacy") + len("edit/efficacy")
    assert first[:efficacy_end].endswith("0.988")
    # Text columns are left-aligned: every row's method starts under the header's.
    method_start = header.index("method")
    assert [line[method_start:].split()[0] for line in (first, second, third)] == ["memit", "alphaedit", "ft"]
    assert "extra" in format_summary_table(rows)  # default columns: every key
    assert format_summary_table([]) == "(no results)"


def test_curves_figure_panels():
    history = {
        "edit/efficacy": [(10, 1.0), (20, 0.9), (30, float("nan"))],
        "edit/prob_gap": [(10, 0.5), (20, -0.1)],
        "diag/L4/cond": [(10, 10.0), (20, 1e5)],
        "diag/L10/cond": [(10, 20.0), (20, 2e4)],
        "diag/L4/weight_norm": [(10, 30.0), (20, 31.0)],
    }
    edit_figure = metric_curves_figure(history, ("edit/",), title="run")
    edit_axes = [axes for axes in edit_figure.axes if axes.get_visible()]
    assert [axes.get_ylabel() for axes in edit_axes] == ["fraction", "value"]
    assert edit_axes[0].get_ylim() == (-0.02, 1.02)
    assert len(edit_axes[0].lines[0].get_xdata()) == 2  # the NaN point is left out

    diag_figure = metric_curves_figure(history, ("diag/",), title="run")
    diag_axes = [axes for axes in diag_figure.axes if axes.get_visible()]
    assert [axes.get_title() for axes in diag_axes] == ["weight_norm", "cond"]
    assert diag_axes[1].get_yscale() == "log" and diag_axes[0].get_yscale() == "linear"
    assert [line.get_label() for line in diag_axes[1].lines] == ["L4", "L10"]
    assert metric_curves_figure(history, ("general/",)) is None


# ---------------------------------------------------------------------------------------------------------------
# prepare_store
# ---------------------------------------------------------------------------------------------------------------

def test_prepare_store_is_idempotent(tracking_uri, client):
    first = prepare_store(tracking_uri, EXPERIMENT)
    assert prepare_store(tracking_uri, EXPERIMENT) == first
    experiment = client.get_experiment(first)
    database = sqlite_database_path(tracking_uri)
    assert experiment.artifact_location == (database.parent / "mlartifacts" / EXPERIMENT).as_uri()
    with pytest.raises(TrackingConfigError, match="empty"):
        prepare_store(tracking_uri, " ")


def test_prepare_store_from_three_processes_on_a_fresh_database(store_dir):
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{store_dir / 'fresh' / 'mlflow.db'}"
    assert not sqlite_database_path(tracking_uri).exists()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    results = context.Queue()
    processes = [context.Process(target=_prepare_store_after_barrier, args=(tracking_uri, barrier, results))
                 for _ in range(3)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert [status for status, _ in outcomes] == ["ok"] * 3, outcomes
    assert len({experiment_id for _, experiment_id in outcomes}) == 1
    names = [experiment.name for experiment in MlflowClient(tracking_uri).search_experiments()]
    assert names.count(EXPERIMENT) == 1


# ---------------------------------------------------------------------------------------------------------------
# TrialTracker
# ---------------------------------------------------------------------------------------------------------------

def test_tracker_logs_params_metrics_tables_and_plots(tracking_uri, client, tmp_path):
    import matplotlib.image
    import torch  # imported here, not at module level: spawned children re-import this module

    with TrialTracker(tracking_uri, EXPERIMENT, "memit-seed0", params=CONFIG, tags={"method": "memit"}) as tracker:
        for step, efficacy in ((10, 1.0), (20, 0.9), (40, 0.7)):
            tracker.log_metrics({
                "edit/efficacy": np.float32(efficacy),
                "edit/specificity": torch.tensor(0.8 - step / 100),
                "edit/prob_gap": efficacy - 0.5,
                "edit/skipped": None,
                "diag/L4/cond": 10.0 ** (step / 10),
                "diag/L5/cond": 5.0 * 10.0 ** (step / 10),
                "diag/L4/weight_norm": 30 + step / 10,
                "diag/L5/weight_norm": 31 + step / 10,
            }, step=step)
        tracker.log_table([{"case_id": "a", "edited": True, "prob": 0.7}], "tables/per_edit_results.json")
        tracker.log_table([{"case_id": "b", "edited": False, "prob": 0.2, "tokens": [1, 2]}],
                          "tables/per_edit_results.json")
        assert tracker.log_curves() == "plots/metrics_vs_edits.png"
        assert tracker.log_curves("plots/diagnostics_vs_edits.png", prefixes=("diag/",)) is not None
        assert tracker.log_curves("plots/none.png", prefixes=("general/",)) is None
        tracker.log_dict({"config": CONFIG}, "config/config.json")
        tracker.log_text("hello", "notes/readme.txt")
        tracker.set_tags({"status_note": "done", "edits": 40})
        run_id = tracker.run_id
        assert tracker.metric_history["edit/efficacy"] == [(10, 1.0), (20, pytest.approx(0.9)), (40, pytest.approx(0.7))]

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "memit-seed0"
    assert run.data.params["edits.batch_size"] == "10"
    assert run.data.params["edits.layers"] == "[4,5,6]"
    assert run.data.params["model.name"] == "smollm2-135m"
    assert run.data.tags["method"] == "memit"
    assert run.data.tags["status_note"] == "done" and run.data.tags["edits"] == "40"
    assert "edit/skipped" not in run.data.metrics

    efficacy = client.get_metric_history(run_id, "edit/efficacy")
    assert [(metric.step, round(metric.value, 5)) for metric in efficacy] == [(10, 1.0), (20, 0.9), (40, 0.7)]
    assert [metric.step for metric in client.get_metric_history(run_id, "diag/L5/cond")] == [10, 20, 40]
    assert client.get_metric_history(run_id, "edit/specificity")[-1].value == pytest.approx(0.4)

    artifacts = _artifact_paths(client, run_id)
    assert {"tables/per_edit_results.json", "tables/per_edit_results.csv", "plots/metrics_vs_edits.png",
            "plots/diagnostics_vs_edits.png", "config/config.json", "notes/readme.txt"} <= artifacts
    assert "plots/none.png" not in artifacts

    download = Path(client.download_artifacts(run_id, "", dst_path=str(tmp_path / "download")))
    table = json.loads((download / "tables/per_edit_results.json").read_text())
    assert [row[0] for row in table["data"]] == ["a", "b"]  # the second call appended
    csv_lines = (download / "tables/per_edit_results.csv").read_text().splitlines()
    assert csv_lines[0] == "case_id,edited,prob,tokens"
    assert csv_lines[1:] == ["a,True,0.7,", 'b,False,0.2,"[1,2]"']
    for plot in ("plots/metrics_vs_edits.png", "plots/diagnostics_vs_edits.png"):
        path = download / plot
        assert path.stat().st_size > 1000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_tracker_marks_failed_run_and_reraises(tracking_uri, client):
    with pytest.raises(RuntimeError, match="solver diverged"):
        with TrialTracker(tracking_uri, EXPERIMENT, "failing", params={"a": 1}) as tracker:
            tracker.log_metrics({"edit/efficacy": 0.5}, step=1)
            run_id = tracker.run_id
            raise RuntimeError("solver diverged " + "x" * 5000)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    reason = run.data.tags["failure_reason"]
    assert reason.startswith("RuntimeError: solver diverged") and len(reason) <= 1000 and "truncated" in reason
    assert "failure/traceback.txt" in _artifact_paths(client, run_id)


def test_tracker_nests_under_parent_run(tracking_uri, client):
    with TrialTracker(tracking_uri, EXPERIMENT, "grid", params={}) as parent:
        with TrialTracker(tracking_uri, EXPERIMENT, "trial-0", params={"seed": 0},
                          parent_run_id=parent.run_id) as child:
            child_id = child.run_id
        parent_id = parent.run_id
    assert client.get_run(child_id).data.tags["mlflow.parentRunId"] == parent_id
    assert "mlflow.parentRunId" not in client.get_run(parent_id).data.tags
    with pytest.raises(TrackingConfigError, match="not the one its grid's driver opened: it holds no run"):
        with TrialTracker(tracking_uri, EXPERIMENT, "orphan", params={}, parent_run_id="0" * 32):
            pass


def test_a_trial_on_a_node_without_the_grids_sqlite_file_refuses_before_creating_one(tracking_uri, tmp_path):
    """A sqlite path that is not shared between nodes: the trial must not create a database its driver never reads."""
    with TrialTracker(tracking_uri, EXPERIMENT, "grid", params={}) as parent:
        parent_id = parent.run_id
    elsewhere = tmp_path / "node-local" / "mlflow.db"
    with pytest.raises(TrackingConfigError) as info:
        with TrialTracker(f"sqlite:///{elsewhere}", EXPERIMENT, "trial-0", params={}, parent_run_id=parent_id):
            pass
    assert f"{elsewhere} does not exist on this node" in str(info.value)
    assert "--mlflow-server" in str(info.value)
    assert not elsewhere.exists() and not elsewhere.parent.exists()


def test_tracker_rejects_use_outside_context_and_bad_values(tracking_uri):
    tracker = TrialTracker(tracking_uri, EXPERIMENT, "unused", params={})
    with pytest.raises(RuntimeError, match="context manager|with TrialTracker"):
        tracker.log_metrics({"x": 1.0}, step=0)
    with TrialTracker(tracking_uri, EXPERIMENT, "bad-values", params={}) as tracker:
        with pytest.raises(TypeError, match="metric 'edit/name' must be a number"):
            tracker.log_metrics({"edit/name": "high"}, step=0)
        with pytest.raises(ValueError, match=r"\.json or \.parquet"):
            tracker.log_table([{"a": 1}], "tables/results.csv")
        tracker.log_metrics({"edit/nan": math.nan}, step=0)  # NaN is a valid MLflow value


# ---------------------------------------------------------------------------------------------------------------
# The MLflow UI opens on the runs table
# ---------------------------------------------------------------------------------------------------------------

def test_experiments_are_marked_model_training_and_links_ask_for_that_face(tmp_path):
    from mlflow import MlflowClient

    from grid.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, ui_url

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = prepare_store(uri, "created-by-editgrid")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = client.create_experiment("created-before")  # an experiment without the tag gets it
    assert prepare_store(uri, "created-before") == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    client.set_experiment_tag(older, EXPERIMENT_KIND_TAG, "genai_development")  # a user's own choice stays
    prepare_store(uri, "created-before")
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    assert ui_url(uri, "7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert ui_url("http://host:5001/", "7", "abc") == ("http://host:5001/#/experiments/7/runs/abc"
                                                       "?workflowType=machine_learning")
    assert ui_url("postgresql://db/mlflow", "7") is None


def test_grid_parent_run_says_how_to_compare_and_the_printed_links_reach_it(tmp_path, capsys):
    from mlflow import MlflowClient

    from grid.config import expand_trials, load_config
    from grid.gridrun import NOTE_TAG, open_grid_run
    from grid.launch import _print_where

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg, source = load_config(None, ["experiment=ui-links"])
    trials = expand_trials(cfg, source)
    grid = open_grid_run(uri, trials, cfg, source)
    note = MlflowClient(tracking_uri=uri).get_run(grid.run_id).data.tags[NOTE_TAG]
    assert f"expand this run (the **+** beside `grid-{grid.grid_id}`)" in note and "**Compare**" in note
    assert "`step` = edits applied" in note
    _print_where(uri, "ui-links", grid_trials=trials)
    out = capsys.readouterr().out
    runs = f"http://127.0.0.1:5000/#/experiments/{grid.experiment_id}/runs"
    assert f"the grid's runs (expand grid-{grid.grid_id} to compare its trials): {runs}?workflowType=machine_learning" in out
    assert f"its parent run: {runs}/{grid.run_id}?workflowType=machine_learning" in out
