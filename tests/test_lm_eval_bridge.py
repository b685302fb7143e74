"""The lm-evaluation-harness bridge (evals/lm_eval_bridge.py), offline: local task YAMLs over the shared GLUE/MMLU
JSONL files, written with the same prompts and label words as evals/general.py, so the harness' accuracy on the
in-memory SmolLM2 must equal ours (both take the label whose continuation has the highest total log-probability);
and a tiny trial logs lm_eval/<task>/<metric> at step 0 and at its checkpoint."""

from __future__ import annotations

import math

import pytest
import yaml

pytest.importorskip("lm_eval")

from evals.general import evaluate_general, load_task  # noqa: E402
from evals.lm_eval_bridge import LmEvalUnavailable, metric_name, run_lm_eval  # noqa: E402

N_ITEMS = 12

# Our prompts of evals/general.py, in the harness' Jinja.
SST2_TEXT = "Review: {{sentence.strip()}}\nIs the sentiment of this review positive or negative?\nAnswer:"
MMLU_TEXT = ("Question: {{question.strip()}}\n{% for choice in choices %}{{'ABCD'[loop.index0]}}. {{choice}}\n"
             "{% endfor %}Answer with the letter of the correct choice.\nAnswer:")


def _write_task(folder, name: str, jsonl, text: str, target: str, choices: list[str]) -> None:
    """A local multiple-choice task over a JSONL file, scored by accuracy."""
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(jsonl)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": text, "doc_to_target": target,
            "doc_to_choice": choices,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


@pytest.fixture
def task_folder(tmp_path, shared_data):
    folder = tmp_path / "lm_eval_tasks"
    folder.mkdir()
    general = shared_data / "general"
    _write_task(folder, "editgrid_sst2", general / "sst2.jsonl", SST2_TEXT, "label", ["negative", "positive"])
    _write_task(folder, "editgrid_mmlu", general / "mmlu.jsonl", MMLU_TEXT, "answer", ["A", "B", "C", "D"])
    return folder


def test_metric_names():
    assert metric_name("sst2", "acc,none") == "lm_eval/sst2/acc"
    assert metric_name("gsm8k", "exact_match,strict-match") == "lm_eval/gsm8k/exact_match/strict-match"
    assert metric_name("sst2", "acc_stderr,none") is None and metric_name("sst2", "alias") is None
    assert metric_name("sst2", "sample_len") == "lm_eval/sst2/n_items"


def test_harness_accuracy_equals_ours_on_the_same_prompts(smollm2, shared_data, task_folder):
    metrics, results = run_lm_eval(smollm2.model, smollm2.tokenizer, ["editgrid_sst2", "editgrid_mmlu"],
                                   limit=N_ITEMS, batch_size=8, include_path=task_folder)
    ours = evaluate_general(smollm2.model, smollm2.tokenizer,
                            {task: load_task(shared_data / "general", task, N_ITEMS) for task in ("sst2", "mmlu")},
                            generate=False).metrics
    assert set(metrics) == {f"lm_eval/editgrid_{task}/{name}" for task in ("sst2", "mmlu") for name in ("acc", "n_items")}
    assert metrics["lm_eval/editgrid_sst2/n_items"] == metrics["lm_eval/editgrid_mmlu/n_items"] == N_ITEMS
    assert math.isclose(metrics["lm_eval/editgrid_sst2/acc"], ours["general/sst2"], abs_tol=1e-9), (metrics, ours)
    assert math.isclose(metrics["lm_eval/editgrid_mmlu/acc"], ours["general/mmlu"], abs_tol=1e-9), (metrics, ours)
    assert not smollm2.model.training


def test_unknown_task_is_named(smollm2, task_folder):
    with pytest.raises(LmEvalUnavailable, match=r"\['no_such_task'\] are not lm-evaluation-harness tasks"):
        run_lm_eval(smollm2.model, smollm2.tokenizer, ["no_such_task"], include_path=task_folder)


def test_trial_logs_harness_metrics_at_its_steps(tmp_path, tiny_llama_dir, small_corpus, task_folder):
    from mlflow import MlflowClient

    from grid.launch import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [f"model={tiny_llama_dir}", "method=memit", "data.limit=2", "edits.checkpoints=[2]",
            f"stats.corpus={small_corpus}", "stats.num_tokens=2000", "hparams.layers=[1, 2]",
            "hparams.v_num_grad_steps=3", "eval.scr_latency_queries=0", f"cache_dir={tmp_path / 'cache'}",
            "eval.lm_eval.enabled=true", "eval.lm_eval.tasks=[editgrid_sst2]", "eval.lm_eval.limit=4",
            f"eval.lm_eval.include_path={task_folder}"]
    assert main(["--no-ray", "--no-progress", "--tracking-uri", uri, *[x for s in sets for x in ("--set", s)]]) == 0
    client = MlflowClient(uri)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("editgrid-default").experiment_id])
              if r.data.tags.get("editgrid.role") == "trial"]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lm_eval/editgrid_sst2/acc")}
    assert sorted(history) == [0, 2] and all(0.0 <= v <= 1.0 for v in history.values())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "tables/lm_eval")}
    assert "tables/lm_eval/step_000002.json" in artifacts
