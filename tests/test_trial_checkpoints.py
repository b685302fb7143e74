"""Trial checkpoints and resume (grid/trial_checkpoint.py, grid/trial.py): a trial interrupted after its first
evaluation checkpoint and run again continues from that checkpoint and ends with exactly the history an
uninterrupted run logs — same steps, same values — in one child run; plus the collapse stopper and the validation
of both sections. Tiny random Llama, so the solvers' state (AlphaEdit's K_pK_pᵀ, LyapLock's queue and memories,
RandomDrop's RNG, the SCR memory, UltraEdit's lifelong normaliser, GRACE's codebook, WISE's shards) is what decides whether the resumed numbers match."""

from __future__ import annotations

import math

import pytest

import grid.trial
from grid.config import ConfigError, expand_trials, load_config
from grid.launch import main

CHECKPOINTS = [2, 4, 6]
# Metrics whose values depend on timing or the machine, not on what the trial computed.
TIMING_PREFIXES = ("cost/", "scr/latency/", "scr/add_seconds")


def _sets(overrides):
    return [item for o in overrides for item in ("--set", o)]


# Per method: settings that keep the tiny trial fast (the memory editors take no v* settings).
EDITING = {"scr": [], "ultraedit": ["hparams.layers=[1, 2]", "hparams.ultra_lr=0.1", "hparams.ultra_micro_batch=1"],
           "grace": ["hparams.layers=[2]", "hparams.grace_n_iter=3"],
           # shards every 2 edits, merged every 4: the resumed run must carry a pending shard across the checkpoint
           "wise": ["hparams.layers=[2]", "hparams.wise_n_iter=2", "hparams.wise_save_freq=2",
                    "hparams.wise_merge_freq=4"],
           "memoir": ["hparams.layers=[2]", "hparams.memoir_n_iter=2", "hparams.memoir_background_samples=10"]}


def _args(uri, tmp_path, model_dir, corpus, method, extra=()):
    editing = EDITING.get(method, ["hparams.layers=[1, 2]", "hparams.v_num_grad_steps=5"])
    return ["--no-ray", "--no-progress", "--tracking-uri", uri, *_sets([
        f"model={model_dir}", f"method={method}", "data.limit=6", "edits.batch_size=1",
        f"edits.checkpoints={CHECKPOINTS}", f"stats.corpus={corpus}", "stats.num_tokens=2000",
        "eval.scr_latency_queries=0", *editing,
        f"cache_dir={tmp_path / 'cache'}", f"checkpoints.dir={tmp_path / 'trial_checkpoints'}", *extra])]


def _children(uri):
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("editgrid-default")
    runs = client.search_runs([experiment.experiment_id])
    return client, [r for r in runs if r.data.tags.get("editgrid.role") == "trial"]


def _history(client, run) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for key in run.data.metrics:
        if key.startswith(TIMING_PREFIXES):
            continue
        out[key] = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
    return out


def _interrupt_after(monkeypatch, batches_done: int) -> None:
    """Make the trial's batch loop raise when it asks for batch ``batches_done + 1``."""
    original = grid.trial.batches

    def failing(num_edits, batch_size):
        for count, item in enumerate(original(num_edits, batch_size)):
            if count == batches_done:
                raise RuntimeError("injected failure: the worker died")
            yield item

    monkeypatch.setattr(grid.trial, "batches", failing)


@pytest.mark.parametrize("method", ["lyaplock", "alphaedit", "memit+dr", "scr", "ultraedit", "grace", "wise",
                                    "memoir"])
def test_interrupted_trial_resumes_from_its_checkpoint_with_the_uninterrupted_history(
        method, tmp_path, tiny_llama_dir, small_corpus, monkeypatch):
    # every_minutes null: only the evaluation checkpoints save the state, so the attempt dies with step 2 saved.
    history = _check_resume(method, tmp_path, tiny_llama_dir, small_corpus, monkeypatch,
                            ["checkpoints.every_minutes=null"], saved_step=2)
    if method in ("ultraedit", "alphaedit"):  # C computed for the output projections written: drift D reported
        assert "diag/L1/drift" in history and "diag/L2/drift" in history


GATE_UP = ["hparams.layers=null", "hparams.ultra_targets={gate_proj: [1], up_proj: [2]}"]


@pytest.mark.parametrize("method,settings", [("alphaedit", []), ("scr", []), ("wise", []), ("ultraedit", GATE_UP),
                                             ("alphaedit+nas", ["hparams.nas_samples=5"])],
                         ids=["alphaedit", "scr", "wise", "ultraedit-gate-up", "alphaedit-nas"])
def test_a_trial_resumes_from_a_state_saved_between_evaluations(method, settings, tmp_path, tiny_llama_dir,
                                                                  small_corpus, monkeypatch):
    # every_minutes 0: the state is saved after every batch, so the attempt dies with step 3 saved, which is no
    # evaluation checkpoint; WISE then holds a shard half-trained (saved every 2, merged every 4). UltraEdit on
    # gate/up projections: matrices other than the MLP output are checkpointed and diagnosed too.
    history = _check_resume(method, tmp_path, tiny_llama_dir, small_corpus, monkeypatch,
                            ["checkpoints.every_minutes=0", *settings], saved_step=3)
    if method == "alphaedit+nas":  # r solved once on the unedited model, from 5 records, then read from the cache
        assert len(list((tmp_path / "cache" / "nas").glob("*.json"))) == 1
        (r,) = {value for _, value in history["nas/reference_norm"]}
        assert r > 0 and history["nas/anchored_edits"][-1] == (6, 6 - history["nas/skipped_edits"][-1][1])
    elif settings:
        for name in ("diag/L1.gate_proj/sigma_max_delta", "diag/L2.up_proj/cond", "editing/L1.gate_proj/update_norm",
                     "ultraedit/L2.up_proj/mean_abs_value"):
            assert name in history, sorted(history)
        assert not any(name.startswith(("diag/L1/", "diag/L2/")) for name in history)  # down_proj untouched
        # the grid's comparison report averages them as for any editor
        import csv

        from mlflow import MlflowClient
        client = MlflowClient(f"sqlite:///{tmp_path}/resumed.db")
        (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("editgrid-default").experiment_id])
                     if r.data.tags.get("editgrid.role") == "grid"]
        path = client.download_artifacts(parent.info.run_id, "report/comparison.csv", str(tmp_path))
        rows = {row["edits"]: row for row in csv.DictReader(open(path))}
        assert float(rows["6"]["diag/mean/sigma_max_delta"]) > 0


def _check_resume(method, tmp_path, tiny_llama_dir, small_corpus, monkeypatch, extra, saved_step):
    """Run the trial straight; then again, killed when it asks for batch 4, and once more to resume: the resumed
    child run must hold exactly the straight run's history."""
    straight_uri = f"sqlite:///{tmp_path}/straight.db"
    assert main(_args(straight_uri, tmp_path, tiny_llama_dir, small_corpus, method, extra)) == 0
    client, (straight,) = _children(straight_uri)
    expected = _history(client, straight)
    if method == "alphaedit":  # the trial shares its null-space projectors through the cache (one per layer)
        assert len(list((tmp_path / "cache" / "projectors").glob("*.pt"))) == 2

    uri = f"sqlite:///{tmp_path}/resumed.db"
    _interrupt_after(monkeypatch, batches_done=3)  # batch 3 applied and logged; then dies
    assert main(_args(uri, tmp_path, tiny_llama_dir, small_corpus, method, extra)) == 1
    client, (failed,) = _children(uri)
    assert failed.info.status == "FAILED" and "injected failure" in failed.data.tags["failure_reason"]
    (folder,) = (tmp_path / "trial_checkpoints").iterdir()
    assert (folder / "LATEST").read_text() == f"step_{saved_step:07d}"
    assert (folder / "RUN").read_text() == failed.info.run_id

    monkeypatch.undo()
    assert main(_args(uri, tmp_path, tiny_llama_dir, small_corpus, method, extra)) == 0
    client, (resumed,) = _children(uri)  # the failed attempt was superseded: one child for the cell
    assert resumed.info.status == "FINISHED" and resumed.info.run_id != failed.info.run_id
    assert resumed.data.tags["editgrid.resumed_from_step"] == str(saved_step)
    assert resumed.data.tags["editgrid.resumed_from_run"] == failed.info.run_id
    got = _history(client, resumed)
    assert sorted(got) == sorted(expected)
    for key, points in expected.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], key  # no step logged twice, none missing
        for (_, a), (_, b) in zip(got[key], points):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7) or (math.isnan(a) and math.isnan(b)), key
    artifacts = {a.path for a in client.list_artifacts(resumed.info.run_id, "tables")}
    assert "tables/per_edit_results.json" in artifacts
    assert not folder.exists()  # a finished trial's checkpoint is removed (checkpoints.keep_final is false)
    return got


def test_collapse_stopper_ends_the_trial_at_the_first_collapsed_checkpoint(tmp_path, tiny_llama_dir, small_corpus):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # A random tiny model never reaches efficacy 2: it "collapses" at the first checkpoint after editing.
    args = _args(uri, tmp_path, tiny_llama_dir, small_corpus, "memit",
                 ["stop_on_collapse={metric: edit/efficacy, below: 2}"])
    assert main(args) == 0
    client, (run,) = _children(uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["editgrid.stopped_early"].startswith("edit/efficacy = ")
    assert "after 2 edits" in run.data.tags["editgrid.stopped_early"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "edit/efficacy")]
    assert steps == [0, 2]

    bad = _args(uri, tmp_path, tiny_llama_dir, small_corpus, "memit", ["stop_on_collapse={metric: edit/nope, below: 0}"])
    assert main(bad) == 1  # a metric the trial never logs fails the trial with the families it does log
    client, runs = _children(uri)
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and "edit/nope" in failed[0].data.tags["failure_reason"]
    assert "edit/efficacy" in failed[0].data.tags["failure_reason"]


def test_checkpoint_and_collapse_sections_are_validated():
    cfg, _ = load_config(None, ["checkpoints.enabled=maybe", "checkpoints.dir=3", "checkpoints.bogus=1",
                                "checkpoints.every_minutes=-5", "stop_on_collapse={metric: efficacy, below: low}"])
    with pytest.raises(ConfigError) as err:
        expand_trials(cfg)
    text = str(err.value)
    for needle in ("checkpoints.enabled: 'maybe' must be true or false", "checkpoints.dir: 3 must be a folder path",
                   "checkpoints.bogus: unknown key", "checkpoints.every_minutes: -5 must be a number of minutes",
                   "stop_on_collapse.metric: 'efficacy' must be a metric",
                   "stop_on_collapse.below: 'low' must be a number"):
        assert needle in text
    cfg, _ = load_config(None, ["stop_on_collapse={below: 0.1}"])
    with pytest.raises(ConfigError, match="stop_on_collapse.below: 0.1 is set but stop_on_collapse.metric is not"):
        expand_trials(cfg)


def test_checkpoint_settings_do_not_change_the_trial_id(tmp_path):
    one, _ = load_config(None, [])
    two, _ = load_config(None, [f"checkpoints.dir={tmp_path}", "checkpoints.keep_final=true",
                                "checkpoints.every_minutes=5"])
    assert [t.trial_id for t in expand_trials(one)] == [t.trial_id for t in expand_trials(two)]
