"""SCR through the trial runner on the real SmolLM2-135M and real CounterFact records: the memory raises
efficacy without touching a weight, every scr/* metric reaches MLflow, the per-checkpoint memory is saved and
reloads, and the memory also runs in front of an edited model (memit+scr). Marked slow."""

from __future__ import annotations

import pytest

from grid.config import expand_trials, load_config
from grid.trial import run_trial

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("scr")
    return {"uri": f"sqlite:///{root}/mlflow.db", "cache": str(root / "cache"), "root": root,
            "data": str(shared_data / "counterfact" / "counterfact-edit.json"),
            "corpus": str(shared_data / "general")}


def _run(env, method, limit, checkpoints, batch):
    cfg, source = load_config(None, [f"method={method}", "experiment=scr", f"data.path={env['data']}",
                                     "data.offset=5000", f"data.limit={limit}", f"edits.batch_size={batch}",
                                     f"edits.checkpoints={checkpoints}", f"stats.corpus={env['corpus']}",
                                     "stats.num_tokens=5000", f"cache_dir={env['cache']}",
                                     "eval.scr_latency_queries=4"])
    (trial,) = expand_trials(cfg, source)
    return run_trial(trial, env["uri"], progress=False)


def test_scr_alone_raises_efficacy_and_logs_retrieval(env):
    from mlflow import MlflowClient

    from retrieval.embedder import Embedder
    from retrieval.memory import FactMemory

    result = _run(env, "scr", 10, "[5,10]", 5)
    before, after = result.checkpoints[0], result.checkpoints[-1]
    assert after["step"] == 10
    assert after["edit/efficacy"] >= before["edit/efficacy"] + 0.3
    assert after["edit/generalization"] > before["edit/generalization"]

    client = MlflowClient(env["uri"])
    run = client.get_run(result.run_id)
    metrics, tags = run.data.metrics, run.data.tags
    assert (tags["editgrid.solver"], tags["editgrid.retrieval"]) == ("none", "scr")
    assert not any(name.startswith(("diag/", "editing/", "vstar/")) for name in metrics)  # no weight was edited
    assert metrics["scr/recall_at_k/rewrite"] == 1.0
    assert metrics["scr/recall_at_k/generalization"] >= 0.9
    for name in ("scr/acceptance_rate", "scr/correct_selection_rate", "scr/locality_rejection_rate",
                 "scr/unparsable_rate"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["scr/latency/base_ms_per_query"] > 0 and metrics["scr/latency/scr_ms_per_query"] > 0
    assert metrics["scr/latency/decide_ms_per_query"] > 0
    sizes = [(m.step, m.value) for m in client.get_metric_history(result.run_id, "scr/memory_size")]
    assert sorted(sizes) == [(0, 0.0), (5, 5.0), (10, 10.0)]

    local = client.download_artifacts(result.run_id, "checkpoints/scr_memory", str(env["root"] / "dl"))
    memory = FactMemory.load(local, Embedder())
    assert len(memory) == 10 and memory.facts[0].endswith(".")
    table = client.download_artifacts(result.run_id, "tables/scr_decisions/step_000010.json", str(env["root"]))
    assert "shown_prompt" in open(table).read()


def test_scr_in_front_of_memit(env):
    from mlflow import MlflowClient

    result = _run(env, "memit+scr", 4, "[4]", 2)
    metrics = MlflowClient(env["uri"]).get_run(result.run_id).data.metrics
    assert result.checkpoints[-1]["edit/efficacy"] >= 0.75
    assert "diag/L7/drift" in metrics and "scr/recall_at_k/generalization" in metrics
