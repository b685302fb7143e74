"""EditGrid command line: validate a grid, run its trials, track everything in MLflow.

    python grid/launch.py                          # the default grid (embedded model, built-in edits)
    editgrid --help                                # the same command, installed by `pip install -e .` / make install
    python grid/launch.py --config configs/x.yaml --set method=alphaedit --set edits.batch_size=10
    python grid/launch.py --local --trial 1        # one trial in this process (debugger-friendly)
    python grid/launch.py --report <grid id>       # rebuild a grid's comparison report from MLflow
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python grid/launch.py --config configs/x.yaml

A grid runs on Ray Tune (the cluster it was submitted to, or a local one) with one MLflow parent run and a child
run per trial; submitting the same grid again skips its finished trials. --no-ray runs them in this process.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

# `python grid/launch.py` puts grid/ first on sys.path, where its modules (config, trial, ...) could shadow
# top-level packages of the same name; the project root is what should be importable.
_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _HERE:
    sys.path[0] = str(_HERE.parent)

from evals.metric_names import (COST_SECONDS_PER_EDIT, EFFICACY, GENERALIZATION, LOCALITY,  # noqa: E402
                                PORTABILITY, SPECIFICITY)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow's own handler ignores our logging config


def build_parser() -> argparse.ArgumentParser:
    prog = "editgrid" if Path(sys.argv[0]).name == "editgrid" else "grid/launch.py"  # the console script or this file
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="grid YAML file (default: the packaged default grid)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set method=memit --set edits.checkpoints=[10,30] "
                             "(repeatable; the value is read as YAML)")
    parser.add_argument("--local", action="store_true", help="run one trial in this process (no Ray)")
    parser.add_argument("--trial", type=int, help="with --local: which trial of the expanded grid to run")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--list", action="store_true", help="print the expanded trials and exit")
    parser.add_argument("--no-ray", action="store_true", help="run the grid's trials one after another in this "
                                                              "process instead of on Ray")
    parser.add_argument("--report", metavar="GRID_ID", help="rebuild the comparison report of a grid from MLflow "
                                                            "and log it to the grid's parent run")
    parser.add_argument("--report-dir", help="also keep the report files in this folder")
    parser.add_argument("--ray-storage", help="Ray Tune's storage folder (default ~/ray_results; shared storage "
                                              "on a multi-node cluster)")
    parser.add_argument("--mlflow-server", action="store_true",
                        help="serve the SQLite store with `mlflow server` while the grid runs and let every trial "
                             "log to it over HTTP (one process owns the database; trials on other nodes need no "
                             "shared file for tracking)")
    parser.add_argument("--mlflow-server-host", default="127.0.0.1",
                        help="with --mlflow-server: the interface it binds (0.0.0.0 or this node's address for "
                             "trials on other nodes; default 127.0.0.1)")
    parser.add_argument("--mlflow-server-port", type=int, help="with --mlflow-server: its port (default: a free one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a configuration or input error "
                                                            "(by default it is one message, grid/errors.py)")
    return parser


def _trial_listing(trials) -> str:
    return "\n".join(f"  {t.index}: {t.name}  ({t.trial_id})" for t in trials)


# -- SIGTERM / SIGINT: stop what the driver started, leave its runs as a resubmission expects ------------------

class DriverInterrupted(BaseException):
    """SIGTERM or SIGINT reached the driver. A BaseException, so a trial's ``except Exception`` lets it through and
    every ``with``/``finally`` on the way out runs: the trial's run is marked FAILED with it as ``failure_reason``
    (grid/tracking.py), the grid's open runs are marked KILLED (``_mark_interrupted``) and the MLflow server the
    driver started is stopped with its whole process group (grid/mlflow_server.py)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"driver stopped by {self.name}")


_SHUTDOWN_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _install_stop_handlers() -> dict:
    """Turn SIGTERM (``ray job stop``, schedulers) and SIGINT (Ctrl-C) into ``DriverInterrupted`` in the main
    thread; a repeated signal while the driver cleans up is ignored (SIGKILL skips the clean-up; the next
    ``--mlflow-server`` run then stops the stale server). Returns what to restore."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    stopping = []

    def handler(signum, frame):
        if stopping:
            print(f"EditGrid: {signal.Signals(signum).name} again: still stopping", file=sys.stderr, flush=True)
            return
        stopping.append(signum)
        # The clean-up talks to the tracking server: fail fast instead of retrying for minutes if it is gone.
        os.environ.update(_SHUTDOWN_ENV)
        raise DriverInterrupted(signum)

    # Ray Tune would otherwise take SIGINT for a graceful stop that reports the interrupted trials as done.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    previous = {"env": {key: os.environ.get(key) for key in _SHUTDOWN_ENV}}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_stop_handlers(previous: dict) -> None:
    for key, value in previous.pop("env", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _interruption(err: BaseException) -> DriverInterrupted | None:
    """``err`` itself or the ``DriverInterrupted`` behind it: Ray's compiled core checks signals itself and hands
    a handler's exception on wrapped in a SystemError (``tuner.fit`` waiting in ``ray.wait``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DriverInterrupted):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _mark_interrupted(grid, stop: DriverInterrupted) -> None:
    """The grid's child runs still RUNNING (Ray trials whose workers die with the driver) and its parent run →
    KILLED with the reason; a resubmission finds the parent by its grid id and supersedes every child that did not
    finish, continuing from its trial checkpoint (grid/gridrun.py, grid/trial.py)."""
    from grid.gridrun import child_runs

    try:
        client = grid.client()
        for run in child_runs(grid.tracking_uri, grid.experiment_id, grid.run_id):
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "failure_reason", str(stop))
                client.set_terminated(run.info.run_id, status="KILLED")
        client.set_tag(grid.run_id, "editgrid.interrupted", str(stop))
        client.set_terminated(grid.run_id, status="KILLED")
    except Exception as err:  # noqa: BLE001 - the server may be gone already; the resume logic copes with RUNNING
        print(f"EditGrid: could not mark the grid's runs as interrupted: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The command line; stopped by SIGTERM or SIGINT it cleans up (``DriverInterrupted``), prints one line on
    stderr and returns 128 + the signal's number."""
    previous = _install_stop_handlers()
    try:
        return _main(argv)
    except BaseException as err:
        stop = _interruption(err)
        if stop is None:
            raise
        print(f"error: {stop}: its runs are marked interrupted and the processes it started are stopped; submit "
              f"the same command again to resume the grid", file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        _restore_stop_handlers(previous)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except Exception as err:
        from grid.errors import error_message, is_user_error

        if args.debug or not is_user_error(err):  # a bug keeps its traceback
            raise
        print(error_message(err), file=sys.stderr, flush=True)
        return 2


def configure_logging() -> None:
    """EditGrid's INFO lines (resumes, superseded runs, cache builds) shown; the libraries' chatter is not. Called by
    the driver and by every trial process Ray starts (grid/ray_runner.py), whose logging is otherwise unset."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "httpx", "urllib3", "filelock", "faiss", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _dispatch(args) -> int:
    configure_logging()

    from grid.config import ConfigError, expand_trials, load_config
    from grid.tracking import TrackingConfigError, resolve_tracking_uri

    if args.report:
        return _report(args.report, resolve_tracking_uri(args.tracking_uri), args.report_dir)
    try:
        cfg, source = load_config(args.config, args.overrides)
        trials = expand_trials(cfg, source, check_depth=True)
        tracking_uri = resolve_tracking_uri(args.tracking_uri)
    except (ConfigError, TrackingConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.list:
        print(f"{len(trials)} trial(s) from {source}:\n{_trial_listing(trials)}")
        return 0
    if args.trial is not None and not args.local:
        print("error: --trial selects the trial to run with --local", file=sys.stderr)
        return 2
    if args.local:
        return _run_local(args, trials, tracking_uri)
    if args.mlflow_server:
        from grid.mlflow_server import MlflowServer

        try:
            server = MlflowServer(tracking_uri, trials[0].config["experiment"], host=args.mlflow_server_host,
                                  port=args.mlflow_server_port)
            with server:
                print(f"MLflow server: {server.uri} serves {tracking_uri} (log: {server.log_path})", flush=True)
                code = _run_grid(args, cfg, source, trials, server.uri)
        except TrackingConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        _print_where(tracking_uri, trials[0].config["experiment"], grid_trials=trials)
        return code
    code = _run_grid(args, cfg, source, trials, tracking_uri)
    _print_where(tracking_uri, trials[0].config["experiment"], grid_trials=trials)
    return code


def _run_grid(args, cfg: dict, source: str, trials, tracking_uri: str) -> int:
    """Open (or find) the grid's parent run, run its unfinished trials, write the report; the exit code."""
    from grid.gridrun import close_grid_run, finished_trial_ids, open_grid_run
    from grid.ray_runner import run_in_process, run_on_ray
    from grid.report import write_report

    grid = open_grid_run(tracking_uri, trials, cfg, source)
    done = finished_trial_ids(grid)
    pending = [t for t in trials if t.trial_id not in done]
    print(f"EditGrid: grid {grid.grid_id} ({'resumed' if grid.resumed else 'new'}), {len(trials)} trial(s) from "
          f"{source}, {len(trials) - len(pending)} already finished\n{_trial_listing(trials)}\n"
          f"tracking: {tracking_uri} (parent run {grid.run_id})", flush=True)
    if pending:
        try:
            if args.no_ray:
                outcomes = run_in_process(pending, grid, progress=not args.no_progress)
            else:
                outcomes = run_on_ray(pending, grid, cfg["ray"], storage_path=args.ray_storage)
        except BaseException as err:
            stop = _interruption(err)
            if stop is None:
                raise
            _mark_interrupted(grid, stop)
            raise stop from None
    else:
        outcomes = []
    failures = [o for o in outcomes if not o.finished]
    close_grid_run(grid, all_finished=not failures)
    rows, written = write_report(tracking_uri, grid.grid_id, args.report_dir)
    _print_summary(rows)
    print(f"\nComparison report (parent run {grid.run_id}): report/comparison.csv, report/comparison.json, "
          f"{', '.join(f'report/{p.name}' for k, p in written.items() if k not in ('csv', 'table'))}")
    if failures:
        print(f"{len(failures)} trial(s) failed: " + ", ".join(f"{o.trial.name} ({o.error})" for o in failures),
              file=sys.stderr)
        return 1
    return 0


SUMMARY_COLUMNS = (EFFICACY, GENERALIZATION, SPECIFICITY, LOCALITY, PORTABILITY, COST_SECONDS_PER_EDIT)


def _print_summary(rows: list[dict]) -> None:
    from grid.tracking import format_summary_table

    table = [{"trial": r["trial"], "status": r["status"], "edits": r["edits"],
              **{c: r.get(c) for c in SUMMARY_COLUMNS}} for r in rows]
    if table:
        present = [c for c in table[0] if any(r.get(c) is not None for r in table)]
        print("\n" + format_summary_table(table, columns=present))


def _print_where(tracking_uri: str, experiment: str, grid_trials=None, run_id: str | None = None) -> None:
    """Where the results are, and the UI pages to open: the grid's runs table and parent run (``grid_trials``) or
    a --local trial's run (``run_id``), on the UI's model-training face (grid/tracking.py: ui_url)."""
    from grid.gridrun import grid_id_of, ui_links

    print(f"\nResults are in MLflow: {tracking_uri} (experiment {experiment!r}).")
    if tracking_uri.startswith("sqlite:"):
        print(f"Open the UI with:  mlflow ui --backend-store-uri {tracking_uri}")
    grid_id = grid_id_of(grid_trials) if grid_trials else None
    for what, url in ui_links(tracking_uri, experiment, grid_id=grid_id, run_id=run_id):
        print(f"  {what}: {url}")


def _report(grid_id: str, tracking_uri: str, out_dir: str | None) -> int:
    from grid.report import ReportError, write_report

    try:
        rows, written = write_report(tracking_uri, grid_id, out_dir)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_summary(rows)
    print("\nreport files: " + ", ".join(str(p) for p in written.values()))
    return 0


def _run_local(args, trials, tracking_uri) -> int:
    """One trial in this process, without a parent run (for debugging; --debug shows an input error's traceback)."""
    if args.trial is None and len(trials) > 1:
        print(f"error: the grid expands to {len(trials)} trials; pick one with --trial N:\n"
              f"{_trial_listing(trials)}", file=sys.stderr)
        return 2
    index = args.trial or 0
    if not 0 <= index < len(trials):
        print(f"error: --trial {index} is out of range; the grid has:\n{_trial_listing(trials)}", file=sys.stderr)
        return 2
    trial = trials[index]
    from grid.tracking import prepare_store
    from grid.trial import run_trial

    prepare_store(tracking_uri, trial.config["experiment"])
    print(f"EditGrid: trial {trial.index} {trial.name} ({trial.trial_id}), tracking: {tracking_uri}", flush=True)
    result = run_trial(trial, tracking_uri, progress=not args.no_progress)
    rows = [{"trial": trial.name, "status": "FINISHED", "edits": row["step"], **{c: row.get(c) for c in SUMMARY_COLUMNS}}
            for row in result.checkpoints]
    _print_summary(rows)
    _print_where(tracking_uri, trial.config["experiment"], run_id=result.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
