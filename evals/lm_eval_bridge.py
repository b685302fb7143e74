"""Optional bridge to EleutherAI's lm-evaluation-harness (``pip install 'editgrid[lm-eval]'``): its tasks run on the
trial's model *in memory* — edited or not, no copy — through the harness' ``HFLM`` wrapper.

For users who have the harness' datasets: hub tasks need them cached (tests and CI are offline), and local tasks
are task YAMLs in ``include_path`` (a ``dataset_path: json`` task over JSONL files works offline; see
tests/test_lm_eval_bridge.py). Every numeric result becomes ``lm_eval/<task>/<metric>`` (the harness' filter
suffix ``,none`` dropped, any other filter appended), ``lm_eval/<task>/n_items`` the documents scored; standard
errors are left out.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from evals.metric_names import lm_eval_metric

logger = logging.getLogger(__name__)


class LmEvalUnavailable(RuntimeError):
    """lm-evaluation-harness is not installed, or a task it was asked for is unknown to it."""


def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def metric_name(task: str, key: str) -> str | None:
    """``lm_eval/<task>/<metric>`` for a harness result key such as ``acc,none``; None for what is not a score."""
    metric, _, result_filter = key.partition(",")
    if key == "alias" or metric.endswith("_stderr"):
        return None
    if key == "sample_len":  # how many documents were scored
        return lm_eval_metric(task, "n_items")
    return lm_eval_metric(task, metric, result_filter)


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 16,
                include_path: str | Path | None = None, num_fewshot: int | None = None) -> tuple[dict[str, float], dict]:
    """The harness' ``tasks`` on ``model`` as it is; returns (metrics, the harness' per-task results)."""
    if not lm_eval_installed():
        raise LmEvalUnavailable("eval.lm_eval needs lm-evaluation-harness: pip install 'editgrid[lm-eval]'")
    import lm_eval  # noqa: PLC0415 - optional dependency
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path is not None else ""
        raise LmEvalUnavailable(f"eval.lm_eval.tasks: {unknown} are not lm-evaluation-harness tasks{where}")
    was_training = model.training
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                         task_manager=manager, log_samples=False, bootstrap_iters=0)
    finally:
        model.train(was_training)
    metrics = {}
    for task, values in output["results"].items():
        for key, value in values.items():
            name = metric_name(task, key)
            if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[name] = float(value)
    return metrics, output["results"]
