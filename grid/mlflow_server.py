"""``launch.py --mlflow-server``: the driver serves its SQLite store with ``mlflow server`` and every trial logs over
HTTP, so exactly one process ever opens the database file (ENVIRONMENT.md: trials that open a fresh SQLite file
at once race on the schema migration; over HTTP there is nothing to race) and trials on other nodes can log
without a shared file system.

The driver first creates the schema and the grid's experiment itself. A new experiment keeps its artifacts behind
the server (``mlflow-artifacts:/<experiment>``, stored in ``<database folder>/mlartifacts``), so workers upload
them through it; an experiment created earlier without the server keeps its file location, which only works on
one machine or shared storage. The server stops when the grid ends.

The server runs in a session of its own (its uvicorn worker, job runner and huey consumers all in one process
group), and the driver stops that whole group: when the grid ends, and when the driver is stopped by SIGTERM or
SIGINT (grid/launch.py turns both into ``DriverInterrupted``, so the ``with`` block exits). Only a SIGKILL of the
driver can leave it behind, so the driver records what it started in ``<database>.server.json`` next to the
database (server pid = process group, port, host, store, driver pid and start time), and the next
``--mlflow-server`` run on the same database checks that record before it touches the store:

* the recorded driver still runs (same pid and start time): refuse, naming that driver and the server's pid and
  port (log to it with ``--tracking-uri http://<host>:<port>``, or wait for that grid to end);
* the driver is gone and the recorded server still runs (an ``mlflow server`` of this very store): it is stale
  and ours, so its process group is stopped (SIGTERM, then SIGKILL after 20 s) and a fresh server started; it is
  not reused, because nothing would own it and it keeps the host, port and log of the run that died;
* the record names another machine (shared storage): refuse, as its processes cannot be checked from here;
* an ``mlflow server``/``mlflow ui`` of the same store that no record names (started by hand, or left by a driver
  older than this record): refuse with its pid and port — it is not ours to stop.

The check and the start happen under ``<database>.server.lock``, so two drivers starting at once cannot both
start a server. So at most one server ever serves a database, and after a SIGKILL the next run cleans up.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from grid.tracking import ARTIFACTS_FOLDER_NAME, TrackingConfigError, prepare_store, sqlite_database_path

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
RECORD_SUFFIX = ".server.json"  # <database>.server.json: the server this database is served by
START_LOCK_SUFFIX = ".server.lock"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def advertised_host(host: str) -> str:
    """The address trials should connect to: the bind address, or this node's address when bound to all."""
    return socket.gethostbyname(socket.gethostname()) if host in ("0.0.0.0", "") else host


class MlflowServer:
    """``with MlflowServer(sqlite_uri, experiment) as server:`` … log to ``server.uri`` … (stopped on exit)."""

    def __init__(self, tracking_uri: str, experiment: str, host: str = "127.0.0.1", port: int | None = None,
                 workers: int = 1):
        self.database = sqlite_database_path(tracking_uri)
        if self.database is None:
            raise TrackingConfigError(f"--mlflow-server serves a SQLite store (sqlite:///path.db); got "
                                      f"{tracking_uri!r}. For a remote tracking server pass its URL as "
                                      f"--tracking-uri instead.")
        self.backend_uri = tracking_uri
        self.experiment = experiment
        self.host = host
        self.port = port or free_port(host if host not in ("0.0.0.0", "") else "127.0.0.1")
        self.workers = workers
        self.uri = f"http://{advertised_host(host)}:{self.port}"
        self.log_path = self.database.parent / f"mlflow-server-{self.port}.log"
        self.record_path = self.database.with_name(self.database.name + RECORD_SUFFIX)
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> MlflowServer:
        from filelock import FileLock

        self.database.parent.mkdir(parents=True, exist_ok=True)
        # Held from the check until the server answers and is recorded: a second driver waits, then sees it.
        with FileLock(str(self.database.with_name(self.database.name + START_LOCK_SUFFIX)),
                      timeout=START_TIMEOUT_S + 2 * STOP_TIMEOUT_S + 30):
            check_no_other_server(self.database, self.record_path)
            # Schema and experiment before the server opens the file, so no two processes ever migrate it.
            prepare_store(self.backend_uri, self.experiment, proxied_artifacts=True)
            command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
                       "--artifacts-destination", str(self.database.parent / ARTIFACTS_FOLDER_NAME),
                       "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
            log = open(self.log_path, "w")  # noqa: SIM115 - the server writes to it for its whole life
            # A session of its own: its workers share its process group, which stop() signals as a whole.
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            try:
                self._write_record()
                self._wait_until_ready()
            except BaseException:
                self.stop()
                raise
        logger.info("MLflow server for %s on %s (log: %s)", self.database, self.uri, self.log_path)
        return self

    def _write_record(self) -> None:
        record = {"server_pid": self._process.pid, "port": self.port, "host": self.host, "uri": self.uri,
                  "backend_store_uri": self.backend_uri, "database": str(self.database),
                  "hostname": socket.gethostname(), "driver_pid": os.getpid(),
                  "driver_started": _process_start_time(os.getpid()), "log": str(self.log_path),
                  "started_at": time.time()}
        tmp = self.record_path.with_name(f".{self.record_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.record_path)

    def _remove_record(self) -> None:
        record = read_record(self.record_path)
        if record is not None and record.get("server_pid") == (self._process.pid if self._process else None):
            self.record_path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def _wait_until_ready(self) -> None:
        deadline = time.time() + START_TIMEOUT_S
        health = f"http://127.0.0.1:{self.port}/health" if self.host in ("0.0.0.0", "") else f"{self.uri}/health"
        while time.time() < deadline:
            if self._process.poll() is not None:
                raise TrackingConfigError(f"mlflow server exited with code {self._process.returncode} before it "
                                          f"was ready; its output:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TrackingConfigError(f"mlflow server on port {self.port} did not answer {health} within "
                                  f"{START_TIMEOUT_S:.0f} s; its output:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def stop(self) -> None:
        """Stop the server's whole process group (the CLI, uvicorn, the job runner and its huey consumers) and
        wait until none of it is left; then drop the record."""
        if self._process is None:
            return
        # The leader may be gone while its workers still run: signal the group whatever the leader's state.
        stop_process_group(self._process.pid, reap=self._process)
        self._remove_record()


# ---------------------------------------------------------------------------------------------------------------
# Process groups, the record of the server a database is served by, and stale servers
# ---------------------------------------------------------------------------------------------------------------

def _psutil():
    import psutil  # a dependency of accelerate (and of Ray's dashboard), so always installed with EditGrid

    return psutil


def _process_start_time(pid: int) -> float | None:
    try:
        return _psutil().Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return None


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``."""
    psutil = _psutil()
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def stop_process_group(pgid: int, reap: subprocess.Popen | None = None, timeout: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM process group ``pgid``, wait until no live member is left, SIGKILL it after ``timeout`` seconds.
    ``reap``: the group leader when it is our child (so it does not stay a zombie). True when the group is gone."""
    def signal_group(sig) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    signal_group(signal.SIGTERM)
    deadline = time.time() + timeout
    for sig in (None, signal.SIGKILL):
        if sig is not None:
            logger.warning("process group %d did not stop within %.0f s of SIGTERM: SIGKILL", pgid, timeout)
            signal_group(sig)
            deadline = time.time() + 10
        while time.time() < deadline:
            if reap is not None:
                reap.poll()
            if not group_members(pgid):
                return True
            time.sleep(0.2)
    return not group_members(pgid)


def read_record(path: Path) -> dict | None:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _same_process(pid: int | None, started: float | None) -> bool:
    """Does ``pid`` still name the process that was started at ``started`` (not a reused pid)?"""
    if not pid:
        return False
    now = _process_start_time(pid)
    return now is not None and (started is None or abs(now - started) < 1.0)


def serving_processes(database: Path) -> list[tuple[int, int | None]]:
    """(pid, port) of every ``mlflow server``/``mlflow ui`` on this machine whose backend store is ``database``."""
    psutil = _psutil()
    target = Path(database).resolve()
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info.get("cmdline") or []
        if "--backend-store-uri" not in args or not any("mlflow" in a for a in args[:3]) or \
                not ({"server", "ui"} & set(args)):
            continue
        index = args.index("--backend-store-uri")
        store = sqlite_database_path(args[index + 1]) if index + 1 < len(args) else None
        if store is None or store.resolve() != target:
            continue
        port = None
        if "--port" in args and args.index("--port") + 1 < len(args):
            try:
                port = int(args[args.index("--port") + 1])
            except ValueError:
                port = None
        found.append((proc.pid, port))
    return found


def check_no_other_server(database: Path, record_path: Path) -> None:
    """Make sure no other server serves ``database`` before ours starts: refuse when another driver's server is
    live or an unrecorded one runs; stop a stale one that a killed driver left behind (the module docstring)."""
    record = read_record(record_path)
    if record is not None:
        pid, port, driver = record.get("server_pid"), record.get("port"), record.get("driver_pid")
        where = f"an MLflow server (pid {pid}, port {port}) started by driver pid {driver}"
        if record.get("hostname") != socket.gethostname():
            raise TrackingConfigError(
                f"{database} is recorded as served by {where} on host {record.get('hostname')!r} "
                f"({record_path}); it cannot be checked from this machine. If that server is gone, delete "
                f"{record_path}; if it runs, log to it with --tracking-uri {record.get('uri')} instead of "
                f"--mlflow-server.")
        if driver != os.getpid() and _same_process(driver, record.get("driver_started")):
            raise TrackingConfigError(
                f"{database} is already served by {where}, which is still running: log to it with "
                f"--tracking-uri {record.get('uri')} instead of --mlflow-server, or wait for that grid to end.")
        # Its driver is gone: a server it left is stale. Stop it only if the pid is still an mlflow server of
        # this database (not a pid reused by something else).
        if pid and pid in {p for p, _ in serving_processes(database)}:
            logger.warning("stopping a stale MLflow server (pid %s, port %s) on %s, left by driver pid %s, which "
                           "is no longer running", pid, port, database, driver)
            print(f"EditGrid: stopping the stale MLflow server (pid {pid}, port {port}) that driver pid {driver} "
                  f"left on {database}", file=sys.stderr, flush=True)
            if not stop_process_group(pid):
                raise TrackingConfigError(f"could not stop the stale MLflow server (process group {pid}, port "
                                          f"{port}) on {database}; stop it (kill -KILL -{pid}) and run again.")
        elif pid and group_members(pid):
            # The leader is gone, its workers are not (they hold no port, but may hold the database).
            logger.warning("stopping what is left of a stale MLflow server's process group %s", pid)
            stop_process_group(pid)
        Path(record_path).unlink(missing_ok=True)
    others = serving_processes(database)
    if others:
        listing = ", ".join(f"pid {pid}, port {port}" for pid, port in others)
        pid, port = others[0]
        try:
            pgid = os.getpgid(pid)
        except OSError:
            pgid = pid
        raise TrackingConfigError(
            f"an MLflow server that EditGrid did not record already serves {database} ({listing}); a second "
            f"server on the same database is not started. Log to it with --tracking-uri http://127.0.0.1:{port} "
            f"instead of --mlflow-server, or stop it (kill -TERM -{pgid}, its process group) and run again.")
