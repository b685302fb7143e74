"""The grid as a whole: the ray: section, one MLflow parent run per grid with a child per trial, the comparison
report, resubmission and resume after a killed driver, and a real `ray job submit` to a local head started with
token authentication (a trial forced to fail is recorded, the grid completes)."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grid.config import ConfigError, expand_trials, load_config, trial_resources
from grid.gridrun import grid_id_of

ROOT = Path(__file__).resolve().parents[1]
TINY = ["method=scr", "data.limit=4", "edits.batch_size=2", "edits.checkpoints=[4]", "eval.scr_latency_queries=0"]


def _sets(overrides):
    return [item for o in overrides for item in ("--set", o)]


# ---------------------------------------------------------------------------------------------------------------
# Configuration (no model)
# ---------------------------------------------------------------------------------------------------------------

def test_ray_section_is_validated_with_every_problem_listed():
    cfg, source = load_config(None, ["ray.cpus_per_trial=-1", "ray.max_failures=-1", "ray.bogus=1",
                                     "ray.by_model={smollm2-135m: {cpus: -2, tpus: 1}}",
                                     "ray.max_concurrent_trials=0"])
    with pytest.raises(ConfigError) as info:
        expand_trials(cfg, source)
    message = str(info.value)
    for expected in ("ray.cpus_per_trial: -1 must be a number >= 0", "ray.max_failures: -1 must be an integer >= 0",
                     "ray.bogus: unknown key", "ray.by_model.smollm2-135m: must be a mapping with cpus and/or gpus",
                     "ray.max_concurrent_trials: 0 must be an integer >= 1"):
        assert expected in message


def test_ray_settings_change_neither_trial_ids_nor_the_grid_id():
    plain = expand_trials(*load_config(None, []))
    other = expand_trials(*load_config(None, ["ray.cpus_per_trial=2", "ray.gpus_per_trial=0.25"]))
    assert [t.trial_id for t in plain] == [t.trial_id for t in other]
    assert grid_id_of(plain) == grid_id_of(other)
    assert grid_id_of(plain) != grid_id_of(plain[:1])
    assert "ray" not in plain[0].config


def test_trial_resources_follow_the_model():
    cfg, source = load_config(None, ["ray.by_model={smollm2-135m: {gpus: 0.5}}", "ray.cpus_per_trial=2"])
    (trial, *_) = expand_trials(cfg, source)
    assert trial_resources(trial, cfg["ray"]) == {"CPU": 2.0, "GPU": 0.5}
    assert trial_resources(trial, {**cfg["ray"], "by_model": {}}) == {"CPU": 2.0, "GPU": 0.0}


def test_one_grid_logs_to_one_experiment():
    cfg, source = load_config(None, ["grid={experiment: [a, b]}"])
    with pytest.raises(ConfigError, match="one grid logs to one MLflow experiment"):
        expand_trials(cfg, source)


# ---------------------------------------------------------------------------------------------------------------
# Whole grids on SmolLM2 (slow)
# ---------------------------------------------------------------------------------------------------------------

def _client(uri):
    from mlflow import MlflowClient
    return MlflowClient(uri)


def _grid_runs(uri, experiment="editgrid-default"):
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("editgrid.role") == "grid"]
    children = [r for r in runs if r.data.tags.get("editgrid.role") == "trial"]
    return parents, children


def _csv_rows(client, run_id, tmp_path):
    path = client.download_artifacts(run_id, "report/comparison.csv", str(tmp_path))
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


@pytest.mark.slow
def test_grid_in_process_has_a_parent_a_child_per_trial_a_report_and_resubmits_without_rerunning(tmp_path):
    from grid.launch import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--no-ray", "--no-progress", "--tracking-uri", uri,
            *_sets([*TINY, "grid={hparams.scr_top_k: [1, 3]}"])]
    assert main(args) == 0
    (parent,), children = _grid_runs(uri)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    tags = parent.data.tags
    assert parent.info.status == "FINISHED"
    assert len(tags["editgrid.grid_id"]) == 12 and len(tags["editgrid.config_hash"]) == 12
    assert tags["editgrid.git_commit"]
    client = _client(uri)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/comparison.csv", "report/comparison.json", "report/metrics_vs_edits.png",
            "report/retention_vs_edits.png"} <= artifacts
    assert "scr_top_k" in Path(client.download_artifacts(parent.info.run_id, "grid/config.yaml",
                                                         str(tmp_path))).read_text()
    rows = _csv_rows(client, parent.info.run_id, tmp_path / "first")
    assert sorted((r["axis:hparams.scr_top_k"], r["edits"]) for r in rows) == [("1", "0"), ("1", "4"), ("3", "0"),
                                                                                 ("3", "4")]
    assert all(float(r["scr/recall_at_k/rewrite"]) == 1.0 for r in rows if r["edits"] == "4")
    for row in (r for r in rows if r["edits"] == "4"):  # every edit scored (4 <= sample size), with its interval
        assert float(row["edit/efficacy_n"]) == 4 and row["retention/complete"] == "1.0"
        low, rate, high = (float(row[f"edit/efficacy{suffix}"]) for suffix in ("_ci95_low", "", "_ci95_high"))
        assert low <= rate <= high

    # The same grid again: nothing reruns, no duplicate child appears; --report rebuilds without duplicating rows.
    assert main(args) == 0
    (again,), children_again = _grid_runs(uri)
    assert again.info.run_id == parent.info.run_id
    assert sorted(c.info.run_id for c in children_again) == sorted(c.info.run_id for c in children)
    assert main(["--report", tags["editgrid.grid_id"], "--tracking-uri", uri]) == 0
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "report/comparison.json",
                                                      str(tmp_path / "table"))).read_text())
    assert len(table["data"]) == 4
    assert main(["--report", "000000000000", "--tracking-uri", uri]) == 2


def test_mlflow_server_mode_serves_the_store_to_the_trials_and_stops(tmp_path, capsys):
    from grid.launch import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["--no-ray", "--no-progress", "--tracking-uri", uri, "--mlflow-server", *_sets(TINY)]) == 0
    out = capsys.readouterr().out
    served = out.split("MLflow server: ", 1)[1].split()[0]
    assert served.startswith("http://127.0.0.1:")
    (parent,), (child,) = _grid_runs(uri)
    assert parent.info.status == child.info.status == "FINISHED"
    # Artifacts went through the server into <database folder>/mlartifacts, not to a path the trial chose.
    assert child.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = {p.name for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()}
    assert {"per_edit_results.json", "comparison.csv", "config.yaml"} <= stored
    import urllib.request
    with pytest.raises(OSError):  # the server is gone once the grid has ended
        urllib.request.urlopen(f"{served}/health", timeout=2)

    assert main(["--no-ray", "--tracking-uri", "postgresql://nowhere/db", "--mlflow-server", *_sets(TINY)]) == 2
    assert "--mlflow-server serves a SQLite store" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_driver_resumes_with_exactly_one_child_per_cell(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, str(ROOT / "grid" / "launch.py"), "--no-ray", "--no-progress", "--tracking-uri", uri,
               *_sets([*TINY, "grid={hparams.scr_top_k: [1, 2, 3]}"])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def driver_output() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # kill it once one trial finished and the next one is running
            time.sleep(2)
            # Checked before anything else, so a driver that died early is reported with its output.
            assert driver.poll() is None, f"the driver ended before it could be killed mid-grid:\n{driver_output()}"
            if not (tmp_path / "mlflow.db").exists():
                continue
            try:
                _, children = _grid_runs(uri)
            except Exception:  # noqa: BLE001 - the store may still be being created
                continue
            statuses = {c.info.status for c in children}
            if {"FINISHED", "RUNNING"} <= statuses:
                # Freeze the driver and look again, so the trial cannot finish between this look and the kill.
                driver.send_signal(signal.SIGSTOP)
                _, children = _grid_runs(uri)
                if {"FINISHED", "RUNNING"} <= {c.info.status for c in children}:
                    break
                driver.send_signal(signal.SIGCONT)
        else:
            pytest.fail(f"no trial finished within 10 minutes; the driver's output:\n{driver_output()}")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    _, before = _grid_runs(uri)
    finished_before = {c.info.run_id for c in before if c.info.status == "FINISHED"}
    assert any(c.info.status == "RUNNING" for c in before)  # what the killed driver left behind

    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (parent,), after = _grid_runs(uri)
    assert len(after) == 3 and all(c.info.status == "FINISHED" for c in after)
    assert len({c.data.tags["editgrid.trial_id"] for c in after}) == 3
    assert finished_before <= {c.info.run_id for c in after}  # finished trials were not rerun
    assert parent.info.status == "FINISHED"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_with_token_auth_runs_the_grid_and_records_a_failed_trial(tmp_path):
    bin_dir = Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    dashboard = _free_port()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    subprocess.run([ray, "start", "--head", "--num-cpus=2", f"--port={_free_port()}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True, timeout=180)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        refused = subprocess.run([ray, "job", "submit", "--address", address, "--", "echo", "hi"],
                                 env={**env, "RAY_AUTH_TOKEN": "not-the-token"}, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
        job = subprocess.run(
            [ray, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", "grid/launch.py",
             "--tracking-uri", uri, "--ray-storage", str(tmp_path / "ray"),
             *_sets([*TINY, "ray.max_failures=0", "grid={model: [smollm2-135m, nonexistent-org/no-such-model]}"])],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert job.returncode != 0, job.stdout[-3000:]  # the grid reports its failed trial ...
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
    (parent,), children = _grid_runs(uri)  # ... and still completes: both cells are in MLflow
    by_model = {c.data.tags["editgrid.model"]: c for c in children}
    assert by_model["smollm2-135m"].info.status == "FINISHED"
    # a missing local folder is refused at validation; a hub id is only found missing when the trial loads it
    failed = by_model["nonexistent-org/no-such-model"]
    assert failed.info.status == "FAILED"
    assert "cannot load model 'nonexistent-org/no-such-model'" in failed.data.tags["failure_reason"]
    assert parent.info.status == "FAILED"
    rows = _csv_rows(_client(uri), parent.info.run_id, tmp_path)
    assert sorted(r["status"] for r in rows) == ["FAILED", "FINISHED", "FINISHED"]


def test_each_method_gets_its_own_axes():
    cfg, source = load_config(None, ["methods={memit: {}, lyaplock: {V: [0.5, 2.0], hparams.rho: [10]}}",
                                     "grid={seed: [0, 1]}"])
    trials = expand_trials(cfg, source)
    cells = sorted((t.config["method"], t.config["seed"], t.config["hparams"].get("V")) for t in trials)
    assert cells == [("lyaplock", 0, 0.5), ("lyaplock", 0, 2.0), ("lyaplock", 1, 0.5), ("lyaplock", 1, 2.0),
                     ("memit", 0, None), ("memit", 1, None)]
    assert all(t.config["hparams"] == {} for t in trials if t.config["method"] == "memit")
    assert {t.axes["method"] for t in trials} == {"memit", "lyaplock"}
    # A hyper-parameter under the wrong method is caught with the trial named; method in both places too.
    cfg, source = load_config(None, ["methods={memit: {V: [1.0]}}"])
    with pytest.raises(ConfigError, match=r"hparams.V: unknown for method stages 'memit'"):
        expand_trials(cfg, source)
    cfg, source = load_config(None, ["grid={method: [memit]}", "hparams={}"])
    cfg["methods"] = {"memit": {}}
    with pytest.raises(ConfigError, match="name the methods in one place"):
        expand_trials(cfg, source)
    cfg, source = load_config(None, ["methods={memit: {V: []}}"])
    with pytest.raises(ConfigError, match=r"methods.memit.V: must be a non-empty list"):
        expand_trials(cfg, source)
    # --set method=... pins the method and drops the per-method axes.
    assert [t.config["method"] for t in expand_trials(*load_config(None, ["methods={lyaplock: {V: [1, 2]}}",
                                                                          "method=memit"]))] == ["memit"]


def test_smoke_grid_is_two_methods_by_two_values():
    trials = expand_trials(*load_config(ROOT / "configs" / "smoke_ray.yaml"))
    assert sorted((t.config["method"], json.dumps(t.config["hparams"], sort_keys=True)) for t in trials) == [
        ("memit", '{"mom2_update_weight_per_key_dim": 0.5}'), ("memit", '{"mom2_update_weight_per_key_dim": 1.0}'),
        ("scr", '{"scr_top_k": 1}'), ("scr", '{"scr_top_k": 5}')]


# ---------------------------------------------------------------------------------------------------------------
# The MLflow UI in headless Chromium (`make test-ui` installs Chromium and playwright-core; skipped without them)
# ---------------------------------------------------------------------------------------------------------------

PLAYWRIGHT_CORE = Path(os.environ.get("PLAYWRIGHT_CORE", ROOT / ".ui" / "node_modules" / "playwright-core" / "index.mjs"))
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


def _wait_for_http(url: str, seconds: float) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"{url} did not answer within {seconds:.0f} s")


@pytest.mark.slow
def test_mlflow_ui_lists_the_grid_children_under_its_parent(tmp_path, capsys):
    """The links EditGrid prints land on the runs table (not MLflow 3's GenAI overview), the parent run expands to
    the grid's trials, and the parent run's page says how to compare them."""
    import re
    import shutil

    from grid.launch import main

    missing = [what for what, ok in (("node", shutil.which("node")), (str(CHROMIUM), CHROMIUM.exists()),
                                     (str(PLAYWRIGHT_CORE), PLAYWRIGHT_CORE.exists())) if not ok]
    if missing:
        pytest.skip(f"headless UI check needs {', '.join(missing)} (run `make test-ui`)")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["--no-ray", "--no-progress", "--tracking-uri", uri,
                 *_sets([*TINY, "grid={hparams.scr_top_k: [1, 3]}"])]) == 0
    printed = capsys.readouterr().out
    (parent,), children = _grid_runs(uri)
    runs_link = re.search(r"the grid's runs \(expand grid-\w+ to compare its trials\): (\S+)", printed).group(1)
    run_link = re.search(r"its parent run: (\S+)", printed).group(1)
    assert run_link.split("#")[1].startswith(f"/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}?")
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for_http(f"http://127.0.0.1:{port}/health", 120)
        served = [link.replace("http://127.0.0.1:5000/", f"http://127.0.0.1:{port}/") for link in (runs_link, run_link)]
        check = subprocess.run(["node", str(ROOT / "tests" / "ui" / "mlflow_runs_page.mjs"), *served,
                                parent.info.run_name, *(c.info.run_name for c in children)],
                               env={**os.environ, "PLAYWRIGHT_CORE": str(PLAYWRIGHT_CORE), "CHROMIUM": str(CHROMIUM)},
                               capture_output=True, text=True, timeout=600)
    finally:
        server.terminate()
        server.wait(timeout=60)
    report = json.loads(check.stdout.strip().splitlines()[-1]) if check.stdout.strip() else {}
    assert check.returncode == 0, (report, check.stderr[-2000:])
    assert report["runsTable"] and not report["genaiOverview"], report  # the landing page is the runs table
    assert "/runs?" in report["landedOn"] and "workflowType=machine_learning" in report["landedOn"], report
    assert report["parentListed"] and report["childrenBefore"] == []  # nested: hidden until the parent opens
    assert sorted(report["childrenAfter"]) == sorted(c.info.run_name for c in children)
    assert report["runPageNote"] and "Compare its trials" in report["runPageNote"], report
