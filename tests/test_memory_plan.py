"""The memory plan (methods/infra/memory_plan.py, grid/memory_plan.py; issue 21 deliverable 3): estimated from a
model's configuration alone, logged before the model loads, and a trial that cannot fit refused with the numbers.
No weights are loaded here except the tiny model folder of the end-to-end refusal (which is refused before)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grid.config import ConfigError, expand_trials, load_config, method_settings
from methods.infra.memory_plan import (MemoryPlanError, check_budget, main as plan_main, meta_parameter_count,
                                       method_spec, model_shape, parse_size, plan_memory, read_config_file)

CONFIGS = Path(__file__).resolve().parent / "data" / "model_configs"
TINY = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 4,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 20, "tie_word_embeddings": True}


def test_a_tiny_config_gives_the_hand_computed_bytes():
    # d = 8, m = 12, L = 4, V = 20, 2 heads of 4, 1 key/value head (kv = 4), tied embeddings
    params = 20 * 8 + 4 * ((8 * 8 + 2 * 8 * 4 + 8 * 8) + 3 * 8 * 12 + 2 * 8) + 8  # embed, blocks, final norm
    assert params == 2152
    plan = plan_memory(TINY, method_spec("memit"), batch_size=3, dtype="float32", layers=[1, 2], eval_batch_size=2)
    got = {c.name: c.bytes for c in plan.components}
    rows = 3 * 7  # 6 context templates + the KL prompt per request
    assert got == {
        "weights": params * 4,
        "statistics": 2 * 12 * 12 * 8,
        "stats buffer": 2 * 4096 * 12 * 4,
        "W0 copies": 2 * 8 * 12 * 4,
        "solver": 2 * 2 * 12 * 12 * 8 + 12 * 12 * 8 + 8 * 12 * 8,
        # 21 rows × 32 tokens = 672 ≤ the 1024-token chunk; blocks above the site (layer 2): 4 − 2
        "v* activations": (rows * 32) * 2 * (8 * 8 + 4 * 12) * 4 + rows * 16 * 4 * 2 * 4 * 4 + rows * 16 * 8 * 4
        + 3 * 20 * 4,
        "evaluation": 2 * 16 * 20 * (4 + 8) + 2 * 64 * (2 * 8 + 2 * 12) * 4,
    }
    assert plan.total == sum(got.values())
    alpha = plan_memory(TINY, method_spec("alphaedit"), batch_size=3, dtype="float32", layers=[1, 2])
    assert alpha.component("solver").bytes == 2 * 3 * 12 * 12 * 8 + 2 * 12 * 12 * 8 + 8 * 12 * 8


def test_ultraedit_on_gate_and_up_plans_no_statistics_and_one_unedited_copy_per_matrix():
    """The original's Llama-3-8B setting (gate 11–15 + up 18–24): its 12 matrices need no C (1.6 GB each at
    m = 14,336), only their W₀ copies and Δs."""
    config = read_config_file(CONFIGS / "meta-llama-3-8b.json")
    targets = {"gate_proj": [11, 12, 13, 14, 15], "up_proj": [18, 19, 20, 21, 22, 23, 24]}
    spec = method_settings("ultraedit", {"ultra_targets": targets})
    plan = plan_memory(config, spec, batch_size=100, dtype="bfloat16")
    names = {c.name for c in plan.components}
    assert "statistics" not in names and "stats buffer" not in names
    assert plan.layers == [11, 12, 13, 14, 15, 18, 19, 20, 21, 22, 23, 24]
    assert plan.component("W0 copies").bytes == 12 * 4096 * 14336 * 2
    down = plan_memory(config, method_settings("ultraedit", {}), batch_size=100, dtype="bfloat16")
    assert down.component("statistics").bytes == len(down.layers) * 14336 ** 2 * 8


def test_llama3_8b_from_its_config_file_alone():
    config = read_config_file(CONFIGS / "meta-llama-3-8b.json")
    plan = plan_memory(config, method_spec("memit"), batch_size=100, dtype="bfloat16",
                       model="meta-llama/Meta-Llama-3-8B", method="memit")
    assert plan.shape.parameters == 8_030_261_248
    assert plan.component("weights").bytes == 8_030_261_248 * 2 == pytest.approx(16.06e9, rel=1e-3)
    assert plan.layers == [4, 5, 6, 7, 8]  # the architecture's default window (methods/infra/arch.py)
    assert plan.component("statistics").bytes == 5 * 14336 ** 2 * 8
    table = plan.table()
    assert "meta-llama/Meta-Llama-3-8B" in table and "16.06 GB" in table and "total" in table
    # AlphaEdit keeps three m×m float64 matrices per layer where MEMIT keeps two
    alpha = plan_memory(config, method_spec("alphaedit"), batch_size=100, dtype="bfloat16")
    assert alpha.total > plan.total
    # the v* graph is bounded by v_chunk_tokens: batch 100 costs little more than batch 1
    one = plan_memory(config, method_spec("memit"), batch_size=1, dtype="bfloat16")
    assert one.component("v* activations").bytes < plan.component("v* activations").bytes < 10e9


def test_the_shipped_configs_count_like_transformers_does():
    expected = {"meta-llama-3-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512, "gpt-j-6b": 6_050_882_784}
    for name, count in expected.items():
        shape = model_shape(read_config_file(CONFIGS / f"{name}.json"))
        assert shape.parameters == count and not shape.tied
    assert model_shape(read_config_file(CONFIGS / "gpt-j-6b.json")).intermediate == 4 * 4096  # n_inner null
    # the per-family formulas against the model built on the meta device (nothing allocated), small shapes
    from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, Qwen2Config
    small = dict(vocab_size=100, bos_token_id=0, eos_token_id=0)
    for cfg in (LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True, **small),
                Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=False, **small),
                GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, tie_word_embeddings=False, **small),
                GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, **small),
                GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                              **small)):
        assert model_shape(cfg).parameters == meta_parameter_count(cfg), cfg.model_type


def test_a_plan_over_budget_is_refused_with_the_total_the_budget_and_the_big_components():
    config = read_config_file(CONFIGS / "meta-llama-3-8b.json")
    plan = plan_memory(config, method_spec("memit"), batch_size=100, dtype="bfloat16",
                       model="meta-llama/Meta-Llama-3-8B", method="memit")
    check_budget(plan, parse_size("80GB"), "an 80 GB GPU")  # fits
    with pytest.raises(MemoryPlanError) as info:
        check_budget(plan, parse_size("24GB"), "model_args.max_memory '24GB'")
    message = str(info.value)
    assert f"needs about {plan.total / 1e9:.2f} GB, more than the 24.00 GB of model_args.max_memory '24GB'" in message
    for name in ("weights", "statistics", "solver"):
        assert f"{name} {plan.component(name).bytes / 1e9:.2f} GB" in message


def test_sizes_are_read_and_bad_ones_refused():
    assert parse_size("40GB") == 40 * 10**9 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("512 MB") == 512 * 10**6 and parse_size(4096) == 4096
    for bad in ("lots", "-3GB", 0, True, "40 GX", [40]):
        with pytest.raises(MemoryPlanError):
            parse_size(bad)


def test_config_validation_rejects_a_malformed_max_memory():
    cfg, source = load_config(None, ["model_args.max_memory=forty gigs"])
    with pytest.raises(ConfigError) as info:
        expand_trials(cfg, source)
    assert "model_args.max_memory: 'forty gigs' is not a size" in str(info.value)
    cfg, source = load_config(None, ["model_args.max_memory=40GB"])
    trials = expand_trials(cfg, source)
    # how a trial runs, not what it computes: the budget leaves the trial ids alone
    assert [t.trial_id for t in trials] == [t.trial_id for t in expand_trials(*load_config(None, []))]


def test_the_command_line_prints_the_plan_and_refuses_a_small_device(capsys):
    path = str(CONFIGS / "meta-llama-3-8b.json")
    assert plan_main(["--config", path, "--method", "memit", "--batch-size", "100", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "memit, batch 100, weights bfloat16, layers [4, 5, 6, 7, 8]" in out and "16.06 GB" in out
    assert plan_main(["--config", path, "--method", "alphaedit", "--batch-size", "100", "--dtype", "bfloat16",
                      "--max-memory", "24GB"]) == 1
    err = capsys.readouterr().err
    assert "more than the 24.00 GB of --max-memory 24GB" in err


def test_method_spec_matches_grid_method_settings():
    for method in ("memit", "alphaedit", "lyaplock", "ultraedit", "wise", "grace", "memoir", "ft"):
        assert method_spec(method) == method_settings(method, {}), method


def test_a_trial_that_cannot_fit_is_refused_before_its_model_loads(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    import grid.trial
    from grid.launch import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although the plan does not fit")

    monkeypatch.setattr(grid.trial, "load_model", no_loading)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["--local", "--no-progress", "--tracking-uri", uri, "--set", f"model={tiny_llama_dir}",
                 "--set", "method=memit", "--set", "model_args.max_memory=1MB", "--set", "data.limit=2",
                 "--set", "edits.checkpoints=[2]",
                 "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "experiment=plan-refusal"])
    captured = capsys.readouterr()
    assert code != 0
    assert "needs about" in captured.err and "more than the 1.00 MB of model_args.max_memory '1MB'" in captured.err
    assert "memory plan for" in captured.out  # the summary line came first
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("plan-refusal").experiment_id])
    plan = json.loads(Path(client.download_artifacts(run.info.run_id, "plan/memory_plan.json", str(tmp_path)))
                      .read_text())
    assert plan["fits"] is False and plan["budget_bytes"] == 10**6 and plan["total_bytes"] > 10**6


def test_a_trial_that_fits_logs_its_plan_against_the_machines_memory(tiny_llama_dir, capsys):
    from grid.memory_plan import plan_trial_memory

    class Tracker:
        logged = {}

        def log_dict(self, obj, artifact_file):
            self.logged[artifact_file] = obj

    cfg, source = load_config(None, [f"model={tiny_llama_dir}", "method=memit", "model_args.device=cpu"])
    (trial,) = expand_trials(cfg, source)
    tracker = Tracker()
    plan = plan_trial_memory(trial.config, method_settings("memit", {}), tracker, trial.name)
    record = tracker.logged["plan/memory_plan.json"]
    assert record["fits"] and record["total_bytes"] == plan.total and "RAM" in record["budget"]
    assert plan.layers == [0, 1, 2, 3] and plan.shape.tied  # the default window of a 4-layer model, tied embeddings
    assert f"trial {trial.name}: memory plan for" in capsys.readouterr().out


def test_an_in_process_judge_is_planned_and_a_judge_too_large_is_refused_with_its_size(tiny_llama_dir):
    """A trial with the second protocol holds its judge model beside the edited one: the plan counts it from the
    judge's config (here Qwen2.5-7B's, never loaded) and refuses a budget it cannot fit, naming the judge."""
    from grid.memory_plan import trial_memory_plan

    sets = [f"model={tiny_llama_dir}", "method=memit", "eval.generate.enabled=true"]

    def planned(*extra):
        (trial,) = expand_trials(*load_config(None, sets + list(extra)))
        trial.config["eval"]["judge"]["model"] = str(CONFIGS / "qwen2.5-7b.json")  # its config file stands in
        return trial_memory_plan(trial.config, method_settings("memit", {}))

    plan = planned()
    judge = plan.component("judge model")
    assert 7.5e9 * 4 < judge.bytes < 7.8e9 * 4 + 1e8  # 7.6 B parameters in float32, one logit row per item
    assert "qwen2.5-7b.json" in judge.formula and "1 token(s)" in judge.formula
    generated = planned("eval.judge.verdict=generate").component("judge model")
    assert generated.bytes > judge.bytes + 32 * 100 * 150_000 * 4  # a generated letter keeps logits per prompt token
    with pytest.raises(MemoryPlanError, match=r"judge model \d+\.\d+ GB"):
        check_budget(plan, 20 * 10**9, "model_args.max_memory '20GB'")
    (plain,) = expand_trials(*load_config(None, sets[:2]))
    assert "judge model" not in {c.name for c in trial_memory_plan(plain.config, method_settings("memit", {})).components}
