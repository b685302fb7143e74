"""Integration on the real SmolLM2-135M: an edit changes what the model says, and one trial runs end to end
through the CLI into MLflow. Marked slow (each test loads or edits the 135M model)."""

from __future__ import annotations

import json

import pytest
import torch

from evals.datasets import load_records
from evals.teacher_forced import evaluate_records
from grid.trial import to_request
from methods.infra.arch import EditableModel
from methods.context import generate_context_templates
from methods.corpus import parse_corpus
from methods.editor import LocateThenEditEditor
from methods.stages import build_solver, build_target_hparams
from methods.stats import second_moments

pytestmark = pytest.mark.slow
LAYERS = [3, 4, 5, 6, 7]


@pytest.fixture(scope="module")
def stats_and_context(smollm2, shared_data, tmp_path_factory):
    torch.manual_seed(0)
    editable = EditableModel.wrap(smollm2.model)
    stats = second_moments(editable, smollm2.tokenizer, LAYERS, parse_corpus(str(shared_data / "general")), 20_000,
                           model_key=f"smollm2@{smollm2.fingerprint}", cache_dir=tmp_path_factory.mktemp("cache"),
                           progress=False)
    return stats.moments, generate_context_templates(smollm2.model, smollm2.tokenizer, seed=0)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_sequential_edits_make_the_model_prefer_the_new_targets(method, smollm2, shared_data, stats_and_context):
    moments, context = stats_and_context
    records = load_records(str(shared_data / "counterfact" / "counterfact-edit.json"), offset=7000, limit=4)
    model, tok = smollm2.model, smollm2.tokenizer
    editable = EditableModel.wrap(model)
    originals = {layer: editable.weight(layer).clone() for layer in LAYERS}
    hparams = {"memit": {"mom2_update_weight_per_key_dim": 1.0},
               "alphaedit": {"l2": 10.0, "nullspace_mode": "absolute", "nullspace_threshold": 2e-2}}[method]
    try:
        before = evaluate_records(model, tok, records).metrics
        editor = LocateThenEditEditor(editable, tok, LAYERS, build_solver(method, hparams), moments, context,
                                      build_target_hparams({}))
        for record in records:  # one edit per step, as in the sequential protocol
            report = editor.apply([to_request(record)])
            assert report.target_prob[0] > 0.5, "v* did not reach its target"
        after = evaluate_records(model, tok, records).metrics
    finally:
        for layer, weight in originals.items():
            editable.weight(layer).copy_(weight)
    assert after["edit/efficacy"] >= 0.75 and after["edit/efficacy"] > before["edit/efficacy"]
    assert after["edit/efficacy_prob_gap"] > before["edit/efficacy_prob_gap"] + 0.3


def test_one_trial_end_to_end_through_the_cli(tmp_path, shared_data, monkeypatch):
    from mlflow import MlflowClient

    from grid.launch import main

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(json.loads(line)["sentence"] for line in
                                (shared_data / "general" / "sst2.jsonl").read_text().splitlines()))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(["--local", "--set", "method=memit", "--set", "data.limit=4", "--set", "edits.checkpoints=[2,4]",
                 "--set", "edits.batch_size=2", "--set", f"stats.corpus={corpus}", "--set", "stats.num_tokens=5000",
                 "--set", f"cache_dir={tmp_path / 'cache'}", "--tracking-uri", uri, "--no-progress"])
    assert code == 0
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "editgrid-default"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    efficacy = client.get_metric_history(run.info.run_id, "edit/efficacy")
    assert [m.step for m in efficacy] == [0, 2, 4]
    assert efficacy[-1].value > efficacy[0].value
    for name in ("edit/generalization", "edit/specificity", "cost/seconds_per_edit", "cost/stats_seconds",
                 "diag/L7/weight_norm", "diag/L3/weight_change", "diag/L5/cond", "diag/L7/sigma_max_delta"):
        assert client.get_metric_history(run.info.run_id, name), name
    assert [m.value for m in client.get_metric_history(run.info.run_id, "diag/L7/sigma_max_delta")][0] == 0.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/metrics_vs_edits.png" in artifacts
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "tables")}
    assert "tables/per_edit_results.json" in tables
    assert run.data.params["edits.batch_size"] == "2" and run.data.params["method"] == "memit"
