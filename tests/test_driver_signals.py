"""No orphans, no stale servers (grid/launch.py, grid/mlflow_server.py): a `--no-ray --mlflow-server` driver stopped
by SIGTERM stops its MLflow server's whole process group (uvicorn, job runner, huey consumers), frees the port,
marks its runs interrupted and exits 143; after a SIGKILL of the driver alone the next run finds the server it
left through `<database>.server.json`, stops it and finishes the grid. Both end with exactly one FINISHED child
run per cell. Plus the refusals, on fake processes: a live driver's server, an unrecorded server of the same
store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from grid.mlflow_server import RECORD_SUFFIX, check_no_other_server, group_members, serving_processes
from grid.tracking import TrackingConfigError

ROOT = Path(__file__).resolve().parents[1]
CELLS = 2


def _sets(overrides):
    return [item for o in overrides for item in ("--set", o)]


def _command(tmp_path, model_dir, corpus) -> list[str]:
    # Two cells of a tiny MEMIT trial (4 single edits, v* 5 steps, checkpoints at 2 and 4): several seconds each.
    return [sys.executable, str(ROOT / "grid" / "launch.py"), "--no-ray", "--no-progress", "--mlflow-server",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *_sets([
                f"model={model_dir}", "method=memit", "data.limit=4", "edits.batch_size=1",
                "edits.checkpoints=[2, 4]", f"stats.corpus={corpus}", "stats.num_tokens=2000",
                "eval.scr_latency_queries=0", "hparams.layers=[1, 2]", "hparams.v_num_grad_steps=5",
                "grid={hparams.v_lr: [0.5, 0.4]}",
                f"cache_dir={tmp_path / 'cache'}", f"checkpoints.dir={tmp_path / 'trial_checkpoints'}"])]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _runs(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("editgrid-default")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return ([r for r in runs if r.data.tags.get("editgrid.role") == "grid"],
            [r for r in runs if r.data.tags.get("editgrid.role") == "trial"])


def _port_is_free(port: int) -> bool:
    """Nothing listens on it, and a new server could bind it (SO_REUSEADDR, as uvicorn: connections the old
    server closed may linger in TIME_WAIT)."""
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


def _start_driver_until_a_trial_runs(tmp_path, command):
    """Start the driver; return it, its output file, and its server's (pid = pgid, port) once a trial logs."""
    log_path = tmp_path / "driver-1.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    record_path = tmp_path / f"mlflow.db{RECORD_SUFFIX}"
    deadline = time.time() + 150
    try:
        while time.time() < deadline:
            time.sleep(1)
            assert driver.poll() is None, f"the driver ended early:\n{log_path.read_text()[-3000:]}"
            if "MLflow server: " not in log_path.read_text():
                continue
            record = json.loads(record_path.read_text())
            assert record["driver_pid"] == driver.pid
            try:
                _, children = _runs(record["uri"])
            except Exception:  # noqa: BLE001 - the experiment may still be being created
                continue
            # A trial has evaluated its first checkpoint (so it holds a trial checkpoint) and is still running.
            if any(c.info.status == "RUNNING" and c.data.metrics for c in children):
                return driver, log_path, record["server_pid"], record["port"]
        pytest.fail(f"no trial ran within 150 s:\n{log_path.read_text()[-3000:]}")
    except BaseException:
        driver.kill()
        driver.wait()
        raise


def _assert_one_finished_child_per_cell(uri: str) -> None:
    (parent,), children = _runs(uri)
    assert parent.info.status == "FINISHED"
    assert len(children) == CELLS and all(c.info.status == "FINISHED" for c in children), \
        [(c.info.run_name, c.info.status) for c in children]
    assert len({c.data.tags["editgrid.trial_id"] for c in children}) == CELLS


def _server_group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return not group_members(pgid)  # only zombies left, waiting for init to reap them


@pytest.mark.slow  # two drivers, a real MLflow server: about a minute (two on a loaded 2-core machine)
def test_sigterm_stops_the_server_group_marks_the_runs_and_a_rerun_finishes(tmp_path, tiny_llama_dir,
                                                                            small_corpus):
    command = _command(tmp_path, tiny_llama_dir, small_corpus)
    driver, log_path, pgid, port = _start_driver_until_a_trial_runs(tmp_path, command)
    members = group_members(pgid)
    assert pgid in members and len(members) >= 3  # the CLI, uvicorn, the job runner and its huey consumers
    driver.send_signal(signal.SIGTERM)
    try:
        code = driver.wait(timeout=90)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = log_path.read_text()
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("error: driver stopped by SIGTERM")
    assert _server_group_is_gone(pgid), f"left behind: {group_members(pgid)}"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in members)
    assert _port_is_free(port)
    assert not (tmp_path / f"mlflow.db{RECORD_SUFFIX}").exists()

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (parent,), children = _runs(uri)
    assert parent.info.status == "KILLED" and parent.data.tags["editgrid.interrupted"] == "driver stopped by SIGTERM"
    (interrupted,) = [c for c in children if c.info.status != "FINISHED"]
    assert interrupted.info.status == "FAILED"
    assert interrupted.data.tags["failure_reason"] == "DriverInterrupted: driver stopped by SIGTERM"

    again = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "resumed" in again.stdout
    _assert_one_finished_child_per_cell(uri)
    assert interrupted.info.run_id not in {c.info.run_id for c in _runs(uri)[1]}  # superseded


@pytest.mark.slow  # two drivers, a real MLflow server: about a minute (two on a loaded 2-core machine)
def test_sigkill_leaves_a_stale_server_that_the_next_run_stops(tmp_path, tiny_llama_dir, small_corpus):
    command = _command(tmp_path, tiny_llama_dir, small_corpus)
    database = tmp_path / "mlflow.db"
    driver, log_path, pgid, port = _start_driver_until_a_trial_runs(tmp_path, command)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    try:
        assert group_members(pgid) and not _port_is_free(port)  # nothing could clean up: the server lives on
        assert [pid for pid, _ in serving_processes(database)] == [pgid]

        again = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
        assert (f"stopping the stale MLflow server (pid {pgid}, port {port}) that driver pid {driver.pid} left"
                in again.stderr)
        assert _server_group_is_gone(pgid)
        _assert_one_finished_child_per_cell(f"sqlite:///{database}")
        # The rerun's own server is gone too, and with it the record.
        assert serving_processes(database) == []
        assert not (tmp_path / f"mlflow.db{RECORD_SUFFIX}").exists()
    finally:
        if group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# The record's other cases, on fake processes (seconds)
# ---------------------------------------------------------------------------------------------------------------

def _fake_server(tmp_path, database: Path, port: int) -> subprocess.Popen:
    """A process whose command line reads `mlflow server --backend-store-uri sqlite:///<database> --port <port>`,
    in a session of its own like the real one."""
    script = tmp_path / "mlflow"
    script.write_text("import time\ntime.sleep(120)\n")
    return subprocess.Popen([sys.executable, str(script), "server", "--backend-store-uri", f"sqlite:///{database}",
                             "--port", str(port)], start_new_session=True)


def _write_record(database: Path, **record) -> Path:
    path = database.with_name(database.name + RECORD_SUFFIX)
    path.write_text(json.dumps({"hostname": socket.gethostname(), "uri": "http://127.0.0.1:5999", **record}))
    return path


def test_a_live_drivers_server_is_refused_with_its_pid_and_port(tmp_path, capsys):
    from grid.launch import main

    database = tmp_path / "mlflow.db"
    other_driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_record(database, server_pid=4242, port=5999, driver_pid=other_driver.pid,
                      driver_started=psutil.Process(other_driver.pid).create_time())
        code = main(["--no-ray", "--tracking-uri", f"sqlite:///{database}", "--mlflow-server",
                     "--set", "method=scr", "--set", "data.limit=2",
                     "--set", "edits.checkpoints=[2]"])
    finally:
        other_driver.kill()
        other_driver.wait()
    assert code == 2
    err = capsys.readouterr().err
    assert "already served by an MLflow server (pid 4242, port 5999)" in err
    assert f"driver pid {other_driver.pid}, which is still running" in err
    assert not database.exists()  # refused before anything opened the store


def test_a_stale_recorded_server_is_stopped_and_an_unrecorded_one_refused(tmp_path):
    database = tmp_path / "mlflow.db"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = _fake_server(tmp_path, database, 5998)
    try:
        deadline = time.time() + 10
        while not serving_processes(database) and time.time() < deadline:
            time.sleep(0.1)
        record = _write_record(database, server_pid=stale.pid, port=5998, driver_pid=dead.pid, driver_started=1.0)
        check_no_other_server(database, record)  # its driver is gone: stopped, record dropped
        assert stale.wait(timeout=5) == -signal.SIGTERM
        assert not record.exists()

        # A record whose server pid is no longer an mlflow server of this store: dropped, nothing signalled.
        record = _write_record(database, server_pid=dead.pid, port=5997, driver_pid=dead.pid, driver_started=1.0)
        check_no_other_server(database, record)
        assert not record.exists()

        unrecorded = _fake_server(tmp_path, database, 5996)
        try:
            deadline = time.time() + 10
            while not serving_processes(database) and time.time() < deadline:
                time.sleep(0.1)
            with pytest.raises(TrackingConfigError, match=rf"pid {unrecorded.pid}, port 5996.*--tracking-uri "
                                                          rf"http://127.0.0.1:5996.*kill -TERM -{unrecorded.pid}"):
                check_no_other_server(database, record)
            assert unrecorded.poll() is None  # not ours: left alone
        finally:
            unrecorded.kill()
            unrecorded.wait()
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()
