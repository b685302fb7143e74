"""The autoregressive protocol (evals/autoregressive.py), general abilities (evals/general.py) and fluency
(evals/fluency.py); and one SmolLM2 trial with both protocols, where a MEMIT edit makes the model *say* the new
target."""

from __future__ import annotations

import math

import pytest

from evals.autoregressive import (GenerationSettings, answer_queries, contains_answer, evaluate_generation,
                                  final_answer, generate_answers)
from evals.datasets import load_records
from evals.fluency import fluency, mean_fluency, ngram_entropy, words
from evals.general import (TASKS, GeneralTaskError, evaluate_general, f1_positive, load_task, matthews_corrcoef,
                           parse_label)
from evals.judge import Judge
from evals.teacher_forced import score_continuations
from test_judge import ContainsBackend  # tests/ is on sys.path (pytest prepend import mode)


def test_fluency_matches_a_hand_computation_and_drops_for_repetition():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(words("a b a b"), 2) == pytest.approx(h2)
    assert fluency("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    varied = "The river flows north through the old town, past the mill and into the lake."
    repeated = "the the the the the the the the the the the the the the the"
    assert fluency(varied) > 3 * fluency(repeated)
    assert mean_fluency([varied, repeated]) == pytest.approx((fluency(varied) + fluency(repeated)) / 2)
    with pytest.raises(ValueError):
        mean_fluency([])


def test_mcc_f1_and_label_parsing():
    assert matthews_corrcoef([1, 1, 0, 0], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 1, 0, 0], [0, 0, 1, 1]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0  # one predicted class only
    # tp=2, tn=1, fp=1, fn=1: (2·1 − 1·1)/√(3·3·2·2)
    assert matthews_corrcoef([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(1 / 6)
    assert f1_positive([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert parse_label(" Positive.", ("negative", "positive")) == 1
    assert parse_label("yes, it is", ("no", "yes")) == 1
    assert parse_label(" C", TASKS["mmlu"].labels) == 2
    assert parse_label("maybe", ("no", "yes")) is None and parse_label("...", ("no", "yes")) is None


def test_general_task_files_are_checked(tmp_path):
    with pytest.raises(GeneralTaskError, match="sst2.jsonl: file not found"):
        load_task(tmp_path, "sst2", 5)
    (tmp_path / "sst2.jsonl").write_text('{"sentence": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    with pytest.raises(GeneralTaskError, match=r"sst2.jsonl:2: missing field\(s\) \['sentence'\]"):
        load_task(tmp_path, "sst2", 5)
    assert len(load_task(tmp_path, "sst2", 1)) == 1
    (tmp_path / "rte.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 7}\n')
    with pytest.raises(GeneralTaskError, match="label 7 is not one of 0..1"):
        load_task(tmp_path, "rte", 5)


def test_general_abilities_choose_the_most_probable_label(shared_data, smollm2):
    folder = shared_data / "general"
    items = {task: load_task(folder, task, 4) for task in ("sst2", "cola", "nli", "mmlu")}
    result = evaluate_general(smollm2.model, smollm2.tokenizer, items, batch_size=8)
    for task in items:
        assert 0.0 <= result.metrics[f"general/{task}/generated"] <= 1.0 or task == "cola"
        assert 0.0 <= result.metrics[f"general/{task}/unparsable"] <= 1.0
    assert -1.0 <= result.metrics["general/cola"] <= 1.0
    assert len(result.rows) == 16
    # The teacher-forced choice of the first MMLU item is the label with the largest total log-probability.
    spec, item = TASKS["mmlu"], items["mmlu"][0]
    scores = score_continuations(smollm2.model, smollm2.tokenizer, [spec.prompt(item)] * 4,
                                 [f" {label}" for label in spec.labels])
    best = max(range(4), key=lambda i: sum(scores[i].token_logprobs))
    row = next(r for r in result.rows if r["task"] == "mmlu" and r["index"] == 0)
    assert row["forced"] == spec.labels[best]
    nli_gold = [TASKS["nli"].labels[TASKS["nli"].gold(x)] for x in items["nli"]]
    assert [r["gold"] for r in result.rows if r["task"] == "nli"] == nli_gold


def test_answer_queries_cover_every_dimension(shared_data):
    cf = load_records(shared_data / "counterfact" / "counterfact-edit.json", limit=1)[0]
    queries = answer_queries([cf])
    dims = [q.dimension for q in queries]
    assert dims.count("reliability") == 1 and dims.count("generalization") == len(cf.paraphrase_prompts)
    assert dims.count("locality") == len(cf.neighborhood)
    assert all(q.answers == (cf.target_new,) for q in queries if q.dimension != "locality")
    assert all(q.answers == (cf.target_true,) for q in queries if q.dimension == "locality")


def test_reasoning_answers_are_taken_after_think():
    settings = GenerationSettings(reasoning=True)
    assert final_answer("<think>Paris? no, Lyon.</think> Paris is the capital.", settings) == "Paris is the capital."
    assert final_answer("<think>still thinking", settings) == ""
    assert final_answer("Paris", GenerationSettings()) == "Paris"
    assert contains_answer("It is Paris.", ("Paris",)) and not contains_answer("It is Lyon.", ("Paris", "Paname"))


def test_generation_protocol_on_smollm2_unedited(smollm2):
    records = load_records("builtin", limit=3)
    settings = GenerationSettings()
    judge = Judge(ContainsBackend())
    pre = dict(zip(*(lambda ps: (ps, generate_answers(smollm2.model, smollm2.tokenizer, ps, settings)))(
        list(dict.fromkeys(q.prompt for q in answer_queries(records))))))
    result = evaluate_generation(smollm2.model, smollm2.tokenizer, records, judge, settings, pre_edit_answers=pre)
    m = result.metrics
    assert m["gen/locality_unchanged"] == 1.0  # same model, same greedy answers
    assert m["judge/agreement_with_contains"] == 1.0  # the fake judge grades by containment
    assert m["judge/reliability"] == m["gen/contains/reliability"] == 0.0  # unedited: nobody says the new target
    assert m["judge/unparsable"] == 0.0
    assert all(len(r["generation"]) > 0 and "\n" not in r["generation"] for r in result.rows)
    # Reusing answers (step 0) gives the same table without generating again.
    again = evaluate_generation(smollm2.model, smollm2.tokenizer, records, judge, settings, pre_edit_answers=pre,
                                answers=pre)
    assert again.metrics == m


def test_smollm2_trial_logs_both_protocols_and_the_edit_changes_what_it_says(tmp_path, shared_data):
    from mlflow import MlflowClient

    from grid.launch import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = ["method=memit", "data.limit=2", "edits.checkpoints=[2]", "stats.num_tokens=5000",
            f"cache_dir={tmp_path / 'cache'}", "eval.generate.enabled=true", "eval.judge.backend=hf",
            "eval.judge.model=trial",
            "eval.general.enabled=true", f"eval.general.path={shared_data / 'general'}",
            "eval.general.tasks=[sst2, mmlu]", "eval.general.n_items=4", "eval.fluency.enabled=true",
            "eval.fluency.num_prompts=2", "eval.fluency.max_new_tokens=20"]
    assert main(["--no-ray", "--no-progress", "--tracking-uri", uri,
                 *[x for s in sets for x in ("--set", s)]]) == 0
    client = MlflowClient(uri)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("editgrid-default").experiment_id])
              if r.data.tags.get("editgrid.role") == "trial"]
    assert run.data.tags["editgrid.protocol"] == "teacher_forced+generation_judge"
    assert run.data.tags["editgrid.judge"].startswith("hf:smollm2-135m@")

    def at(key, step):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}[step]

    for key in ("judge/reliability", "judge/generalization", "judge/locality", "gen/locality_unchanged",
                "gen/contains", "judge/agreement_with_contains", "judge/unparsable", "general/sst2", "general/mmlu",
                "gen/fluency"):
        assert math.isfinite(at(key, 0)) and math.isfinite(at(key, 2)), key
    assert at("gen/contains/reliability", 0) == 0.0
    assert at("gen/contains/reliability", 2) == 1.0  # after MEMIT the model says the new targets
    assert at("gen/locality_unchanged", 0) == 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "tables/generations")}
    assert {"tables/generations/step_000000.json", "tables/generations/step_000002.json"} <= artifacts
    assert any(a.path == "plots/generation_vs_edits.png" for a in client.list_artifacts(run.info.run_id, "plots"))
