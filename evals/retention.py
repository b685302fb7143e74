"""Retention checkpoints that stay cheap: a fixed, seeded, age-stratified sample of the edits applied so far.

Scoring all N edits at every checkpoint costs O(N²) over a trial. Instead, at a checkpoint after N edits:

* the edits 0..N−1 are cut into ``strata`` equal age bins (``age_1`` = the oldest edits … ``age_<strata>`` = the
  newest), and from each bin the same number of edits is scored, ⌈sample_size / strata⌉ (all of them when the bin
  is smaller). Which edits: those with the lowest *priority*, a random permutation of all edit indices drawn once
  per trial from ``seed`` — so consecutive checkpoints keep scoring mostly the same edits, and a rerun scores the
  same ones;
* the newest batch (the edits applied last) is scored whole (up to ⌈sample_size / strata⌉ of it, chosen the same
  way), so that edit-time success shows beside the forgetting of the oldest bins;
* with N ≤ sample_size every edit is scored, and the final checkpoint scores every edit unless configured not to.

Estimates. Each bin is a stratum of (almost) equal size with equal allocation, so the overall rate is the mean of
the bin means weighted by bin size (the plain mean when all edits are scored); the newest batch is reported on its
own and not counted twice. Each rate comes with its sample size n and a 95 % Wilson score interval,

    (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n),   z = 1.96,

treating each scored edit as one trial (exact for per-edit 0/1 outcomes such as CounterFact efficacy; for a
per-edit mean over several prompts — paraphrases, neighbours — it is the interval of that mean's success share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evals.metric_names import retention_metric

WILSON_Z = 1.959963984540054  # the 97.5 % normal quantile: a two-sided 95 % interval

NEWEST_BATCH = "newest_batch"
# Companions of a rate ``<name>`` in the metrics (grid/tracking.py draws them as a band around it).
CI_LOW_SUFFIX, CI_HIGH_SUFFIX, SAMPLE_SIZE_SUFFIX = "_ci95_low", "_ci95_high", "_n"


def wilson_interval(rate: float, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval of a success share ``rate`` observed over ``n`` trials (n = 0: the whole [0, 1])."""
    if n <= 0:
        return 0.0, 1.0
    rate = min(max(rate, 0.0), 1.0)
    z2 = z * z
    centre = rate + z2 / (2 * n)
    spread = z * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n)), min(1.0, (centre + spread) / (1 + z2 / n))


def age_stratum(index: int, strata: int) -> str:
    """Name of the ``index``-th age bin (0 = oldest), as the metrics name it."""
    return f"age_{index + 1}_of_{strata}"


@dataclass(frozen=True)
class RetentionSample:
    """Which edit indices a checkpoint scores: per age bin, and the newest batch."""

    edits_so_far: int
    bins: tuple[tuple[int, int], ...]  # [start, end) of each age bin, oldest first
    by_bin: tuple[tuple[int, ...], ...]  # scored indices of each bin
    newest: tuple[int, ...]  # scored indices of the newest batch
    complete: bool  # every edit so far is scored

    @property
    def indices(self) -> list[int]:
        """Every index to score, ascending, each once."""
        return sorted(set(i for chosen in self.by_bin for i in chosen) | set(self.newest))


class RetentionPlan:
    """Draws the priorities once per trial (``total_edits`` = edits the trial will apply) and samples checkpoints."""

    def __init__(self, total_edits: int, sample_size: int, strata: int = 4, seed: int = 0):
        if total_edits < 0 or sample_size < 1 or strata < 1:
            raise ValueError(f"RetentionPlan needs total_edits >= 0, sample_size >= 1 and strata >= 1, got "
                             f"{total_edits}, {sample_size}, {strata}")
        self.sample_size = sample_size
        self.strata = strata
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(max(total_edits, 1), generator=generator)
        self._priority = torch.empty_like(order)
        self._priority[order] = torch.arange(order.numel())

    def _lowest_priority(self, start: int, end: int, count: int) -> tuple[int, ...]:
        if end - start <= count:
            return tuple(range(start, end))
        chosen = torch.topk(self._priority[start:end], count, largest=False).indices + start
        return tuple(sorted(int(i) for i in chosen))

    def sample(self, edits_so_far: int, newest_start: int, score_all: bool = False) -> RetentionSample:
        """The edits to score after ``edits_so_far`` edits, the last batch having started at ``newest_start``."""
        if not 0 <= newest_start <= edits_so_far <= self._priority.numel():
            raise ValueError(f"cannot sample {edits_so_far} edits (newest batch from {newest_start}) of a trial "
                             f"planned for {self._priority.numel()}")
        strata = min(self.strata, max(edits_so_far, 1))
        bounds = [round(k * edits_so_far / strata) for k in range(strata + 1)]
        bins = tuple((bounds[k], bounds[k + 1]) for k in range(strata))
        complete = score_all or edits_so_far <= self.sample_size
        per_bin = edits_so_far if complete else math.ceil(self.sample_size / strata)
        by_bin = tuple(self._lowest_priority(start, end, per_bin) for start, end in bins)
        newest = self._lowest_priority(newest_start, edits_so_far, per_bin)
        return RetentionSample(edits_so_far, bins, by_bin, newest, complete)


def retention_metrics(sample: RetentionSample, rows: dict[int, dict], names: tuple[str, ...],
                      prefix: str = "edit") -> dict[str, float]:
    """Rates of the per-edit ``rows`` (edit index → row with a value in [0, 1] for each of ``names``):

    ``<prefix>/<name>`` the overall estimate, ``<prefix>/<name>_ci95_low|high`` its Wilson interval,
    ``<prefix>/<name>_n`` its sample size; ``retention/<stratum>/<name>`` (+ ``_ci95_low|high``, ``_n``) per age bin
    and for the newest batch; ``retention/edits_scored`` and ``retention/complete``.
    """
    metrics: dict[str, float] = {retention_metric("", "edits_scored"): float(len(sample.indices)),
                                 retention_metric("", "complete"): float(sample.complete)}

    def put(key: str, values: list[float], estimate: float | None = None) -> None:
        if not values:
            return
        rate = sum(values) / len(values) if estimate is None else estimate
        low, high = wilson_interval(rate, len(values))
        metrics.update({key: rate, key + CI_LOW_SUFFIX: low, key + CI_HIGH_SUFFIX: high,
                        key + SAMPLE_SIZE_SUFFIX: float(len(values))})

    strata = len(sample.bins)
    for name in names:
        weighted, weight, scored = 0.0, 0, []
        for k, ((start, end), chosen) in enumerate(zip(sample.bins, sample.by_bin)):
            values = [rows[i][name] for i in chosen if name in rows.get(i, {})]
            put(retention_metric(age_stratum(k, strata), name), values)
            if values:
                weighted += (end - start) * sum(values) / len(values)
                weight += end - start
                scored += values
        put(f"{prefix}/{name}", scored, weighted / weight if weight else None)
        put(retention_metric(NEWEST_BATCH, name), [rows[i][name] for i in sample.newest if name in rows.get(i, {})])
    return metrics
