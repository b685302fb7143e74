"""Smoke check of benchmarks/bench_editing.py on a tiny random Llama (never the real SmolLM2): it must run end to
end and write a JSON with the expected keys and positive timings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_editing.py"


def _load_bench(script: str = "bench_editing.py"):
    spec = importlib.util.spec_from_file_location(Path(script).stem, BENCH.parent / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_editing_smoke(tmp_path, tiny_llama_dir, small_corpus, capsys):
    model_dir, corpus = tiny_llama_dir, small_corpus
    out = tmp_path / "bench.json"
    bench = _load_bench()
    code = bench.main(["--model", str(model_dir), "--num-edits", "2", "--data", "builtin",
                       "--stats-corpus", str(corpus), "--stats-tokens", "2000", "--cache-dir", str(tmp_path / "cache"),
                       "--layers", "1,2", "--json-out", str(out), "--quiet", "--set", "v_num_grad_steps=3",
                       "--eval-generations", "2", "--batch-sizes", "1,2", "--vstar-autocast", "none,bfloat16",
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
    assert results["config"]["hparams"] == {"v_num_grad_steps": 3}

    cells = results["cells"]
    assert [(c["method"], c["vstar_autocast"], c["batch_size"]) for c in cells] == [
        (method, precision, size) for method in ("memit", "alphaedit") for precision in ("none", "bfloat16")
        for size in (1, 2)]
    for cell in cells:
        ratio = cell["seconds_per_edit"]["median"] / next(
            c["seconds_per_edit"]["median"] for c in cells
            if (c["method"], c["vstar_autocast"], c["batch_size"]) == (cell["method"], cell["vstar_autocast"], 1))
        assert cell["seconds_per_edit_vs_batch_1"] == ratio
        assert 1 <= cell["vstar_steps_per_request"]["median"] <= 3
        assert 0 < cell["edit_peak_memory_mb"]["median"] <= cell["peak_memory_mb"]["median"]
        assert 0 <= cell["efficacy"]["median"] <= 1
        assert cell["edits"] == 2 and cell["layers"] == [1, 2] and cell["eval_pairs"] > 0
        for key in ("seconds_per_edit", "target_seconds_per_edit", "solve_seconds_per_edit", "eval_pairs_per_s",
                    "eval_to_edit_ratio", "generations_per_s", "judgments_per_s", "peak_memory_mb"):
            summary = cell[key]
            assert summary["median"] > 0 and summary["min"] <= summary["median"] <= summary["max"], (key, summary)
        assert 0 < cell["vstar_target_prob"]["median"] <= 1
        parts = cell["target_seconds_per_edit"]["median"] + cell["solve_seconds_per_edit"]["median"]
        assert parts <= cell["seconds_per_edit"]["median"] * 1.01
        assert "edit/efficacy" in cell["runs"][0]["metrics"]

    from mlflow.tracking import MlflowClient
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(results["mlflow_run_id"])
    assert run.data.metrics["memit/b1/seconds_per_edit"] > 0
    assert run.data.metrics["memit/bfloat16/b2/seconds_per_edit"] > 0
    assert run.data.params["model"] == str(model_dir)

    table = bench.format_results(results)
    assert "memit" in table and "alphaedit" in table and "s/edit" in table and "÷ batch 1" in table
    assert "bfloat16" in table
    with capsys.disabled():  # the regression guard's figures, in the CI log (tiny random model: it must run, not be fast)
        print("\nbench_editing smoke (tiny random Llama):\n" + table)


def test_reference_workload_fills_unset_options_only(tmp_path):
    bench = _load_bench()
    data = tmp_path / "data"
    (data / "counterfact").mkdir(parents=True)
    (data / "general").mkdir()
    (data / "counterfact" / "counterfact-edit.json").write_text("[]")
    (data / "general" / "b.jsonl").write_text(json.dumps({"sentence1": "A sentence long enough to be kept.",
                                                          "sentence2": "too short", "label": 1}) + "\n\n")
    (data / "general" / "a.jsonl").write_text(json.dumps({"question": "What is\nthe capital of France, then?",
                                                          "subject": "high_school_geography", "choices": ["Paris is it"]}) + "\n")
    parser = bench.build_parser()
    args = parser.parse_args(["--reference-workload", str(data), "--methods", "memit", "--set", "v_lr=0.3"])
    args.hparam_values, problems = bench._parse_hparams(args.hparams)
    assert not problems
    bench.apply_reference_workload(args, tmp_path)
    assert args.methods == ["memit"]  # given explicitly: kept
    assert args.num_edits == 50 and args.layers == [4, 5, 6, 7, 8] and args.fresh_stats is True
    assert args.hparam_values == {"v_lr": 0.3, "v_num_grad_steps": 25}
    assert args.data == str(data / "counterfact" / "counterfact-edit.json")
    # every sentence field (with a space) longer than 20 characters, one per line, files in sorted order, whitespace folded
    assert Path(args.stats_corpus).read_text().splitlines() == ["What is the capital of France, then?",
                                                                "A sentence long enough to be kept."]
    assert bench._parse_hparams(["novalue"])[1] == ["--set expects NAME=VALUE, got 'novalue'"]


def test_reference_corpus_of_the_shared_data_is_the_issues_corpus(shared_data, tmp_path):
    """The side-by-side's statistics corpus: ≈ 8.9k lines of ../shared/data/general/*.jsonl (issue 7)."""
    corpus = _load_bench().write_reference_corpus(shared_data, tmp_path / "corpus.txt")
    assert len(corpus.read_text(encoding="utf-8").splitlines()) == 8920


def test_bench_linear_backend_smoke(tmp_path, tiny_llama_dir, shared_data, capsys):
    from methods.infra.cpu_linear import onednn_available

    if not onednn_available():
        import pytest
        pytest.skip("this PyTorch build has no oneDNN linear")
    module = _load_bench("bench_linear_backend.py")
    out = tmp_path / "linear.json"
    data = shared_data / "counterfact" / "counterfact-edit.json"
    code = module.main(["--model", str(tiny_llama_dir), "--data", str(data), "--num-edits", "2", "--layers", "1,2",
                        "--steps", "3", "--rows", "1,7", "--repeats", "1", "--json-out", str(out),
                        "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    results = json.loads(out.read_text())
    vstar = results["vstar"]
    assert vstar["requests"] == 2 and set(vstar["seconds"]) == {"aten", "onednn-dense", "onednn", "auto"}
    assert max(vstar["vstar_relative_difference_max"].values()) < 1e-4
    assert all(len(seconds) == 2 for seconds in vstar["seconds"].values())
    assert {row["rows"] for row in results["products"]} == {1, 7}
    assert all(row["aten_us"] > 0 and row["onednn_us"] > 0 and row["onednn-dense_us"] > 0
               for row in results["products"])
    plan = results["auto_plan"]  # only the tiny model's 64->49152 head is big enough for oneDNN to take over
    # ... and only at the row bands within the output-size cap (up to 8 rows: bands 1, 2–7 and 8)
    from methods.infra.cpu_linear import MAX_OUTPUT_ELEMENTS
    from methods.infra.linear_plan import ROW_BANDS
    allowed = [band for band in ROW_BANDS if band[0] <= MAX_OUTPUT_ELEMENTS // 49152]
    assert [entry["product"] for entry in plan["measurements"]] == ["64->49152"] * len(allowed) == ["64->49152"] * 3
    assert [entry["band"][1] for entry in plan["measurements"]] == [1, 7, 8]
    assert all(entry["aten_us"] > 0 and entry["onednn_us"] > 0 for entry in plan["measurements"])
    printed = capsys.readouterr().out
    assert "packed over dense oneDNN, per request" in printed and "backend auto's plan on this machine" in printed


def test_bench_stats_paired_smoke(tmp_path, tiny_llama_dir, small_corpus, capsys):
    module = _load_bench("bench_stats_paired.py")
    out = tmp_path / "paired.json"
    current = BENCH.parents[1] / "methods" / "stats.py"
    code = module.main(["--against", str(current), "--model", str(tiny_llama_dir), "--corpus", str(small_corpus),
                        "--layers", "1,2", "--tokens", "1500", "--max-length", "64", "--rounds", "2",
                        "--json-out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert all(len(values) == 2 and min(values) > 0 for values in results["seconds"].values())
    assert results["tokens"] == {"against": 1500, "current": 1500} and len(results["ratio_per_round"]) == 2
    assert max(results["moment_relative_difference"].values()) < 1e-12  # the same file against itself
    assert "current / against per round" in capsys.readouterr().out
    assert module.main(["--against", str(tmp_path / "missing.py"), "--corpus", str(small_corpus)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bench_runs_a_target_scaling_method_with_its_anchor_from_the_benchmarks_records(tmp_path, tiny_llama_dir,
                                                                                       small_corpus):
    out = tmp_path / "bench.json"
    code = _load_bench().main(["--model", str(tiny_llama_dir), "--num-edits", "2", "--data", "builtin",
                               "--methods", "memit+nas", "--stats-corpus", str(small_corpus),
                               "--stats-tokens", "2000", "--cache-dir", str(tmp_path / "cache"), "--layers", "1,2",
                               "--json-out", str(out), "--quiet", "--set", "v_num_grad_steps=3",
                               "--eval-generations", "0", "--batch-sizes", "1"])
    assert code == 0
    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["method"] == "memit+nas" and cell["edits"] == 2
    assert len(list((tmp_path / "cache" / "nas").glob("*.json"))) == 1  # r from the 2 edited records, cached
