"""Smoke check of benchmarks/bench_editing.py on a tiny random Llama (never the real SmolLM2): it must run end to
end and write a JSON with the expected keys and positive timings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_editing.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_editing", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_editing_smoke(tmp_path, tiny_llama_dir, small_corpus):
    model_dir, corpus = tiny_llama_dir, small_corpus
    out = tmp_path / "bench.json"
    bench = _load_bench()
    code = bench.main(["--model", str(model_dir), "--num-edits", "2", "--data", "builtin",
                       "--stats-corpus", str(corpus), "--stats-tokens", "2000", "--cache-dir", str(tmp_path / "cache"),
                       "--layers", "1,2", "--json-out", str(out), "--quiet",
                       "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 0
    results = json.loads(out.read_text())

    assert {"config", "machine", "stats", "cells", "model_load_seconds"} <= set(results)
    for key in ("platform", "cpu_count", "torch", "transformers", "device", "dtype", "git_commit"):
        assert key in results["machine"]
    stats = results["stats"]
    assert stats["tokens"] == 2000 and stats["from_cache"] is False
    assert stats["seconds"] > 0 and stats["tokens_per_s"] > 0 and stats["pass_tokens_per_s"] > 0
    assert stats["layers"] == [1, 2]

    cells = results["cells"]
    assert [(c["method"], c["batch_size"]) for c in cells] == [("memit", 1), ("alphaedit", 1)]
    for cell in cells:
        assert cell["edits"] == 2 and cell["layers"] == [1, 2] and cell["eval_pairs"] > 0
        for key in ("seconds_per_edit", "target_seconds_per_edit", "solve_seconds_per_edit", "eval_pairs_per_s",
                    "peak_memory_mb"):
            summary = cell[key]
            assert summary["median"] > 0 and summary["min"] <= summary["median"] <= summary["max"], (key, summary)
        assert 0 < cell["vstar_target_prob"]["median"] <= 1
        parts = cell["target_seconds_per_edit"]["median"] + cell["solve_seconds_per_edit"]["median"]
        assert parts <= cell["seconds_per_edit"]["median"] * 1.01
        assert "edit/efficacy" in cell["runs"][0]["metrics"]

    from mlflow.tracking import MlflowClient
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(results["mlflow_run_id"])
    assert run.data.metrics["memit/b1/seconds_per_edit"] > 0
    assert run.data.params["model"] == str(model_dir)

    table = bench.format_results(results)
    assert "memit" in table and "alphaedit" in table and "s/edit" in table
