"""The optional collapse stopper (``stop_on_collapse``): end a trial at the first evaluation checkpoint where it
has collapsed, instead of spending the rest of its edit budget on a dead model.

``metric`` is any metric the trial logs at its checkpoints (edit/efficacy, edit/specificity, diag/L7/drift, …);
the trial stops when it falls below ``below`` or rises above ``above``. The checkpoint where it stopped is logged
like any other, so the curve shows the collapse, and the run carries the tag ``editgrid.stopped_early``.
"""

from __future__ import annotations

import math


class CollapseConfigError(ValueError):
    """stop_on_collapse names a metric this trial does not log."""


def collapse_reason(settings: dict, metrics: dict[str, float], step: int, trial_name: str) -> str | None:
    """Why the trial should stop after ``step`` edits, or None to go on."""
    metric = settings.get("metric")
    if not metric:
        return None
    if metric not in metrics:
        close = sorted(name for name in metrics if name.split("/")[0] == metric.split("/")[0])
        raise CollapseConfigError(f"trial {trial_name}: stop_on_collapse.metric {metric!r} is not logged at "
                                  f"checkpoints by this trial (same family: {', '.join(close) or 'none'})")
    value = metrics[metric]
    below, above = settings.get("below"), settings.get("above")
    if math.isnan(value):
        return f"{metric} is NaN after {step} edits"
    if below is not None and value < below:
        return f"{metric} = {value:.4g} < {below} after {step} edits"
    if above is not None and value > above:
        return f"{metric} = {value:.4g} > {above} after {step} edits"
    return None
