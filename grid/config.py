"""Grid configuration: YAML files, ``--set`` overrides, validation before any model loads, expansion to trials.

A grid file holds one trial's settings plus an optional ``grid:`` mapping from dotted keys to lists of values;
each combination is one trial. ``--set key=value`` pins a key (and removes it from the axes). The method is a
preset name from ``configs/presets/<name>.yaml``; ``hparams:`` in the grid file overrides the preset's values.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.resources
import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from evals.abilities import DEFAULT_TASKS as ABILITY_TASKS
from evals.datasets import BUILTIN_NAME, DATASET_FORMATS, HUB_PREFIX, offline_hub_problem
from methods.corpus import CorpusError, parse_corpus
from methods.infra.cpu_linear import LinearBackendError, resolve_linear_backend
from methods.infra.memory_plan import MemoryPlanError, parse_size
from methods.infra.models import DTYPES, EMBEDDED_MODELS, model_problem
from methods.stages import LOCATE_THEN_EDIT, NO_SOLVER, REQUIRED, MethodSpec, method_problems
from methods.stats import FORWARD_DTYPE_BY_NAME

DEFAULTS: dict[str, Any] = {
    "experiment": "editgrid",
    "model": "smollm2-135m",
    # linear_backend: the kernel of the model's nn.Linear products (methods/infra/cpu_linear.py); auto = per weight shape
    # and row band whichever of oneDNN and PyTorch measured faster on this CPU (methods/infra/linear_plan.py)
    # max_memory: the budget a trial's memory plan must fit (methods/infra/memory_plan.py), e.g. "40GB" or bytes;
    # null = the device's total memory. How a trial runs, not what it computes: not in the trial id.
    "model_args": {"dtype": "auto", "device": "auto", "blocks": None, "mlp": None, "mlp_out": None,
                   "linear_backend": "auto", "max_memory": None},
    "data": {"path": BUILTIN_NAME, "format": "auto", "limit": None, "offset": 0},
    "method": "memit",
    "hparams": {},
    "edits": {"batch_size": 1, "checkpoints": [10]},
    # stats.seed only seeds the model-samples corpus; it is separate from the trial seed so that a seed axis
    # does not recompute the statistics for every seed.
    # stats.forward_dtype: null = the weights' precision; bfloat16/float16 = the statistics' forward pass under
    # autocast (faster on GPUs and CPUs with bf16 units; moves C far less than the corpus sample does, see
    # methods/stats.py), recorded in the cache key.
    "stats": {"corpus": "model-samples", "num_tokens": 100_000, "max_length": 256, "seed": 0, "forward_dtype": None},
    # scr_latency_queries: how many rewrite prompts per checkpoint are answered with and without SCR to measure
    # its added latency (0 turns the measurement off)
    "eval": {
        "batch_size": 32, "scr_latency_queries": 16,
        # Retention checkpoints (evals/retention.py): after N edits, a fixed seeded sample of sample_size of them,
        # equal parts from ``strata`` age bins (oldest … newest) plus the newest batch, each rate with a 95 % Wilson
        # interval; every edit when N <= sample_size. final: all = the last checkpoint scores every edit, sample =
        # it samples too. seed null = the trial's seed.
        "retention": {"sample_size": 500, "strata": 4, "seed": None, "final": "all"},
        # The autoregressive protocol (evals/autoregressive.py): generated answers graded by an LLM judge, at the
        # same checkpoints as the teacher-forced metrics. Off by default (it needs a judge).
        "generate": {"enabled": False, "max_new_tokens": 50, "chat_template": False, "reasoning": False,
                     "reasoning_max_new_tokens": 1024, "batch_size": 16,
                     # Where the UNEDITED model's answers come from (evals/answer_backends.py): hf = in process;
                     # vllm = vLLM's offline engine on ``model`` (null = the trial model's HF folder); openai = a
                     # completions endpoint at base_url serving ``model``. Edited models always answer in process.
                     # Before use, the backend's answers to ``verify_prompts`` prompts are compared with the
                     # in-process model's; below ``min_agreement`` the trial stops (it serves other weights).
                     "unedited_answers": {"backend": "hf", "model": None, "base_url": None,
                                          "api_key_env": "OPENAI_API_KEY", "requests_per_second": 0,
                                          "max_retries": 4, "concurrency": 8, "timeout_s": 60,
                                          "verify_prompts": 8, "min_agreement": 0.75}},
        # The judge (evals/judge.py). backend hf: a local transformers model (model null = the trial's model,
        # loaded a second time and never edited); vllm: vLLM's offline engine on ``model`` (an HF folder);
        # openai: an OpenAI-compatible endpoint at base_url serving ``model``, key from $<api_key_env>.
        # For hf, model null is the audited default judge (DEFAULT_JUDGE_MODEL) and ``trial`` the trial's own model.
        # verdict null: logit for hf (the sign of log P(A) − log P(B) in one forward pass, behind the worked
        # examples when few_shot; never unparsable), generate (a letter, parsed) for vllm and openai.
        "judge": {"backend": "hf", "model": None, "verdict": None, "few_shot": True,
                  "base_url": None, "api_key_env": "OPENAI_API_KEY",
                  "chat_template": True, "batch_size": 32, "requests_per_second": 0, "max_retries": 4,
                  "concurrency": 8, "constrained_choice": False, "timeout_s": 60},
        # Zero-shot general abilities (evals/general.py) from <path>/<task>.jsonl at the listed steps (null = step 0
        # and every checkpoint).
        "general": {"enabled": False, "path": None, "tasks": ["sst2", "mrpc", "cola", "rte", "nli", "mmlu"],
                    "n_items": 50, "steps": None, "generate": True},
        # Likelihood-scored abilities (evals/abilities.py) from <path> (a folder laid out like
        # the shared data's abilities/: <task>.jsonl, wikitext2_test.txt) at the listed steps (null = step 0 and every
        # checkpoint); the first n_items items per task; WikiText-2: its first wikitext_chars characters, scored in
        # windows of max_length tokens. The unedited model's results are cached (<cache dir>/abilities).
        "abilities": {"enabled": False, "path": None, "tasks": list(ABILITY_TASKS), "n_items": 200,
                      "wikitext_chars": 20_000, "max_length": 1024, "steps": None},
        # gen/fluency (evals/fluency.py): n-gram entropy of greedy continuations of the records' generation
        # prompts (their rewrite prompts when they have none).
        "fluency": {"enabled": False, "num_prompts": 20, "max_new_tokens": 100},
        # lm-evaluation-harness tasks on the in-memory model (evals/lm_eval_bridge.py; pip install
        # 'editgrid[lm-eval]'): hub tasks need their datasets cached; include_path = a folder of local task YAMLs.
        "lm_eval": {"enabled": False, "tasks": [], "limit": None, "num_fewshot": None, "batch_size": 16,
                    "include_path": None, "steps": None},
    },
    "seed": 0,
    "cache_dir": None,
    # Trial checkpoints (grid/trial_checkpoint.py): a retried or resubmitted trial continues from its last
    # checkpoint, written at every evaluation checkpoint and, between them, after the first batch that ends
    # every_minutes after the last save (null: only at evaluations; 0: after every batch). dir null =
    # <cache dir>/trial_checkpoints; keep_final keeps a finished trial's last one (its edited weights) instead of
    # deleting it. Not part of the trial's identity.
    "checkpoints": {"enabled": True, "dir": None, "keep_final": False, "every_minutes": 30},
    # Stop a trial early once it has collapsed (grid/collapse.py): at an evaluation checkpoint, when ``metric``
    # falls below ``below``. Off (metric null) by default: a complete table is the point of a grid.
    "stop_on_collapse": {"metric": None, "below": None, "above": None},
    "grid": {},
    # Conditional axes: method name -> its own axes ({hparam: [values]} or dotted keys), so a hyper-parameter only
    # multiplies the method it belongs to. Each method's combinations are crossed with the ``grid:`` axes.
    "methods": {},
    # How the grid runs on Ray (not part of any trial's identity: changing it does not change trial ids, so a
    # resubmission with other resources still finds its finished trials). cpus/gpus per trial may be fractional;
    # by_model maps a model name to its own {cpus, gpus}.
    "ray": {"cpus_per_trial": 1, "gpus_per_trial": 0, "by_model": {}, "max_failures": 1,
            "max_concurrent_trials": None},
}
RUN_ONLY_KEYS = ("grid", "methods", "ray")  # top-level keys that describe the grid, not a trial
# Trial keys that say how a trial is run, not what it computes: left out of the trial id, so changing them lets a
# resubmission still find the trial's finished run and its checkpoint.
NOT_IN_TRIAL_ID = ("checkpoints",)
NOT_IN_TRIAL_ID_MODEL_ARGS = ("max_memory",)  # the same, inside model_args
# Trial settings added to DEFAULTS after trials were first checkpointed, each with the value that computes what a
# trial computed before the setting existed. A trial holding that value is hashed as if the key were absent, so a
# multi-session trial (hours of edits in its checkpoint) started under older code still resumes under newer code.
# A new trial setting goes here with its neutral value; tests/test_config.py fails when one is missing.
ADDED_SETTINGS = {
    "eval.judge.verdict": None,
    "eval.judge.few_shot": True,
}


FREE_FORM_KEYS = ("grid", "methods", "hparams", "by_model")  # mappings whose keys are the user's, not ours


class ConfigError(ValueError):
    """One message listing every problem found in a configuration."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"invalid configuration {source}:\n  - " + "\n  - ".join(problems))


def configs_dir() -> Path:
    return Path(str(importlib.resources.files("configs")))


def default_config_path() -> Path:
    return configs_dir() / "default.yaml"


def preset_path(name: str) -> Path:
    return configs_dir() / "presets" / f"{name}.yaml"


RETRIEVAL_SUFFIX = "+scr"  # "<any parametric preset>+scr": that preset with the SCR fact memory in front


def known_methods() -> list[str]:
    """The preset names (configs/presets/*.yaml); each parametric one also exists as "<name>+scr"."""
    return sorted(p.stem for p in (configs_dir() / "presets").glob("*.yaml"))


def method_exists(method: str) -> bool:
    if preset_path(method).is_file():
        return True
    base = method[:-len(RETRIEVAL_SUFFIX)] if method.endswith(RETRIEVAL_SUFFIX) else None
    return bool(base) and preset_path(base).is_file()


def load_yaml(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(str(path), [f"file not found: {path}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"top level must be a mapping, got {type(data).__name__}"])
    return data


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in FREE_FORM_KEYS:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def get_dotted(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def set_dotted(cfg: dict, key: str, value) -> None:
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (so ``[10,30]`` is a list and ``5`` an int)."""
    if "=" not in text:
        raise ConfigError("--set", [f"{text!r} is not key=value"])
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> tuple[dict, str]:
    """The merged (defaults ← file ← overrides) grid configuration and a description of its source."""
    source = str(path) if path else f"{default_config_path()} (default grid)"
    cfg = deep_merge(DEFAULTS, load_yaml(Path(path) if path else default_config_path()))
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(cfg, key, value)
        cfg.get("grid", {}).pop(key, None)  # a pinned key is no longer an axis
        if key == "method":
            cfg["methods"] = {}  # ... and a pinned method replaces the per-method axes
        if key == "methods" and isinstance(cfg.get("grid"), dict):
            cfg["grid"].pop("method", None)  # per-method axes given on the command line replace a method axis
    return cfg, source


def _check_keys(cfg: dict, reference: dict, prefix: str, problems: list[str]) -> None:
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if key not in reference:
            problems.append(f"{name}: unknown key (known: {', '.join(sorted(reference))})")
        elif isinstance(reference[key], dict) and key not in FREE_FORM_KEYS:
            if not isinstance(value, dict):
                problems.append(f"{name}: must be a mapping, got {value!r}")
            else:
                _check_keys(value, reference[key], name + ".", problems)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


PRESET_KEYS = ("editor", "solver", "target_scaling", "transforms", "restraint", "retrieval", "tags", "hparams")


def method_settings(method: str, hparam_overrides: dict) -> MethodSpec:
    """The stages and resolved hyper-parameters of a method preset: the registry's defaults for its stages, the
    preset's values over them, the config's ``hparams`` over those.

    ``<preset>+scr`` (without a file of its own) is ``<preset>`` with the retrieval stage and the hyper-parameters
    of ``configs/presets/scr.yaml`` added, so every parametric preset can run behind the fact memory.
    """
    if not preset_path(method).is_file() and method.endswith(RETRIEVAL_SUFFIX):
        base = method_settings(method[:-len(RETRIEVAL_SUFFIX)], {})
        scr = method_settings(RETRIEVAL_SUFFIX[1:], {})
        if base.retrieval is not None:
            raise ConfigError(str(preset_path(method)), [f"{method!r}: the base preset already has retrieval "
                                                         f"{base.retrieval!r}"])
        return MethodSpec(solver=base.solver, transforms=base.transforms, editor=base.editor, restraint=base.restraint,
                          target_scaling=base.target_scaling, retrieval=scr.retrieval,
                          hparams={**base.hparams, **scr.hparams, **(hparam_overrides or {})},
                          tags={**base.tags, **scr.tags})
    path = preset_path(method)
    preset = load_yaml(path)
    unknown = sorted(set(preset) - set(PRESET_KEYS))
    transforms = preset.get("transforms") or []
    if unknown or not isinstance(transforms, list) or not isinstance(preset.get("hparams") or {}, dict):
        raise ConfigError(str(path), [f"a preset has the keys {', '.join(PRESET_KEYS)}; transforms is a list and "
                                      f"hparams a mapping (unknown keys: {unknown or 'none'})"])
    editor = preset.get("editor", LOCATE_THEN_EDIT)
    spec = MethodSpec(solver=preset.get("solver", method if editor == LOCATE_THEN_EDIT else NO_SOLVER),
                      editor=editor, transforms=tuple(transforms), target_scaling=preset.get("target_scaling"),
                      restraint=preset.get("restraint"), retrieval=preset.get("retrieval"),
                      tags=dict(preset.get("tags") or {}))
    # A preset lists only what differs from the stage registry's defaults (methods/stages.py); the resolved hparams
    # are every default of its stages ← the preset's values ← the config's overrides.
    defaults = {key: value for key, value in spec.defaults().items() if value is not REQUIRED}
    return replace(spec, hparams={**defaults, **(preset.get("hparams") or {}), **(hparam_overrides or {})})


def trial_problems(cfg: dict) -> list[str]:
    """Everything wrong with one expanded trial configuration (no model is loaded)."""
    problems: list[str] = []
    _check_keys(cfg, DEFAULTS, "", problems)
    if not isinstance(cfg.get("model"), str) or not cfg["model"]:
        problems.append(f"model: must be a hub id, a local folder or one of {sorted(EMBEDDED_MODELS)}")
    elif problem := model_problem(cfg["model"]):  # a local folder without a model, checked before any loading
        problems.append(f"model: {problem}")
    margs = cfg.get("model_args", {})
    if margs.get("dtype") not in ("auto", *DTYPES):
        problems.append(f"model_args.dtype: {margs.get('dtype')!r} is not auto or one of {sorted(DTYPES)}")
    if margs.get("max_memory") is not None:
        try:
            parse_size(margs["max_memory"])
        except MemoryPlanError as err:
            problems.append(f"model_args.max_memory: {err}; null = the device's total memory")
    try:  # the same check load_model makes; the device only matters for "auto", which is always valid
        resolve_linear_backend(margs.get("linear_backend"), torch.device("cpu"))
    except LinearBackendError as err:
        problems.append(f"model_args.linear_backend: {err}")

    data = cfg.get("data", {})
    path = data.get("path")
    if not isinstance(path, str) or not path:
        problems.append("data.path: must be a file path, 'builtin' or 'hf:<dataset>'")
    elif path != BUILTIN_NAME and not path.startswith(HUB_PREFIX) and not Path(path).is_file():
        problems.append(f"data.path: file not found: {path}")
    elif path.startswith(HUB_PREFIX) and (problem := offline_hub_problem(path)):
        problems.append(f"data.path: {problem}")
    if data.get("format") not in ("auto", *DATASET_FORMATS):
        problems.append(f"data.format: {data.get('format')!r} is not auto or one of {list(DATASET_FORMATS)}")
    limit = data.get("limit")
    if limit is not None and (not _is_int(limit) or limit < 1):
        problems.append(f"data.limit: {limit!r} must be a positive integer or null")
    if not _is_int(data.get("offset")) or data["offset"] < 0:
        problems.append(f"data.offset: {data.get('offset')!r} must be an integer >= 0")

    edits = cfg.get("edits", {})
    batch = edits.get("batch_size")
    if not _is_int(batch) or batch < 1:
        problems.append(f"edits.batch_size: {batch!r} must be an integer >= 1")
        batch = None
    checkpoints = edits.get("checkpoints")
    if not isinstance(checkpoints, list) or not checkpoints or not all(_is_int(c) and c > 0 for c in checkpoints):
        problems.append(f"edits.checkpoints: {checkpoints!r} must be a non-empty list of positive integers")
    else:
        if sorted(set(checkpoints)) != checkpoints:
            problems.append(f"edits.checkpoints: {checkpoints} must be strictly increasing")
        if batch:
            bad = [c for c in checkpoints if c % batch]
            if bad:
                problems.append(f"edits.checkpoints: {bad} are not multiples of edits.batch_size {batch} "
                                "(a checkpoint must fall between two batches)")
        if _is_int(limit) and checkpoints[-1] > limit:
            problems.append(f"edits.checkpoints: the last checkpoint {checkpoints[-1]} exceeds data.limit {limit}")

    method = cfg.get("method")
    if not isinstance(method, str) or not method_exists(method):
        problems.append(f"method: {method!r} is unknown (known: {', '.join(known_methods())}; "
                        f"and <parametric preset>{RETRIEVAL_SUFFIX})")
    else:
        hparams = cfg.get("hparams") or {}
        if not isinstance(hparams, dict):
            problems.append(f"hparams: must be a mapping, got {hparams!r}")
        else:
            try:
                problems += method_problems(method_settings(method, hparams))
            except ConfigError as err:
                problems += [f"method {method!r}: {p}" for p in err.problems]

    stats = cfg.get("stats", {})
    try:
        parse_corpus(str(stats.get("corpus")))
    except CorpusError as err:
        problems.append(f"stats.corpus: {err}")
    if not _is_int(stats.get("num_tokens")) or stats["num_tokens"] < 1000:
        problems.append(f"stats.num_tokens: {stats.get('num_tokens')!r} must be an integer >= 1000")
    if not _is_int(stats.get("max_length")) or stats["max_length"] < 8:
        problems.append(f"stats.max_length: {stats.get('max_length')!r} must be an integer >= 8")
    if stats.get("forward_dtype") is not None and stats.get("forward_dtype") not in FORWARD_DTYPE_BY_NAME:
        problems.append(f"stats.forward_dtype: {stats.get('forward_dtype')!r} must be null, "
                        f"{' or '.join(FORWARD_DTYPE_BY_NAME)}")
    if not _is_int(stats.get("seed")):
        problems.append(f"stats.seed: {stats.get('seed')!r} must be an integer")
    if not _is_int(cfg.get("eval", {}).get("batch_size")) or cfg["eval"]["batch_size"] < 1:
        problems.append(f"eval.batch_size: {cfg.get('eval', {}).get('batch_size')!r} must be an integer >= 1")
    latency_queries = cfg.get("eval", {}).get("scr_latency_queries")
    if not _is_int(latency_queries) or latency_queries < 0:
        problems.append(f"eval.scr_latency_queries: {latency_queries!r} must be an integer >= 0")
    problems += _protocol_problems(cfg.get("eval", {}), cfg.get("edits", {}).get("checkpoints"), cfg.get("model"))
    problems += _retention_problems(cfg.get("eval", {}).get("retention") or {})
    if not _is_int(cfg.get("seed")):
        problems.append(f"seed: {cfg.get('seed')!r} must be an integer")
    problems += _checkpoint_problems(cfg.get("checkpoints") or {})
    problems += collapse_problems(cfg.get("stop_on_collapse") or {})
    return problems


JUDGE_BACKENDS = ("hf", "vllm", "openai")
JUDGE_VERDICTS = ("logit", "generate")
# The judge of backend hf when eval.judge.model is null: audited on verdicts known by construction
# (docs/second_protocol.md, "How far the judge can be trusted").
DEFAULT_JUDGE_MODEL = "qwen2.5-coder-1.5b-instruct"


def judge_model_name(judge: dict, trial_model) -> str:
    """The model an hf judge loads: ``eval.judge.model``, the default judge when null, the trial's model for
    ``trial``."""
    model = judge.get("model")
    if model is None:
        return DEFAULT_JUDGE_MODEL
    return str(trial_model) if model == "trial" else str(model)


def judge_verdict(judge: dict) -> str:
    """logit or generate (null: logit for hf, generate for the engines that only return text)."""
    return judge.get("verdict") or ("logit" if judge.get("backend") == "hf" else "generate")
ANSWER_BACKENDS = ("hf", "vllm", "openai")


def _retention_problems(retention: dict) -> list[str]:
    problems = []
    size, strata, seed = retention.get("sample_size"), retention.get("strata"), retention.get("seed")
    if not _is_int(size) or size < 1:
        problems.append(f"eval.retention.sample_size: {size!r} must be an integer >= 1")
    if not _is_int(strata) or strata < 1:
        problems.append(f"eval.retention.strata: {strata!r} must be an integer >= 1")
    elif _is_int(size) and strata > size:
        problems.append(f"eval.retention.strata: {strata} age bins cannot each get an edit of a sample of {size}")
    if seed is not None and not _is_int(seed):
        problems.append(f"eval.retention.seed: {seed!r} must be null (the trial's seed) or an integer")
    if retention.get("final") not in ("all", "sample"):
        problems.append(f"eval.retention.final: {retention.get('final')!r} must be 'all' (score every edit at the "
                        "last checkpoint) or 'sample'")
    return problems


def _protocol_problems(ev: dict, checkpoints, trial_model=None) -> list[str]:
    """eval.generate / eval.judge / eval.general / eval.fluency."""
    from evals.general import TASKS

    problems = []

    def positive_int(name: str, value, minimum: int = 1) -> None:
        if not _is_int(value) or value < minimum:
            problems.append(f"eval.{name}: {value!r} must be an integer >= {minimum}")

    def flag(name: str, value) -> None:
        if not isinstance(value, bool):
            problems.append(f"eval.{name}: {value!r} must be true or false")

    def endpoint_url(name: str, value) -> None:
        if not (isinstance(value, str) and value.startswith(("http://", "https://"))):
            problems.append(f"eval.{name}: {value!r} must be the endpoint's http(s) URL, e.g. http://127.0.0.1:8000/v1")

    def endpoint_numbers(name: str, section: dict) -> None:
        positive_int(f"{name}.concurrency", section.get("concurrency"))
        positive_int(f"{name}.max_retries", section.get("max_retries"), 0)
        for key in ("requests_per_second", "timeout_s"):
            value = section.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                problems.append(f"eval.{name}.{key}: {value!r} must be a number >= 0")

    gen = ev.get("generate") or {}
    for key in ("enabled", "chat_template", "reasoning"):
        flag(f"generate.{key}", gen.get(key))
    for key in ("max_new_tokens", "reasoning_max_new_tokens", "batch_size"):
        positive_int(f"generate.{key}", gen.get(key))
    unedited = gen.get("unedited_answers") or {}
    if unedited.get("backend") not in ANSWER_BACKENDS:
        problems.append(f"eval.generate.unedited_answers.backend: {unedited.get('backend')!r} is not one of "
                        f"{list(ANSWER_BACKENDS)}")
    if gen.get("enabled") is True and unedited.get("backend") in ("vllm", "openai"):
        if unedited["backend"] == "openai":
            if not unedited.get("model"):
                problems.append("eval.generate.unedited_answers.model: the openai backend needs the model it serves")
            endpoint_url("generate.unedited_answers.base_url", unedited.get("base_url"))
        endpoint_numbers("generate.unedited_answers", unedited)
        positive_int("generate.unedited_answers.verify_prompts", unedited.get("verify_prompts"))
        share = unedited.get("min_agreement")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            problems.append(f"eval.generate.unedited_answers.min_agreement: {share!r} must be a number in [0, 1]")
    judge = ev.get("judge") or {}
    if judge.get("backend") not in JUDGE_BACKENDS:
        problems.append(f"eval.judge.backend: {judge.get('backend')!r} is not one of {list(JUDGE_BACKENDS)}")
    if gen.get("enabled") is True:
        if judge.get("backend") in ("vllm", "openai") and not judge.get("model"):
            problems.append(f"eval.judge.model: the {judge.get('backend')} judge needs the model it serves")
        if judge.get("backend") == "openai":
            endpoint_url("judge.base_url", judge.get("base_url"))
    for key in ("chat_template", "constrained_choice", "few_shot"):
        flag(f"judge.{key}", judge.get(key))
    if judge.get("verdict") is not None and judge.get("verdict") not in JUDGE_VERDICTS:
        problems.append(f"eval.judge.verdict: {judge.get('verdict')!r} is not one of {list(JUDGE_VERDICTS)} "
                        "(or null: logit for hf, generate otherwise)")
    elif judge.get("verdict") == "logit" and judge.get("backend") in ("vllm", "openai"):
        problems.append(f"eval.judge.verdict: logit verdicts need the model in process (backend hf); the "
                        f"{judge.get('backend')} backend generates its letter (set verdict: generate or null)")
    if gen.get("enabled") is True and judge.get("backend") == "hf":
        problem = model_problem(judge_model_name(judge, trial_model))
        if problem:
            problems.append(f"eval.judge.model: {problem}")
    positive_int("judge.batch_size", judge.get("batch_size"))
    endpoint_numbers("judge", judge)
    general = ev.get("general") or {}
    flag("general.enabled", general.get("enabled"))
    flag("general.generate", general.get("generate"))
    positive_int("general.n_items", general.get("n_items"))
    tasks = general.get("tasks")
    if not isinstance(tasks, list) or not tasks or any(t not in TASKS for t in tasks):
        problems.append(f"eval.general.tasks: {tasks!r} must be a non-empty list of {sorted(TASKS)}")
    if general.get("enabled") is True:
        folder = general.get("path")
        if not isinstance(folder, str) or not Path(folder).is_dir():
            problems.append(f"eval.general.path: {folder!r} must be a folder holding <task>.jsonl files")
        elif isinstance(tasks, list):
            missing = [t for t in tasks if t in TASKS and not (Path(folder) / f"{t}.jsonl").is_file()]
            if missing:
                problems.append(f"eval.general.path: {folder} has no {', '.join(f'{t}.jsonl' for t in missing)}")
    def steps_subset(name: str, steps) -> None:
        if steps is not None:
            allowed = {0, *(checkpoints if isinstance(checkpoints, list) else [])}
            if not isinstance(steps, list) or any(not _is_int(x) or x not in allowed for x in steps):
                problems.append(f"eval.{name}: {steps!r} must be null or a list of 0 and edits.checkpoints "
                                f"values {sorted(allowed)}")

    steps_subset("general.steps", general.get("steps"))
    problems += _abilities_problems(ev.get("abilities") or {})
    steps_subset("abilities.steps", (ev.get("abilities") or {}).get("steps"))
    harness = ev.get("lm_eval") or {}
    flag("lm_eval.enabled", harness.get("enabled"))
    positive_int("lm_eval.batch_size", harness.get("batch_size"))
    for key, minimum in (("limit", 1), ("num_fewshot", 0)):
        if harness.get(key) is not None:
            positive_int(f"lm_eval.{key}", harness.get(key), minimum)
    steps_subset("lm_eval.steps", harness.get("steps"))
    if harness.get("enabled") is True:
        from evals.lm_eval_bridge import lm_eval_installed

        tasks = harness.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            problems.append(f"eval.lm_eval.tasks: {tasks!r} must be a non-empty list of task names")
        folder = harness.get("include_path")
        if folder is not None and not (isinstance(folder, str) and Path(folder).is_dir()):
            problems.append(f"eval.lm_eval.include_path: {folder!r} must be a folder of task YAML files or null")
        if not lm_eval_installed():
            problems.append("eval.lm_eval.enabled: lm-evaluation-harness is not installed "
                            "(pip install 'editgrid[lm-eval]')")
    fluency = ev.get("fluency") or {}
    flag("fluency.enabled", fluency.get("enabled"))
    positive_int("fluency.num_prompts", fluency.get("num_prompts"))
    positive_int("fluency.max_new_tokens", fluency.get("max_new_tokens"))
    return problems


def _abilities_problems(section: dict) -> list[str]:
    """eval.abilities (evals/abilities.py), but its steps (checked with the other sections' steps)."""
    from evals.abilities import TASK_NAMES, task_file

    problems = []
    if not isinstance(section.get("enabled"), bool):
        problems.append(f"eval.abilities.enabled: {section.get('enabled')!r} must be true or false")
    for key, minimum in (("n_items", 1), ("wikitext_chars", 1), ("max_length", 1)):
        value = section.get(key)
        if not _is_int(value) or value < minimum:
            problems.append(f"eval.abilities.{key}: {value!r} must be an integer >= {minimum}")
    tasks = section.get("tasks")
    if (not isinstance(tasks, list) or not tasks or any(not isinstance(t, str) or t not in TASK_NAMES for t in tasks)
            or len(set(tasks)) != len(tasks)):
        problems.append(f"eval.abilities.tasks: {tasks!r} must be a non-empty list of distinct names from "
                        f"{list(TASK_NAMES)}")
        tasks = []
    if section.get("enabled") is True:
        folder = section.get("path")
        if not isinstance(folder, str) or not Path(folder).is_dir():
            problems.append(f"eval.abilities.path: {folder!r} must be a folder holding the tasks' files "
                            "(e.g. the shared data's abilities folder)")
        else:
            missing = [task_file(t) for t in tasks if not (Path(folder) / task_file(t)).is_file()]
            if missing:
                problems.append(f"eval.abilities.path: {folder} has no {', '.join(missing)}")
    return problems


def _checkpoint_problems(section: dict) -> list[str]:
    problems = []
    for key in ("enabled", "keep_final"):
        if not isinstance(section.get(key), bool):
            problems.append(f"checkpoints.{key}: {section.get(key)!r} must be true or false")
    folder = section.get("dir")
    if folder is not None and (not isinstance(folder, str) or not folder):
        problems.append(f"checkpoints.dir: {folder!r} must be a folder path or null (= <cache dir>/trial_checkpoints)")
    every = section.get("every_minutes")
    if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0):
        problems.append(f"checkpoints.every_minutes: {every!r} must be a number of minutes >= 0 (0: after every "
                        "batch) or null (only at evaluation checkpoints)")
    return problems


def collapse_problems(section: dict) -> list[str]:
    metric = section.get("metric")
    bounds = {key: section.get(key) for key in ("below", "above") if section.get(key) is not None}
    if metric is None:
        return [f"stop_on_collapse.{key}: {value!r} is set but stop_on_collapse.metric is not"
                for key, value in bounds.items()]
    problems = []
    if not isinstance(metric, str) or "/" not in metric:
        problems.append(f"stop_on_collapse.metric: {metric!r} must be a metric logged at checkpoints, e.g. "
                        "edit/efficacy or diag/L7/drift")
    if not bounds:
        problems.append(f"stop_on_collapse: metric {metric!r} needs a threshold, below: <number> and/or above: "
                        "<number>")
    for key, value in bounds.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            problems.append(f"stop_on_collapse.{key}: {value!r} must be a number")
    return problems


@dataclass(frozen=True)
class Trial:
    index: int
    config: dict  # fully expanded, no ``grid`` key
    axes: dict  # the axis values that distinguish this trial

    @property
    def trial_id(self) -> str:
        """Content hash of the configuration: the same settings give the same id (used to name and resume)."""
        identity = copy.deepcopy({k: v for k, v in self.config.items() if k not in NOT_IN_TRIAL_ID})
        if isinstance(identity.get("model_args"), dict):
            identity["model_args"] = {k: v for k, v in identity["model_args"].items()
                                      if k not in NOT_IN_TRIAL_ID_MODEL_ARGS}
        for dotted, neutral in ADDED_SETTINGS.items():
            *parents, leaf = dotted.split(".")
            section = identity
            for key in parents:
                section = section.get(key) if isinstance(section, dict) else None
            if isinstance(section, dict) and leaf in section and section[leaf] == neutral:
                del section[leaf]
        blob = json.dumps(identity, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def name(self) -> str:
        cfg = self.config
        parts = [cfg["method"], Path(str(cfg["model"])).name, f"b{cfg['edits']['batch_size']}"]
        parts += [f"{k.split('.')[-1]}={v}" for k, v in self.axes.items()
                  if k not in ("method", "model", "edits.batch_size")]
        return "-".join(str(p) for p in parts)


def _absolutize_paths(cfg: dict) -> None:
    """Trials may run in another working directory (Ray Tune changes it), so file paths become absolute."""
    path = cfg["data"].get("path")
    if isinstance(path, str) and path not in (BUILTIN_NAME,) and not path.startswith(HUB_PREFIX):
        cfg["data"]["path"] = str(Path(path).expanduser().resolve())
    corpus = cfg["stats"].get("corpus")
    if isinstance(corpus, str) and not corpus.startswith(("model-samples", "hf:")):
        cfg["stats"]["corpus"] = str(Path(corpus).expanduser().resolve())
    if cfg.get("cache_dir"):
        cfg["cache_dir"] = str(Path(cfg["cache_dir"]).expanduser().resolve())
    for section in (cfg["eval"]["general"], cfg["eval"]["abilities"]):
        if isinstance(section.get("path"), str):
            section["path"] = str(Path(section["path"]).expanduser().resolve())
    harness = cfg["eval"].get("lm_eval") or {}
    if isinstance(harness.get("include_path"), str):
        harness["include_path"] = str(Path(harness["include_path"]).expanduser().resolve())
    if cfg["checkpoints"].get("dir"):
        cfg["checkpoints"]["dir"] = str(Path(cfg["checkpoints"]["dir"]).expanduser().resolve())


def _method_combos(methods, problems: list[str]) -> list[dict]:
    """``methods:`` as a list of {dotted key: value} combinations (one list per method, concatenated)."""
    if not methods:
        return [{}]
    if not isinstance(methods, dict):
        problems.append(f"methods: must map method names to their axes, got {methods!r}")
        return [{}]
    combos = []
    for name, axes in methods.items():
        axes = axes or {}
        if not isinstance(axes, dict):
            problems.append(f"methods.{name}: must map hyper-parameters to lists of values, got {axes!r}")
            continue
        keys = [key if "." in key else f"hparams.{key}" for key in axes]
        bad = [f"methods.{name}.{key}: must be a non-empty list of values, got {values!r}"
               for key, values in axes.items() if not isinstance(values, list) or not values]
        if bad:
            problems += bad
            continue
        for values in itertools.product(*axes.values()):
            combos.append({"method": name, **dict(zip(keys, values))})
    return combos or [{}]


def expand_trials(cfg: dict, source: str = "config", check_depth: bool = False) -> list[Trial]:
    """Validate and expand the grid into trials; raises ConfigError listing every problem of every trial.
    ``check_depth``: also check ``hparams.layers`` against each model's depth, read from its config
    (``layer_problems``; no weights load), in the same message.

    Trials are ``methods:`` combinations (each method with its own axes) × ``grid:`` axes.
    """
    axes = cfg.get("grid") or {}
    problems = []
    if not isinstance(axes, dict):
        raise ConfigError(source, [f"grid: must be a mapping of dotted keys to lists, got {axes!r}"])
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key}: must be a non-empty list of values, got {values!r}")
    method_combos = _method_combos(cfg.get("methods"), problems)
    if cfg.get("methods") and "method" in axes:
        problems.append("grid.method and methods: name the methods in one place (methods: lets each have its own "
                        "hyper-parameter axes)")
    if problems:
        raise ConfigError(source, problems)
    keys = list(axes)
    trials = []
    combos = [(method_combo, dict(zip(keys, values)))
              for method_combo in method_combos for values in itertools.product(*(axes[k] for k in keys))]
    for index, (method_combo, grid_combo) in enumerate(combos):
        chosen = {**method_combo, **grid_combo}
        trial_cfg = copy.deepcopy({k: v for k, v in cfg.items() if k not in RUN_ONLY_KEYS})
        for key, value in chosen.items():
            set_dotted(trial_cfg, key, copy.deepcopy(value))
        label = ", ".join(f"{k}={v}" for k, v in chosen.items())
        problems += [f"trial {index} ({label}): {p}" if chosen else p for p in trial_problems(trial_cfg)]
        trials.append(Trial(index=index, config=trial_cfg, axes=chosen))
    if check_depth:  # each model's config read once for all its trials
        problems += layer_problems(trials)
    problems += ray_problems(cfg)
    experiments = sorted({str(t.config.get("experiment")) for t in trials})
    if len(experiments) > 1:
        problems.append(f"experiment: one grid logs to one MLflow experiment (its parent run's); the grid gives "
                        f"{experiments}")
    if problems:
        raise ConfigError(source, sorted(set(problems), key=problems.index))
    for trial in trials:
        _absolutize_paths(trial.config)
    return trials


def _resource_problem(name: str, value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return f"{name}: {value!r} must be a number >= 0 (fractions share a device)"
    return None


def ray_problems(cfg: dict) -> list[str]:
    """Problems of the ``ray:`` section (how the grid runs, not what a trial computes)."""
    ray_cfg = cfg.get("ray") or {}
    problems: list[str] = []
    _check_keys({"ray": ray_cfg}, {"ray": DEFAULTS["ray"]}, "", problems)
    for key in ("cpus_per_trial", "gpus_per_trial"):
        problem = _resource_problem(f"ray.{key}", ray_cfg.get(key))
        if problem:
            problems.append(problem)
    if not ray_cfg.get("cpus_per_trial") and not ray_cfg.get("gpus_per_trial"):
        problems.append("ray: a trial must ask for some cpus or gpus (cpus_per_trial and gpus_per_trial are both 0)")
    by_model = ray_cfg.get("by_model") or {}
    if not isinstance(by_model, dict):
        problems.append(f"ray.by_model: must map model names to {{cpus, gpus}}, got {by_model!r}")
        by_model = {}
    for model, wanted in by_model.items():
        if not isinstance(wanted, dict) or set(wanted) - {"cpus", "gpus"}:
            problems.append(f"ray.by_model.{model}: must be a mapping with cpus and/or gpus, got {wanted!r}")
            continue
        for key, value in wanted.items():
            problem = _resource_problem(f"ray.by_model.{model}.{key}", value)
            if problem:
                problems.append(problem)
    failures = ray_cfg.get("max_failures")
    if not _is_int(failures) or failures < 0:
        problems.append(f"ray.max_failures: {failures!r} must be an integer >= 0 (retries of a failed trial)")
    concurrent = ray_cfg.get("max_concurrent_trials")
    if concurrent is not None and (not _is_int(concurrent) or concurrent < 1):
        problems.append(f"ray.max_concurrent_trials: {concurrent!r} must be an integer >= 1 or null (no limit)")
    return problems


def trial_resources(trial: Trial, ray_cfg: dict) -> dict[str, float]:
    """Ray resources of one trial: its model's entry in ``ray.by_model``, else the per-trial defaults."""
    wanted = (ray_cfg.get("by_model") or {}).get(str(trial.config["model"]), {})
    return {"CPU": float(wanted.get("cpus", ray_cfg["cpus_per_trial"])),
            "GPU": float(wanted.get("gpus", ray_cfg["gpus_per_trial"]))}


def layer_problems(trials: list[Trial]) -> list[str]:
    """``hparams.layers`` (or the layers an editor kind's own settings name) outside a model's depth, read from each
    model's config (no weights are loaded).

    Models whose config cannot be read here (a hub id while offline) are left to fail, with their own message,
    when the trial loads them.
    """
    from transformers import AutoConfig

    from methods.infra.models import model_folder

    depth: dict[str, int | None] = {}
    problems = []
    for trial in trials:
        cfg = trial.config
        try:
            spec = method_settings(cfg["method"], cfg.get("hparams") or {})
            layers, setting = spec.hparams.get("layers"), "hparams.layers"
            if not layers and spec.kind is not None and spec.kind.layers_from is not None:
                layers = spec.kind.layers_from(spec.hparams)  # the layers the editor's own settings name
                setting = f"the layers of {spec.kind.layers_from_setting}"
        except (ConfigError, TypeError, AttributeError, ValueError):  # unknown method, bad hparams: reported already
            continue
        if not layers or not isinstance(layers, list) or not all(_is_int(layer) for layer in layers):
            continue
        model = str(cfg["model"])
        if model not in depth:
            try:
                cache_dir = Path(cfg["cache_dir"]) if cfg.get("cache_dir") else None
                depth[model] = AutoConfig.from_pretrained(model_folder(model, cache_dir)).num_hidden_layers
            except Exception:  # noqa: BLE001 - unreadable here; the trial reports it when loading the model
                depth[model] = None
        if depth[model] is not None and max(layers) >= depth[model]:
            problems.append(f"trial {trial.index} ({trial.name}): {setting} {layers} reach beyond the "
                            f"{depth[model]} layers of {model} (valid: 0–{depth[model] - 1})")
    return problems
