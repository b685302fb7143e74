"""A grid on a Ray cluster of two nodes that loses one of them mid-trial (docs/cluster.md, "Several nodes, and a
node lost").

Two nodes on this machine (``ray.cluster_utils.Cluster``): the head with 1 CPU and the resource ``node_a``, a worker
node with 1 CPU and ``node_b``. A grid of two tiny MEMIT trials (1 CPU each) is submitted through EditGrid's own
entry point (``grid.launch.main`` with ``--mlflow-server``, ``--ray-storage`` and the caches in one folder both
nodes see), so one trial runs on each node. Once the trial on the worker node has written its first trial
checkpoint, that node is killed (its raylet and the trial's worker process, SIGKILL: nothing on it cleans up). Ray
Tune retries the trial (``ray.max_failures: 1``) on the head, the only node left; the retry continues from the
checkpoint (``editgrid.resumed_from_step``), takes over the killed attempt's metric history and deletes its run, and
the grid ends with exactly one FINISHED child run per cell.

Which node runs which trial is observed from outside: a trial's Ray worker process descends from its node's raylet
and Tune runs it in the trial's working directory, named ``trial<index>_<id>`` by grid/ray_runner.py.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

CHECKPOINTS = [2, 30]  # the first checkpoint early, then enough edits (seconds) for the kill to land before the end
TRIAL_DIR = re.compile(r"^trial(\d{4})_")


def _sets(overrides):
    return [item for o in overrides for item in ("--set", o)]


def _raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def _trial_processes(raylet_pid: int) -> dict[int, list]:
    """Trial index → the Ray worker processes of that node running it (found by their working directory)."""
    import psutil

    found: dict[int, list] = {}
    try:
        children = psutil.Process(raylet_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for proc in children:
        try:
            match = TRIAL_DIR.match(Path(proc.cwd()).name)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        if match:
            found.setdefault(int(match.group(1)), []).append(proc)
    return found


class NodeKiller(threading.Thread):
    """Waits until a trial running on ``victim`` has written a trial checkpoint, then kills that node: the trial's
    process is frozen first (so it cannot write past the checkpoint read here), the node's raylet and other
    processes are killed, then the trial's process. Afterwards it notes which processes of ``survivor`` run the
    killed trial (its retry)."""

    def __init__(self, cluster, victim, survivor, checkpoint_root: Path, trial_ids: dict[int, str],
                 deadline_s: float = 600):
        super().__init__(daemon=True)
        self.cluster, self.victim = cluster, victim
        self.victim_raylet, self.survivor_raylet = _raylet_pid(victim), _raylet_pid(survivor)
        self.checkpoint_root, self.trial_ids = checkpoint_root, trial_ids
        self.deadline = time.time() + deadline_s
        self.stop = threading.Event()
        self.killed: dict | None = None  # trial index, its process, the checkpoint and run it had
        self.seen_on_victim: set[int] = set()
        self.seen_on_survivor: dict[int, set[int]] = {}  # trial index → pids on the survivor
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err

    def _watch_survivor(self) -> None:
        for index, procs in _trial_processes(self.survivor_raylet).items():
            self.seen_on_survivor.setdefault(index, set()).update(p.pid for p in procs)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            if time.time() > self.deadline:
                # A grid that hangs (a retry never scheduled) is stopped the way `ray job stop` stops a driver:
                # SIGTERM, which grid/launch.py turns into a clean exit with 143.
                self.error = TimeoutError("the grid did not end in time; its driver was sent SIGTERM")
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self._watch_survivor()
            if self.killed is None:
                for index, procs in _trial_processes(self.victim_raylet).items():
                    self.seen_on_victim.add(index)
                    folder = self.checkpoint_root / self.trial_ids[index]
                    if (folder / "LATEST").is_file():
                        self._kill(index, procs, folder)
                        break

    def _kill(self, index: int, procs: list, folder: Path) -> None:
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        latest, run_id = (folder / "LATEST").read_text().strip(), (folder / "RUN").read_text().strip()
        self.cluster.remove_node(self.victim, allow_graceful=False)
        for proc in procs:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.killed = {"index": index, "pids": {p.pid for p in procs}, "latest": latest, "run_id": run_id}


def _restore_address_file(path: Path, previous: str | None) -> None:
    """cluster_utils points /tmp/ray/ray_current_cluster (what a bare ``ray.init()`` joins) at its head: put back
    what was there, so no later ``ray.init()`` on this machine tries the cluster this test stopped."""
    try:
        if previous is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(previous)
    except OSError:
        pass


@pytest.mark.slow
def test_trial_on_a_lost_node_is_retried_on_the_other_node_from_its_checkpoint(
        tmp_path, tiny_llama_dir, small_corpus, monkeypatch, capsys):
    import ray
    from mlflow import MlflowClient
    from mlflow.entities import ViewType
    from ray.cluster_utils import Cluster

    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # older Ray kept it here
        from ray._private.utils import get_ray_address_file

    from grid.config import expand_trials, load_config
    from grid.launch import main

    shared = tmp_path / "shared"  # what every node sees: the cache (statistics, trial checkpoints), Ray's storage
    cache, storage = shared / "cache", shared / "ray"
    overrides = [f"model={tiny_llama_dir}", "method=memit", "hparams.layers=[1, 2]", "hparams.v_num_grad_steps=5",
                 f"data.limit={CHECKPOINTS[-1]}", "edits.batch_size=1", f"edits.checkpoints={CHECKPOINTS}",
                 f"stats.corpus={small_corpus}", "stats.num_tokens=2000", "eval.scr_latency_queries=0",
                 f"cache_dir={cache}", "grid={seed: [0, 1]}",
                 "ray.cpus_per_trial=1", "ray.max_failures=1"]
    trials = expand_trials(*load_config(None, overrides))
    assert len(trials) == 2
    trial_ids = {t.index: t.trial_id for t in trials}
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    if ray.is_initialized():  # run_on_ray would stay on a cluster an earlier test joined instead of this one
        ray.shutdown()
    address_file = Path(get_ray_address_file(None))
    previous_address = address_file.read_text() if address_file.is_file() else None
    small = {"num_cpus": 1, "object_store_memory": 80 * 1024 ** 2}
    cluster = Cluster(initialize_head=True, head_node_args={**small, "resources": {"node_a": 1},
                                                            "include_dashboard": False})
    killer = None
    try:
        worker = cluster.add_node(**small, resources={"node_b": 1})
        cluster.wait_for_nodes()
        head_id, worker_id = cluster.head_node.node_id, worker.node_id
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # what run_on_ray's ray.init() joins (ray job submit)
        killer = NodeKiller(cluster, victim=worker, survivor=cluster.head_node, checkpoint_root=cache /
                            "trial_checkpoints", trial_ids=trial_ids)
        killer.start()
        started = time.time()
        code = main(["--no-progress", "--tracking-uri", uri, "--mlflow-server", "--ray-storage", str(storage),
                     *_sets(overrides)])
        elapsed = time.time() - started
        killer.stop.set()
        killer.join(timeout=30)
        alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
    finally:
        if killer is not None:
            killer.stop.set()
        ray.shutdown()
        cluster.shutdown()
        _restore_address_file(address_file, previous_address)
    out = capsys.readouterr().out

    assert killer.error is None, f"{killer.error!r}; output:\n{out[-3000:]}"
    assert code == 0, out[-3000:]
    assert killer.killed is not None, (f"no trial on the worker node wrote a checkpoint before the grid ended "
                                       f"(trials seen there: {sorted(killer.seen_on_victim)}); output:\n{out[-3000:]}")
    killed = killer.killed
    assert killed["latest"] == f"step_{CHECKPOINTS[0]:07d}"  # killed between its first checkpoint and the end
    # Both nodes took a trial: the other one ran on the head, and so did the killed trial's retry (the only node
    # left), in a process other than the killed one.
    other = 1 - killed["index"]
    assert killer.seen_on_survivor.get(other), killer.seen_on_survivor
    retry = killer.seen_on_survivor.get(killed["index"], set())
    assert retry and not retry & killed["pids"], (killer.seen_on_survivor, killed)
    assert alive == {head_id: True, worker_id: False}

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(trials[0].config["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("editgrid.role") == "grid"]
    children = [r for r in runs if r.data.tags.get("editgrid.role") == "trial"]
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.tags["editgrid.trial_id"] for c in children) == sorted(trial_ids.values())
    assert all(c.info.status == "FINISHED" for c in children), [(c.info.run_name, c.info.status) for c in children]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    # Every trial logged to the server the driver ran, artifacts included.
    assert all(c.info.artifact_uri.startswith("mlflow-artifacts:/") for c in children)

    by_trial = {c.data.tags["editgrid.trial_id"]: c for c in children}
    resumed, untouched = by_trial[trial_ids[killed["index"]]], by_trial[trial_ids[other]]
    assert resumed.data.tags["editgrid.resumed_from_step"] == str(CHECKPOINTS[0])
    assert resumed.data.tags["editgrid.resumed_from_run"] == killed["run_id"]
    assert resumed.info.run_id != killed["run_id"]
    assert client.get_run(killed["run_id"]).info.lifecycle_stage == "deleted"  # superseded, not a second child
    deleted = client.search_runs([experiment.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert [r.info.run_id for r in deleted] == [killed["run_id"]]
    assert "editgrid.resumed_from_step" not in untouched.data.tags
    for run in (resumed, untouched):  # the history of one uninterrupted trial: every step once
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "edit/efficacy")]
        assert sorted(steps) == [0, *CHECKPOINTS], (run.info.run_name, steps)
        per_batch = [m.step for m in client.get_metric_history(run.info.run_id, "editing/L1/update_norm")]
        assert sorted(per_batch) == list(range(1, CHECKPOINTS[-1] + 1)), (run.info.run_name, per_batch)
    assert not any((cache / "trial_checkpoints").glob("*/LATEST"))  # finished trials drop their checkpoints
    print(f"\nmulti-node grid: {elapsed:.0f} s; trial {killed['index']} killed on node_b at {killed['latest']}, "
          f"retried on node_a (pids {sorted(retry)})")
