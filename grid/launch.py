"""EditGrid command line: validate a grid, run its trials, track everything in MLflow.

    python grid/launch.py                          # the default grid (embedded model, built-in edits)
    python grid/launch.py --config configs/x.yaml --set method=alphaedit --set edits.batch_size=10
    python grid/launch.py --local --trial 1        # one trial in this process (debugger-friendly)

Without --local the trials run one after another in this process (Ray scheduling is a separate step).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# `python grid/launch.py` puts grid/ first on sys.path, where its modules (config, trial, ...) could shadow
# top-level packages of the same name; the project root is what should be importable.
_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _HERE:
    sys.path[0] = str(_HERE.parent)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow's own handler ignores our logging config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grid/launch.py", description=__doc__.split("\n\n")[0],
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _trial_listing(trials) -> str:
    return "\n".join(f"  {t.index}: {t.name}  ({t.trial_id})" for t in trials)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "httpx", "urllib3", "filelock", "faiss", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from grid.config import ConfigError, expand_trials, layer_problems, load_config
    from grid.tracking import TrackingConfigError, format_summary_table, prepare_store, resolve_tracking_uri

    try:
        cfg, source = load_config(args.config, args.overrides)
        trials = expand_trials(cfg, source)
        depth_problems = layer_problems(trials)
        if depth_problems:
            raise ConfigError(source, depth_problems)
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
        if args.trial is None and len(trials) > 1:
            print(f"error: the grid expands to {len(trials)} trials; pick one with --trial N:\n"
                  f"{_trial_listing(trials)}", file=sys.stderr)
            return 2
        index = args.trial or 0
        if not 0 <= index < len(trials):
            print(f"error: --trial {index} is out of range; the grid has:\n{_trial_listing(trials)}",
                  file=sys.stderr)
            return 2
        trials = [trials[index]]

    from grid.trial import run_trial

    prepare_store(tracking_uri, trials[0].config["experiment"])  # once, before any trial opens the store
    print(f"EditGrid: {len(trials)} trial(s) from {source}\n{_trial_listing(trials)}\ntracking: {tracking_uri}",
          flush=True)
    rows, failures = [], []
    for trial in trials:
        try:
            result = run_trial(trial, tracking_uri, progress=not args.no_progress)
        except Exception as err:  # noqa: BLE001 - one failed trial must not stop the grid; it is marked FAILED
            logging.getLogger("editgrid").error("trial %s failed: %s: %s", trial.name, type(err).__name__, err)
            failures.append((trial, err))
            if args.local:
                raise
            continue
        for row in result.checkpoints:
            rows.append({"trial": trial.name, "edits": row["step"],
                         **{k: row.get(k) for k in ("edit/efficacy", "edit/generalization", "edit/specificity",
                                                    "edit/locality", "edit/portability", "vstar/target_prob",
                                                    "cost/seconds_per_edit")}})

    if rows:
        present = [c for c in rows[0] if any(r.get(c) is not None for r in rows)]
        print("\n" + format_summary_table(rows, columns=present))
    print(f"\nResults are in MLflow: {tracking_uri} (experiment {trials[0].config['experiment']!r}).")
    if tracking_uri.startswith("sqlite:"):
        print(f"Open the UI with:  mlflow ui --backend-store-uri {tracking_uri}  (then http://127.0.0.1:5000)")
    if failures:
        print(f"{len(failures)} trial(s) failed: " + ", ".join(f"{t.name} ({type(e).__name__}: {e})"
                                                             for t, e in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
