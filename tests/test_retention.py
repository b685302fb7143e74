"""Retention checkpoints (evals/retention.py): Wilson intervals, the fixed seeded age-stratified sample, the
stratified estimates; in a trial: sampled checkpoints with intervals, a complete final one, the evaluation's share
of the trial's time, every checkpoint handed to the progress callback (what Ray Tune shows); the config checks."""

from __future__ import annotations

import pytest

from evals.retention import (NEWEST_BATCH, RetentionPlan, age_stratum, retention_metrics, wilson_interval)
from grid.config import ConfigError, expand_trials, load_config
from grid.ray_runner import TUNE_COLUMNS, TrialEta, tune_row


def test_wilson_interval_known_values():
    # Known values of the 95 % Wilson score interval: 5/10, 0/10, 10/10, 81/263.
    assert wilson_interval(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(1.0, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(81 / 263, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0.3, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(0.9, 1000), wilson_interval(0.9, 50)
    assert wide[0] < narrow[0] < 0.9 < narrow[1] < wide[1]


def test_sample_is_stratified_by_age_seeded_and_stable_across_checkpoints():
    plan = RetentionPlan(total_edits=1000, sample_size=100, strata=4, seed=7)
    early = plan.sample(400, newest_start=300)
    assert not early.complete
    assert early.bins == ((0, 100), (100, 200), (200, 300), (300, 400))
    assert [len(chosen) for chosen in early.by_bin] == [25, 25, 25, 25]
    for (start, end), chosen in zip(early.bins, early.by_bin):
        assert all(start <= i < end for i in chosen)
    assert len(early.newest) == 25 and all(300 <= i < 400 for i in early.newest)
    assert early == RetentionPlan(1000, 100, 4, seed=7).sample(400, 300)  # seeded: a rerun scores the same edits
    assert early.by_bin != RetentionPlan(1000, 100, 4, seed=8).sample(400, 300).by_bin
    # One priority order for the whole trial: an edit scored later among older ones was scored before too.
    late = plan.sample(800, newest_start=700)
    oldest_now = set(late.by_bin[0]) & set(range(0, 100))
    assert oldest_now and oldest_now <= set(early.by_bin[0])
    # A small newest batch is scored whole.
    assert plan.sample(800, newest_start=790).newest == tuple(range(790, 800))


def test_small_trials_and_the_final_checkpoint_score_every_edit():
    plan = RetentionPlan(total_edits=1000, sample_size=100, strata=4, seed=0)
    small = plan.sample(60, newest_start=50)
    assert small.complete and small.indices == list(range(60))
    final = plan.sample(1000, newest_start=900, score_all=True)
    assert final.complete and final.indices == list(range(1000))
    with pytest.raises(ValueError, match="cannot sample"):
        plan.sample(1001, newest_start=1000)


def test_retention_metrics_weight_strata_by_size_and_report_intervals():
    plan = RetentionPlan(total_edits=10, sample_size=4, strata=2, seed=0)
    sample = plan.sample(9, newest_start=8)  # bins [0, 4) and [4, 9) (sizes 4 and 5), two edits scored from each
    assert sample.bins == ((0, 4), (4, 9))
    rows = {i: {"efficacy": 0.0 if i < 4 else 1.0} for i in range(9)}  # old edits forgotten, new ones held
    metrics = retention_metrics(sample, rows, ("efficacy", "locality"))
    assert metrics["edit/efficacy"] == pytest.approx((4 * 0.0 + 5 * 1.0) / 9)  # by bin size, not 2 + 2 scored
    assert metrics["edit/efficacy_n"] == 4
    low, high = wilson_interval(5 / 9, 4)
    assert (metrics["edit/efficacy_ci95_low"], metrics["edit/efficacy_ci95_high"]) == pytest.approx((low, high))
    assert metrics[f"retention/{age_stratum(0, 2)}/efficacy"] == 0.0
    assert metrics[f"retention/{age_stratum(1, 2)}/efficacy"] == 1.0
    assert metrics[f"retention/{age_stratum(0, 2)}/efficacy_ci95_high"] == pytest.approx(wilson_interval(0.0, 2)[1])
    assert metrics[f"retention/{NEWEST_BATCH}/efficacy"] == 1.0 and metrics[f"retention/{NEWEST_BATCH}/efficacy_n"] == 1
    assert metrics["retention/edits_scored"] == len(sample.indices) and metrics["retention/complete"] == 0.0
    assert not any("locality" in key for key in metrics)  # a metric no row has is not reported


def test_retention_section_is_validated_with_every_problem_listed():
    cfg, source = load_config(None, ["eval.retention={sample_size: 0, strata: 0, seed: x, final: some}"])
    with pytest.raises(ConfigError) as info:
        expand_trials(cfg, source)
    message = str(info.value)
    for expected in ("eval.retention.sample_size: 0 must be an integer >= 1",
                     "eval.retention.strata: 0 must be an integer >= 1",
                     "eval.retention.seed: 'x' must be null", "eval.retention.final: 'some' must be 'all'"):
        assert expected in message
    cfg, source = load_config(None, ["eval.retention.sample_size=3", "eval.retention.strata=4"])
    with pytest.raises(ConfigError, match="4 age bins cannot each get an edit of a sample of 3"):
        expand_trials(cfg, source)


def test_tune_row_keeps_the_headline_columns():
    row = tune_row({"step": 300, "edit/efficacy": 0.9, "edit/efficacy_ci95_low": 0.8, "cost/eval_share": 0.1,
                    "vstar/target_prob": 0.97})
    # Every column at every report, in a fixed order (Tune's table shows the first four it sees): NaN until known.
    assert list(row)[:4] == ["edits", "eta_min", "edit_score", "cost_seconds_per_edit"]
    assert {k: v for k, v in row.items() if v == v} == {"edits": 300, "edit_efficacy": 0.9, "cost_eval_share": 0.1}
    assert set(row) == {"edits", "eta_min", "edit_score", "cost_seconds_per_edit", "edit_efficacy",
                        "edit_generalization", "edit_specificity", "cost_eval_share"}
    assert {"edit/efficacy", "cost/seconds_per_edit"} <= set(TUNE_COLUMNS)


def test_tune_row_carries_each_trials_eta_from_its_own_pace():
    now = [100.0]
    eta = TrialEta(total_edits=1000, clock=lambda: now[0])
    first = tune_row({"step": 200}, eta)["eta_min"]  # the first report of an attempt (here a resume at 200)
    assert first != first  # NaN: no pace yet
    now[0] += 600.0  # 100 edits in 10 minutes
    assert tune_row({"step": 300}, eta)["eta_min"] == 70.0  # 700 edits to go at 6 s per edit
    now[0] += 300.0
    assert tune_row({"step": 500}, eta)["eta_min"] == 25.0  # 300 edits in 15 min so far (3 s each): 500 to go
    assert tune_row({"step": 1000}, eta)["eta_min"] == 0.0


def test_trial_samples_checkpoints_scores_all_at_the_end_and_reports_each_checkpoint(tmp_path, tiny_llama_dir,
                                                                                     small_corpus):
    from mlflow import MlflowClient

    from grid.trial import run_trial

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg, source = load_config(None, [f"model={tiny_llama_dir}", "method=memit", "data.limit=8",
                                     "edits.batch_size=2", "edits.checkpoints=[4, 8]", f"stats.corpus={small_corpus}",
                                     "stats.num_tokens=2000", "eval.scr_latency_queries=0",
                                     "hparams.layers=[1, 2]", "hparams.v_num_grad_steps=2",
                                     "eval.retention.sample_size=2", "eval.retention.strata=2",
                                     f"cache_dir={tmp_path / 'cache'}"])
    (trial,) = expand_trials(cfg, source)
    seen = []
    result = run_trial(trial, uri, progress=False, on_checkpoint=seen.append)
    assert [row["step"] for row in seen] == [0, 4, 8] == [row["step"] for row in result.checkpoints]
    client = MlflowClient(uri)
    history = {key: {m.step: m.value for m in client.get_metric_history(result.run_id, key)}
               for key in ("edit/efficacy", "edit/efficacy_n", "edit/efficacy_ci95_low", "edit/efficacy_ci95_high",
                           "retention/edits_scored", "retention/complete", "eval/num_records", "cost/eval_share")}
    # After 4 edits: one edit from each of the two age bins plus one of the newest batch (2 edits, 1 sampled) —
    # not every edit; after 8 (the last checkpoint): every edit.
    assert history["edit/efficacy_n"] == {4: 2.0, 8: 8.0}
    assert history["retention/complete"] == {4: 0.0, 8: 1.0}
    assert 2 <= history["retention/edits_scored"][4] <= 3
    assert history["eval/num_records"][4] == history["retention/edits_scored"][4]
    assert history["eval/num_records"][8] == 8
    for step in (4, 8):
        assert history["edit/efficacy_ci95_low"][step] <= history["edit/efficacy"][step]
        assert history["edit/efficacy"][step] <= history["edit/efficacy_ci95_high"][step]
        assert 0 < history["cost/eval_share"][step] < 1
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert "plots/retention_by_age_vs_edits.png" in artifacts
