"""``launch.py --mlflow-server``: the driver serves its SQLite store with ``mlflow server`` and every trial logs over
HTTP, so exactly one process ever opens the database file (ENVIRONMENT.md: trials that open a fresh SQLite file
at once race on the schema migration; over HTTP there is nothing to race) and trials on other nodes can log
without a shared file system.

The driver first creates the schema and the grid's experiment itself. A new experiment keeps its artifacts behind
the server (``mlflow-artifacts:/<experiment>``, stored in ``<database folder>/mlartifacts``), so workers upload
them through it; an experiment created earlier without the server keeps its file location, which only works on
one machine or shared storage. The server stops when the grid ends.
"""

from __future__ import annotations

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
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> MlflowServer:
        # Schema and experiment before the server opens the file, so no two processes ever migrate it.
        prepare_store(self.backend_uri, self.experiment, proxied_artifacts=True)
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
                   "--artifacts-destination", str(self.database.parent / ARTIFACTS_FOLDER_NAME),
                   "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
        log = open(self.log_path, "w")  # noqa: SIM115 - the server writes to it for its whole life
        self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("MLflow server for %s on %s (log: %s)", self.database, self.uri, self.log_path)
        return self

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
        if self._process is None or self._process.poll() is not None:
            return
        # The CLI starts uvicorn workers of its own: signal the whole session it leads.
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
