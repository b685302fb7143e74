"""Grid configuration: overrides, validation messages (before any model loads), expansion, CLI errors."""

from __future__ import annotations

import pytest

from grid.config import ConfigError, expand_trials, load_config, parse_override
from grid.launch import main


def _expand(*overrides, path=None):
    cfg, source = load_config(path, list(overrides))
    return expand_trials(cfg, source)


def test_default_grid_expands_to_memit_and_alphaedit():
    trials = _expand()
    assert [t.config["method"] for t in trials] == ["memit", "alphaedit"]
    assert all("grid" not in t.config for t in trials)
    assert trials[0].trial_id != trials[1].trial_id
    assert _expand()[0].trial_id == trials[0].trial_id  # ids are content hashes: stable across loads


def test_set_pins_an_axis_and_parses_yaml_values():
    trials = _expand("method=alphaedit", "edits.checkpoints=[2,4]", "edits.batch_size=2", "data.limit=4")
    assert len(trials) == 1
    cfg = trials[0].config
    assert cfg["method"] == "alphaedit" and cfg["edits"]["checkpoints"] == [2, 4] and cfg["edits"]["batch_size"] == 2
    assert parse_override("stats.corpus=model-samples") == ("stats.corpus", "model-samples")
    assert parse_override("seed=3") == ("seed", 3)


def test_every_problem_is_reported_in_one_message(tmp_path):
    with pytest.raises(ConfigError) as info:
        _expand("method=nope", "edits.checkpoints=[5,3]", f"data.path={tmp_path / 'missing.json'}",
                "stats.num_tokens=10", "colour=blue")
    text = str(info.value)
    for expected in ("method: 'nope' is unknown", "strictly increasing", "missing.json", "stats.num_tokens",
                     "colour: unknown key"):
        assert expected in text, text


def test_hparams_are_checked_against_the_method_stages():
    with pytest.raises(ConfigError, match=r"hparams.v_lr: -1 is invalid"):
        _expand("method=memit", "hparams.v_lr=-1")
    with pytest.raises(ConfigError, match=r"hparams.nullspace_energy: unknown for method stages 'memit'"):
        _expand("method=memit", "hparams.nullspace_energy=0.1")
    with pytest.raises(ConfigError, match=r"hparams.nullspace_energy: 1.5 is invalid"):
        _expand("method=alphaedit", "hparams.nullspace_energy=1.5")
    with pytest.raises(ConfigError, match=r"hparams.layers"):
        _expand("method=memit", "hparams.layers=[3,3]")


def test_checkpoints_must_fall_between_batches_and_within_the_data():
    with pytest.raises(ConfigError, match=r"not multiples of edits.batch_size 4"):
        _expand("edits.batch_size=4", "edits.checkpoints=[6,8]", "data.limit=8")
    with pytest.raises(ConfigError, match=r"exceeds data.limit 5"):
        _expand("edits.checkpoints=[10]", "data.limit=5")


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    data = tmp_path / "edits.json"
    data.write_text("[]")
    monkeypatch.chdir(tmp_path)
    (trial,) = _expand("method=memit", "data.path=edits.json")
    assert trial.config["data"]["path"] == str(data)


def test_cli_local_with_several_trials_lists_them(capsys):
    assert main(["--local"]) == 2
    err = capsys.readouterr().err
    assert "--trial N" in err and "0: memit" in err and "1: alphaedit" in err


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["--set", "method=nope", "--list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration") and "Traceback" not in err


def test_cli_list_prints_trials(capsys):
    assert main(["--list"]) == 0
    assert "2 trial(s)" in capsys.readouterr().out


def test_layers_beyond_the_model_are_rejected_before_it_loads(capsys):
    assert main(["--set", "method=memit", "--set", "hparams.layers=[3,30]", "--list"]) == 2
    err = capsys.readouterr().err
    assert "hparams.layers [3, 30] reach beyond the 30 layers of smollm2-135m (valid: 0–29)" in err


@pytest.mark.parametrize(("method", "override", "message"), [
    ("prune", "hparams.prune_alpha=1.0", "hparams.prune_alpha: 1.0 is invalid (must be > 1)"),
    ("prune", "hparams.prune_beta=0.5", "hparams.prune_beta: 0.5 is invalid (must be > 1)"),
    ("prune", "hparams.prune_mode=sometimes", "hparams.prune_mode: 'sometimes' is invalid"),
    ("adaedit", "hparams.srfusion_k=0", "hparams.srfusion_k: 0 is invalid (must be in (0, 1])"),
    ("adaedit", "hparams.srfusion_k=1.5", "hparams.srfusion_k: 1.5 is invalid (must be in (0, 1])"),
    ("adaedit", "hparams.srfusion_r=0", "hparams.srfusion_r: 0 is invalid (must be an integer >= 1)"),
    ("adaedit", "hparams.srfusion_r=2.5", "hparams.srfusion_r: 2.5 is invalid"),
    ("rect", "hparams.rect_k=-0.2", "hparams.rect_k: -0.2 is invalid (must be in (0, 1])"),
    ("memit+dr", "hparams.drop_k=2", "hparams.drop_k: 2 is invalid"),
    ("lyaplock", "hparams.rho=0", "hparams.rho: 0 is invalid (must be > 0)"),
    ("lyaplock", "hparams.V=-1", "hparams.V: -1 is invalid (must be > 0)"),
    ("lyaplock+rect", "hparams.mom2_update_weight=.nan", "hparams.mom2_update_weight: nan is invalid"),
    ("rome", "hparams.layers=[3,4]", "solver 'rome' edits at most 1 layer(s)"),
    ("rome", "hparams.target_site=block", "ROME optimises v* at the MLP output"),
    ("ft", "hparams.v_lr=0.5", "hparams.v_lr: unknown for method stages 'ft'"),
    ("memit", "hparams.prune_alpha=2", "hparams.prune_alpha: unknown for method stages 'memit'"),
    ("scr", "hparams.scr_top_k=0", "hparams.scr_top_k: 0 is invalid (must be an integer >= 1)"),
    ("scr", "hparams.scr_top_k=2.5", "hparams.scr_top_k: 2.5 is invalid"),
    ("scr", "hparams.scr_index=ivf", "hparams.scr_index: 'ivf' is invalid (must be one of flat, hnsw)"),
    ("scr", "hparams.v_lr=0.5", "hparams.v_lr: unknown for method stages 'none+scr'"),
    ("memit+scr", "hparams.scr_embedder=''", "hparams.scr_embedder: '' is invalid"),
    ("memit", "hparams.scr_top_k=3", "hparams.scr_top_k: unknown for method stages 'memit'"),
    ("nonsense+scr", "seed=0", "method: 'nonsense+scr' is unknown"),
    ("scr+scr", "seed=0", "the base preset already has retrieval 'scr'"),
    ("memit", "eval.scr_latency_queries=-1", "eval.scr_latency_queries: -1 must be an integer >= 0"),
])
def test_stage_hyper_parameters_are_rejected_before_a_model_loads(method, override, message):
    with pytest.raises(ConfigError) as info:
        _expand(f"method={method}", override)
    assert message in str(info.value)


def test_every_preset_is_a_valid_composition():
    from grid.config import known_methods, method_settings
    from methods.stages import method_problems

    presets = known_methods()
    for required in ("memit", "alphaedit", "rome", "ft", "rect", "prune", "adaedit", "lyaplock", "lyaplock+prune",
                     "lyaplock+rect", "memit+prune", "alphaedit+prune"):
        assert required in presets
    for name in presets:
        assert method_problems(method_settings(name, {})) == [], name
    assert method_settings("adaedit", {}).tags["editgrid.reimplementation"].startswith("AdaEdit has no public code")
    lyap = method_settings("lyaplock+rect", {"rho": 5.0})
    assert (lyap.solver, lyap.transforms, lyap.hparams["rho"]) == ("lyaplock", ("rect",), 5.0)


def test_scr_in_front_of_any_parametric_preset():
    from grid.config import method_settings
    from methods.stages import method_problems

    scr = method_settings("scr", {})
    assert (scr.solver, scr.retrieval, scr.edits_weights) == ("none", "scr", False)
    assert scr.hparams == {"scr_top_k": 5, "scr_embedder": "default", "scr_index": "flat"}
    combined = method_settings("lyaplock+prune+scr", {"scr_top_k": 3, "V": 2.0})
    base = method_settings("lyaplock+prune", {})
    assert (combined.solver, combined.restraint, combined.retrieval) == ("lyaplock", "prune", "scr")
    assert combined.hparams == {**base.hparams, **scr.hparams, "scr_top_k": 3, "V": 2.0}
    assert method_problems(combined) == []
    cfg, source = load_config(None, ["method=memit"])
    cfg["grid"] = {"method": ["memit", "memit+scr", "scr"], "hparams.scr_top_k": [1, 5]}
    with pytest.raises(ConfigError, match="hparams.scr_top_k: unknown for method stages 'memit'"):
        expand_trials(cfg, source)  # an SCR axis cannot multiply a method without retrieval
    cfg["grid"] = {"method": ["memit+scr", "scr"], "hparams.scr_top_k": [1, 5]}
    assert len(expand_trials(cfg, source)) == 4


def test_presets_set_only_what_differs_from_the_registry_defaults():
    """The stage registry (methods/stages.py) is the one source of each default: a preset lists its composition and
    the values it changes, and ``method_settings`` resolves the rest from the registry."""
    import yaml

    from grid.config import known_methods, method_settings, preset_path
    from methods.stages import REQUIRED

    for name in known_methods():
        written = yaml.safe_load(preset_path(name).read_text(encoding="utf-8")).get("hparams") or {}
        spec = method_settings(name, {})
        defaults = spec.defaults()
        repeated = {key: value for key, value in written.items() if key in defaults and value == defaults[key]}
        assert not repeated, (f"configs/presets/{name}.yaml repeats the registry's defaults {repeated}: leave them "
                              "out (methods/stages.py owns them)")
        assert spec.hparams == {**{k: v for k, v in defaults.items() if v is not REQUIRED}, **written}, name
    ultra = method_settings("ultraedit", {"ultra_ridge": 2.0})  # config overrides still win over both
    assert (ultra.hparams["ultra_lr"], ultra.hparams["ultra_ridge"], ultra.hparams["ultra_micro_batch"]) == (
        1e-3, 2.0, 10)


def test_every_registered_hyper_parameter_has_one_valid_default():
    import inspect

    from methods.stages import (COMMON_PARAMS, EDITOR_KINDS, FROM_STAGE, REQUIRED, RESTRAINT_PARAMS,
                                RETRIEVAL_PARAMS, SOLVER_PARAMS, TARGET_PARAMS, TRANSFORM_PARAMS, TRANSFORMS,
                                MethodSpec, _value_problem, param_default)

    specs = [MethodSpec(solver=solver, transforms=tuple(TRANSFORMS), restraint=restraint, retrieval=retrieval)
             for solver in SOLVER_PARAMS for restraint in RESTRAINT_PARAMS for retrieval in RETRIEVAL_PARAMS]
    specs += [MethodSpec(solver="none", editor=kind) for kind in EDITOR_KINDS]
    seen = set()
    for spec in specs:
        for owners, params in spec.param_groups():
            for key, param in params.items():
                seen.add(key)
                default = param_default(key, param, owners)
                if default is REQUIRED:
                    assert param.default is REQUIRED, f"{key}: no default; declare it Param(..., default=REQUIRED)"
                    continue
                assert _value_problem(key, default, param, "default") is None, (key, default)
                if param.default is not FROM_STAGE:  # written on the Param: no stage class may write it too
                    name = param.arg or key
                    assert not any(name in inspect.signature(owner).parameters for owner in owners), key
    registered = {*COMMON_PARAMS, *TARGET_PARAMS, *RETRIEVAL_PARAMS["scr"]}
    for table in (SOLVER_PARAMS, TRANSFORM_PARAMS, RESTRAINT_PARAMS, RETRIEVAL_PARAMS):
        for params in table.values():
            registered |= set(params)
    for kind in EDITOR_KINDS.values():
        registered |= set(kind.params)
    assert seen == registered
    assert MethodSpec(solver="rome").hparam("target_site") == "block"  # what a spec without the key falls back to
    assert MethodSpec(solver="none", editor="grace").defaults()["grace_eps_init"] == 1.0

def test_stage_axes_expand_into_trials():
    cfg, source = load_config(None, ["method=lyaplock"])
    cfg["grid"] = {"hparams.V": [0.5, 2.0], "hparams.rho": [10, 60]}
    trials = expand_trials(cfg, source)
    assert sorted((t.config["hparams"]["V"], t.config["hparams"]["rho"]) for t in trials) == [
        (0.5, 10), (0.5, 60), (2.0, 10), (2.0, 60)]
    assert len({t.trial_id for t in trials}) == 4


def test_rome_layer_beyond_the_model_is_rejected_before_it_loads(capsys):
    assert main(["--set", "method=rome", "--set", "hparams.layers=[31]", "--list"]) == 2
    assert "reach beyond the 30 layers" in capsys.readouterr().err


def test_protocol_sections_are_validated_with_every_problem_listed(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as info:
        _expand("eval.generate.enabled=true", "eval.generate.unedited_answers.backend=openai",
                "eval.generate.unedited_answers.base_url=localhost:8000", "eval.generate.unedited_answers.min_agreement=2",
                "eval.generate.unedited_answers.concurrency=0", "eval.judge.backend=openai", "eval.judge.timeout_s=-1",
                "eval.general.enabled=true", f"eval.general.path={tmp_path}", "eval.general.tasks=[sst2, poetry]")
    text = str(info.value)
    for expected in ("eval.generate.unedited_answers.model: the openai backend needs the model it serves",
                     "eval.generate.unedited_answers.base_url: 'localhost:8000' must be the endpoint's http(s) URL",
                     "eval.generate.unedited_answers.min_agreement: 2 must be a number in [0, 1]",
                     "eval.generate.unedited_answers.concurrency: 0 must be an integer >= 1",
                     "eval.judge.model: the openai judge needs the model it serves",
                     "eval.judge.base_url: None must be the endpoint's http(s) URL",
                     "eval.judge.timeout_s: -1 must be a number >= 0", "eval.general.tasks"):
        assert expected in text, text
    with pytest.raises(ConfigError) as info:
        _expand("eval.lm_eval.enabled=true", "eval.lm_eval.limit=0", f"eval.lm_eval.include_path={tmp_path / 'no'}",
                "eval.lm_eval.steps=[3]")
    for expected in ("eval.lm_eval.tasks: [] must be a non-empty list", "eval.lm_eval.limit: 0 must be an integer >= 1",
                     "eval.lm_eval.include_path:", "eval.lm_eval.steps: [3] must be null or a list"):
        assert expected in str(info.value), str(info.value)
    with pytest.raises(ConfigError, match=r"stats.forward_dtype: 'float64' must be null, bfloat16 or float16"):
        _expand("stats.forward_dtype=float64")
    with pytest.raises(ConfigError, match=r"model_args.linear_backend: linear backend 'mkl' is not one of "
                                          r"\['auto', 'onednn', 'onednn-dense', 'aten'\]"):
        _expand("model_args.linear_backend=mkl")
    import methods.infra.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    with pytest.raises(ConfigError, match=r"model_args.linear_backend: linear backend 'onednn' asked for, but this "
                                          r"PyTorch build has no oneDNN linear"):
        _expand("model_args.linear_backend=onednn")
    _expand("model_args.linear_backend=auto")  # auto falls back to PyTorch's own products
    with pytest.raises(ConfigError, match=r"eval.generate.unedited_answers.backend: 'tgi' is not one of"):
        _expand("eval.generate.unedited_answers.backend=tgi")
    _expand("eval.generate.enabled=true", "eval.generate.unedited_answers.backend=vllm")  # model null: the trial's


def _setting_names(section: dict, prefix: str = ""):
    from grid.config import FREE_FORM_KEYS
    for key, value in section.items():
        if isinstance(value, dict) and value and key not in FREE_FORM_KEYS:
            yield from _setting_names(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_a_new_trial_setting_keeps_existing_trial_ids():
    """A 10,000-edit trial runs across sessions: its id must survive code that adds a setting, or its checkpoint
    and MLflow run are orphaned. New settings are listed with their neutral value (ADDED_SETTINGS)."""
    from pathlib import Path

    from grid.config import ADDED_SETTINGS, DEFAULTS, NOT_IN_TRIAL_ID, NOT_IN_TRIAL_ID_MODEL_ARGS, RUN_ONLY_KEYS

    issued = {line for line in (Path(__file__).parent / "data" / "trial_id_settings.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    trial_defaults = {k: v for k, v in DEFAULTS.items() if k not in RUN_ONLY_KEYS + NOT_IN_TRIAL_ID}
    excluded = {f"model_args.{k}" for k in NOT_IN_TRIAL_ID_MODEL_ARGS}
    unlisted = sorted(set(_setting_names(trial_defaults)) - issued - set(ADDED_SETTINGS) - excluded)
    assert not unlisted, (f"{unlisted}: new trial settings change every trial id; list each in "
                          "grid.config.ADDED_SETTINGS with the value that reproduces the behaviour before it")
    for dotted, neutral in ADDED_SETTINGS.items():
        section = DEFAULTS
        for key in dotted.split(".")[:-1]:
            section = section[key]
        assert section[dotted.rsplit(".", 1)[-1]] == neutral, f"{dotted}: its default must be its neutral value"


def test_an_added_setting_at_its_neutral_value_hashes_as_absent():
    import copy

    from grid.config import ADDED_SETTINGS, Trial

    trial = _expand("method=memit")[0]
    before = copy.deepcopy(trial.config)  # a trial as code without the added settings expanded it
    for dotted in ADDED_SETTINGS:
        *parents, leaf = dotted.split(".")
        section = before
        for key in parents:
            section = section[key]
        del section[leaf]
    assert Trial(0, before, {}).trial_id == trial.trial_id
    assert _expand("method=memit", "eval.judge.verdict=generate")[0].trial_id != trial.trial_id  # not neutral
    assert trial.config["eval"]["judge"]["verdict"] is None  # hashing never edits the trial's config
