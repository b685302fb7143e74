"""Bad input ends in one clear message: a model folder without a model and an `hf:` data set that cannot load
offline are refused at validation (no model loads), and a domain error raised while running prints one `error:`
line without a traceback unless --debug is given (grid/errors.py, grid/launch.py)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from grid.config import ConfigError, expand_trials, load_config
from grid.errors import USER_ERROR_CLASSES, is_user_error
from methods.infra.models import model_problem


def _validate(*overrides: str) -> None:
    expand_trials(*load_config(None, ["grid={}", *overrides]), check_depth=True)


# ---------------------------------------------------------------------------------------------------------------
# Refused at validation
# ---------------------------------------------------------------------------------------------------------------

def test_a_folder_without_a_model_is_refused_with_the_folder_and_what_is_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError) as info:
        _validate(f"model={tmp_path}")
    message = str(info.value)
    assert f"model: the folder {tmp_path} is not a Hugging Face model folder" in message
    assert "no config.json" in message and "no weights" in message and "no tokenizer files" in message


def test_set_model_tmp_is_refused_by_the_command_line_before_anything_runs(capsys):
    from grid.launch import main

    if Path("/tmp/config.json").exists():
        pytest.skip("/tmp holds a config.json")
    assert main(["--list", "--set", "model=/tmp"]) == 2
    err = capsys.readouterr().err
    assert "the folder /tmp is not a Hugging Face model folder: it has no config.json" in err
    assert "Traceback" not in err


def test_model_paths_that_may_load_pass_and_missing_ones_are_named(tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    assert model_problem(str(tmp_path)) is None
    assert model_problem("smollm2-135m") is None
    assert model_problem("someone/some-model") is None  # a hub id: only loading can tell
    assert "no such folder" in model_problem(str(tmp_path / "absent"))
    assert "is a file, not a model folder" in model_problem(str(tmp_path / "config.json"))
    (tmp_path / "tokenizer.json").unlink()
    assert model_problem(str(tmp_path)).endswith("it has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                                                 "tokenizer.model, ...) (embedded models: smollm2-135m, gemma3-270m, "
                                                 "qwen2.5-coder-1.5b-instruct)")


@pytest.fixture
def empty_hf_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub, datasets_cache = tmp_path / "hub", tmp_path / "datasets"
    hub.mkdir()
    datasets_cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(datasets_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub, datasets_cache


def test_an_uncached_hub_dataset_is_refused_at_validation_while_offline(empty_hf_caches, monkeypatch):
    hub, datasets_cache = empty_hf_caches
    with pytest.raises(ConfigError) as info:
        _validate("data.path=hf:someone/Some_Facts::train")
    assert ("data.path: hf:someone/Some_Facts::train: the Hugging Face hub is offline (HF_HUB_OFFLINE or "
            "HF_DATASETS_OFFLINE is set) and dataset 'someone/Some_Facts' is not in the local cache") in str(info.value)
    (datasets_cache / "someone___some_facts").mkdir()  # how `datasets` stores a prepared copy
    _validate("data.path=hf:someone/Some_Facts::train")
    (datasets_cache / "someone___some_facts").rmdir()
    (hub / "datasets--someone--Some_Facts").mkdir()  # a hub snapshot
    _validate("data.path=hf:someone/Some_Facts::train")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    _validate("data.path=hf:someone/other")  # online: loading decides


# ---------------------------------------------------------------------------------------------------------------
# Errors while running: one message, --debug for the traceback
# ---------------------------------------------------------------------------------------------------------------

def test_every_named_user_error_is_an_exception_class():
    for dotted in USER_ERROR_CLASSES:
        module, _, name = dotted.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(cls, type) and issubclass(cls, Exception), dotted
    from evals.datasets import DatasetError
    from grid.trial import TrialError

    assert is_user_error(TrialError("x")) and is_user_error(DatasetError("x"))
    assert not is_user_error(RuntimeError("x")) and not is_user_error(KeyError("x"))


def _local_run_raising(monkeypatch, tmp_path, error: Exception, *extra: str):
    import grid.trial
    from grid.launch import main

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(grid.trial, "run_trial", fail)
    return main(["--local", "--trial", "0", "--no-progress", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                 *extra])


def test_a_domain_error_prints_one_message_and_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    from evals.datasets import DatasetError

    error = DatasetError("hf:someone/facts: hub dataset 'someone/facts' cannot be downloaded while offline")
    assert _local_run_raising(monkeypatch, tmp_path, error) == 2
    err = capsys.readouterr().err
    assert "error: hf:someone/facts: hub dataset 'someone/facts' cannot be downloaded while offline" in err
    assert "Traceback" not in err
    with pytest.raises(DatasetError):
        _local_run_raising(monkeypatch, tmp_path, error, "--debug")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback without --debug
        _local_run_raising(monkeypatch, tmp_path, ZeroDivisionError("bug"))
