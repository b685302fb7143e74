"""The memory plan of a trial, before its model loads (methods/infra/memory_plan.py does the estimate).

``plan_trial_memory`` reads the model's configuration (a local folder's config.json, the embedded model's converted
folder, or the Hugging Face cache; never the weights), estimates what the trial needs, logs the plan to the trial's
run as ``plan/memory_plan.json``, prints one summary line, and raises ``TrialError`` with the numbers when the total
exceeds ``model_args.max_memory`` or, when that is null, the device's total memory (the GPU's on CUDA, the
machine's RAM on CPU). A configuration that cannot be read here (a hub id while offline, an architecture the plan
does not know) only skips the plan with a warning: loading the model then reports its own error.
"""

from __future__ import annotations

import logging
from pathlib import Path

from methods.infra.memory_plan import (DTYPE_BYTES, Component, MemoryPlan, MemoryPlanError, check_budget,
                                       device_total_memory, format_bytes, load_model_config, model_shape, parse_size,
                                       plan_memory)

logger = logging.getLogger(__name__)

JUDGE_ROW_TOKENS = 160  # a generated-letter judge's rows carry logits over their whole prompt


def trial_memory_plan(cfg: dict, spec, cache_dir: Path | None = None) -> MemoryPlan:
    """The plan of one expanded trial configuration (``spec``: its resolved MethodSpec)."""
    margs = cfg["model_args"]
    config = load_model_config(str(cfg["model"]), cache_dir)
    plan = plan_memory(config, spec, batch_size=cfg["edits"]["batch_size"], dtype=margs["dtype"],
                       layers=spec.hparams.get("layers") or None, eval_batch_size=cfg["eval"]["batch_size"],
                       num_edits=cfg["edits"]["checkpoints"][-1], model=str(cfg["model"]), method=cfg["method"])
    judge = cfg["eval"]["judge"]
    if cfg["eval"]["generate"]["enabled"] and judge["backend"] == "hf":
        # The in-process judge is a second model held beside the edited one for the whole trial.
        from grid.config import judge_model_name, judge_verdict

        name = judge_model_name(judge, cfg["model"])
        shape = model_shape(load_model_config(name, cache_dir))
        width = DTYPE_BYTES.get(margs["dtype"], 4)
        rows = judge["batch_size"]
        tokens = 1 if judge_verdict(judge) == "logit" else JUDGE_ROW_TOKENS  # logit verdicts keep the last logits
        plan.components.append(Component(
            "judge model", shape.parameters * width + rows * tokens * shape.vocab * 4,
            f"{name}: {shape.parameters / 1e9:.2f} B parameters × {width} B + {rows} rows × {tokens} "
            "token(s) × V × 4 B logits"))
    return plan


def trial_budget(cfg: dict) -> tuple[int, str]:
    """(bytes, what they are): ``model_args.max_memory``, else the total memory of the device the trial runs on."""
    margs = cfg["model_args"]
    if margs.get("max_memory") is not None:
        return parse_size(margs["max_memory"]), f"model_args.max_memory {margs['max_memory']!r}"
    from methods.infra.models import resolve_device

    return device_total_memory(resolve_device(margs["device"]))


def plan_trial_memory(cfg: dict, spec, tracker, trial_name: str, cache_dir: Path | None = None) -> MemoryPlan | None:
    """Estimate, log and check the trial's memory before its model loads; TrialError when it cannot fit."""
    from grid.trial import TrialError

    try:
        plan = trial_memory_plan(cfg, spec, cache_dir)
    except Exception as err:  # noqa: BLE001 - an estimate must not stop a trial that may well load
        logger.warning("trial %s: no memory plan (%s); the model is loaded without one", trial_name, err)
        return None
    budget, where = trial_budget(cfg)
    record = {**plan.as_dict(), "budget_bytes": budget, "budget": where, "fits": plan.total <= budget}
    tracker.log_dict(record, "plan/memory_plan.json")
    print(f"trial {trial_name}: {plan.summary()}; budget {format_bytes(budget)} ({where})", flush=True)
    try:
        check_budget(plan, budget, where)
    except MemoryPlanError as err:
        raise TrialError(f"trial {trial_name}: {err}") from err
    return plan
