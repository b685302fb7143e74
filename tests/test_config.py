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
    with pytest.raises(ConfigError, match=r"hparams.nullspace_energy: unknown for solver 'memit'"):
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
