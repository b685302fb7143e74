"""The checkpoint evaluators of a trial: each metric family measured at step 0 and at every checkpoint is one
class here, registered once in ``EVALUATORS``.

A trial (grid/trial.py) evaluates the model at step 0 and at every checkpoint. It picks the edits to score (all of
them at step 0 and at a final "all" checkpoint, else the retention sample of evals/retention.py), then calls every
evaluator whose ``due(step)`` holds, in registration order, on one ``Checkpoint``. An evaluator returns its metrics
(names from evals/metric_names.py) and may log tables through the trial's tracker; the trial adds the cost/*
metrics (each evaluator's seconds go to its ``cost_metric``) and, at the end, draws each evaluator's ``curves``.

Adding a metric family: write one class with ``evaluate(point) -> dict`` (and ``due``/``curves``/``cost_metric``
when the defaults do not fit), a ``build(context)`` that returns it or None when the trial's config does not ask for
it, declare its prefix in evals/metric_names.py, and append ``YourEvaluator.build`` to ``EVALUATORS``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from evals.abilities import TABLE_DIR as ABILITY_TABLES, AbilitiesEvaluator, AbilitySettings
from evals.batching import left_padded
from evals.diagnostics import layer_diagnostics
from evals.judge import judge_prompt_version
from evals.judge_audit import recorded_audit
from evals.metric_names import (ABILITIES_PREFIX, COST_EVAL_SECONDS, COST_PROTOCOL_EVAL_SECONDS, DIAG_PREFIX,
                                EDIT_PREFIX, FAMILIES, GEN_PREFIX, GENERAL_PREFIX, JUDGE_PREFIX, MEMORY_PREFIX,
                                RETENTION_PREFIX, SCR_ADD_SECONDS_PER_EDIT, SCR_MEMORY_SIZE, SCR_PREFIX,
                                memory_served_metric, scr_metric)
from evals.pre_edit import pre_edit_outputs
from evals.records import EditRecord
from evals.retention import RetentionSample, retention_metrics
from evals.teacher_forced import METRIC_ORDER, edit_score, evaluate_records
from grid.assembly import MethodAssembly
from grid.generation_stage import GenerationStage
from grid.scr_stage import ScrStage
from grid.tracking import TrialTracker


def curves_file(prefix: str) -> str:
    """The plot artifact evals/metric_names.py assigns to the family ``prefix``."""
    return next(family.curves for family in FAMILIES if family.prefix == prefix)


@dataclass
class TrialClock:
    """The trial's running totals (restored from a trial checkpoint on resume)."""

    edit_seconds: float = 0.0  # editing only (for SCR: adding facts to its memory)
    scr_add_seconds: float = 0.0
    eval_seconds: float = 0.0  # every evaluation so far, step 0 included
    peak_memory_mb: float = 0.0


@dataclass
class TrialContext:
    """What a trial has built before its first evaluation: everything an evaluator may read."""

    cfg: dict  # the trial's expanded config
    tracker: TrialTracker
    model: torch.nn.Module
    tokenizer: object
    records: list[EditRecord]  # every edit of the trial, in the order they are applied
    model_key: str  # names the unedited weights in every cache key
    cache_dir: Path
    method: MethodAssembly
    live_weights: dict[int, torch.Tensor]  # the MLP output projections the editor writes in place, by layer
    other_weights: dict[str, torch.Tensor]  # the other matrices it writes (by label; usually none)
    scr: ScrStage | None
    clock: TrialClock
    progress: bool

    @property
    def eval_batch(self) -> int:
        return self.cfg["eval"]["batch_size"]


@dataclass
class Checkpoint:
    """One evaluation: after ``step`` edits, of the edits in ``records``."""

    step: int
    records: list[EditRecord]  # the edits scored: step 0 every record of the trial, later the retention sample
    sample: RetentionSample | None  # the sample behind ``records`` (None at step 0)
    # Set by SCR's evaluator: what each evaluation prompt becomes (fact in front, or the bare prompt).
    prompt_builder: Callable[[list[str]], list[str]] | None = None
    record_rows: dict = field(default_factory=dict)  # case_id -> the per-edit row of this evaluation
    record_notes: dict = field(default_factory=dict)  # case_id -> columns other evaluators add to that row


class CheckpointEvaluator:
    """One metric family at step 0 and every checkpoint (see the module docstring)."""

    cost_metric: str | None = COST_EVAL_SECONDS  # where the trial adds this evaluator's seconds (None: not timed)
    curves: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (plot artifact, metric prefixes), drawn at the end

    def due(self, step: int) -> bool:
        return True

    def evaluate(self, point: Checkpoint) -> dict[str, float]:
        raise NotImplementedError


class ScrDecisions(CheckpointEvaluator):
    """scr/*: what SCR decides for every evaluation prompt with the model as it is now (empty memory: the prompt
    itself), which the evaluators after it score; retrieval recall@k, selection rates, added latency."""

    curves = ((curves_file(SCR_PREFIX), (scr_metric("recall_at_k/"), scr_metric("acceptance_rate"),
                                         scr_metric("correct_selection_rate"), scr_metric("locality_rejection_rate"))),)

    def __init__(self, context: TrialContext):
        self.context, self.scr = context, context.scr

    @classmethod
    def build(cls, context: TrialContext) -> ScrDecisions | None:
        return cls(context) if context.scr is not None else None

    def evaluate(self, point: Checkpoint) -> dict[str, float]:
        tracker = self.context.tracker
        metrics = {SCR_MEMORY_SIZE: float(len(self.scr.memory))}
        if point.step == 0:
            return metrics
        decided = self.scr.evaluate(point.records)
        point.prompt_builder = decided.prompt_builder
        metrics.update(decided.metrics)
        metrics.update(self.scr.measure_latency(point.records, self.context.cfg["eval"]["scr_latency_queries"]))
        metrics[SCR_ADD_SECONDS_PER_EDIT] = self.context.clock.scr_add_seconds / point.step
        for decision in decided.rows:
            if decision["category"] == "rewrite":
                point.record_notes.setdefault(decision["case_id"], {}).update(
                    scr_status=decision["status"], scr_chosen_id=decision["chosen_id"])
        tracker.log_table(decided.rows, f"tables/scr_decisions/step_{point.step:06d}.json")
        with tempfile.TemporaryDirectory() as folder:  # the memory as of this checkpoint, reloadable
            tracker.log_artifacts(str(self.scr.save(folder)), "checkpoints/scr_memory")
        return metrics


class TeacherForced(CheckpointEvaluator):
    """edit/*, retention/*, eval/*: teacher-forced efficacy, generalization, specificity (locality, portability)
    of the scored edits; after step 0 stratified estimates with Wilson intervals per age bin (evals/retention.py).
    Step 0 is the unedited model over every record of the trial, shared through the cache (evals/pre_edit.py)."""

    curves = ((curves_file(EDIT_PREFIX), (EDIT_PREFIX,)), (curves_file(RETENTION_PREFIX), (RETENTION_PREFIX,)))

    def __init__(self, context: TrialContext):
        self.context = context
        records = context.records  # (the seconds this takes count in step 0's cost/eval_seconds: grid/trial.py)
        self.pre_edit = pre_edit_outputs(
            context.model, context.tokenizer, records, context.model_key, context.eval_batch, context.cache_dir,
            progress=f"evaluating the unedited model on {len(records)} edits" if context.progress else None)
        context.tracker.set_tags({"editgrid.pre_edit_from_cache": self.pre_edit.from_cache})

    @classmethod
    def build(cls, context: TrialContext) -> TeacherForced:
        return cls(context)

    def evaluate(self, point: Checkpoint) -> dict[str, float]:
        if point.step == 0:  # the unedited model: the same for every trial on this model and data slice
            evaluation = self.pre_edit.evaluation
        else:
            evaluation = evaluate_records(
                self.context.model, self.context.tokenizer, point.records, reference=self.pre_edit.reference,
                batch_size=self.context.eval_batch,
                progress=f"evaluating {len(point.records)} edits" if self.context.progress else None,
                prompt_builder=point.prompt_builder)
        metrics = dict(evaluation.metrics)
        if point.sample is not None:  # stratified estimates with intervals replace the plain means of the sample
            metrics.update(retention_metrics(point.sample, dict(zip(point.sample.indices, evaluation.per_record)),
                                             METRIC_ORDER))
            metrics.update(edit_score(metrics))
        point.record_rows = {row["case_id"]: dict(row) for row in evaluation.per_record}
        return metrics


class WeightDiagnostics(CheckpointEvaluator):
    """diag/*: per edited matrix ‖W‖, relative change, cond(W), σ_max(W−W₀) and the preservation drift D — for the
    editors that write weights."""

    curves = ((curves_file(DIAG_PREFIX), (DIAG_PREFIX,)),)

    def __init__(self, context: TrialContext):
        self.weights = {**context.live_weights, **context.other_weights}
        self.originals = {**context.method.originals, **context.method.other_originals}
        self.moments = context.method.moments

    @classmethod
    def build(cls, context: TrialContext) -> WeightDiagnostics | None:
        return cls(context) if context.live_weights or context.other_weights else None

    def evaluate(self, point: Checkpoint) -> dict[str, float]:
        return layer_diagnostics(self.weights, self.originals, self.moments)


class GenerationJudge(CheckpointEvaluator):
    """judge/*, gen/*, general/*, lm_eval/*: the second protocol (generation + LLM judge, GLUE/MMLU labels,
    fluency, the harness) on the same model and prompts (grid/generation_stage.py)."""

    cost_metric = COST_PROTOCOL_EVAL_SECONDS
    curves = ((curves_file(JUDGE_PREFIX), (JUDGE_PREFIX, GEN_PREFIX, GENERAL_PREFIX)),)

    def __init__(self, context: TrialContext, stage: GenerationStage):
        self.context, self.stage = context, stage
        if stage.judge is not None:
            name = stage.judge.backend.name
            audit = recorded_audit(name)
            context.tracker.set_tags({
                "editgrid.protocol": "teacher_forced+generation_judge",
                "editgrid.judge": name,
                "editgrid.judge_prompt": judge_prompt_version(stage.judge.backend),
                # The judge's agreement with verdicts known by construction (evals/judge_audit.py), as recorded by
                # benchmarks/judge_audit.py for exactly this judge; docs/second_protocol.md has the table.
                "editgrid.judge_audit": (f"kappa {audit['kappa']:.3f}, accuracy {audit['accuracy']:.3f} on "
                                         f"{audit['items']} items ({audit['date']})") if audit else
                                        "not audited: run benchmarks/judge_audit.py --record for this judge",
                "editgrid.generation": json.dumps(stage.settings.describe())})

    @classmethod
    def build(cls, context: TrialContext) -> GenerationJudge | None:
        cfg = context.cfg
        stage = GenerationStage(cfg["eval"], context.model, context.tokenizer, context.records, context.model_key,
                                cfg["model"], cfg["model_args"], context.cache_dir, progress=context.progress)
        return cls(context, stage) if stage.active else None

    def evaluate(self, point: Checkpoint) -> dict[str, float]:
        metrics, tables = self.stage.evaluate(point.step, point.records, point.prompt_builder)
        for artifact, rows in tables.items():
            self.context.tracker.log_table(rows, artifact)
        return metrics


class Abilities(CheckpointEvaluator):
    """abilities/*: ARC, PIQA, HellaSwag, OpenBookQA, LAMBADA, WikiText-2 by likelihood (evals/abilities.py), at
    ``eval.abilities.steps``; step 0 from the shared cache. It times itself (cost/abilities_eval_seconds)."""

    cost_metric = None
    curves = ((curves_file(ABILITIES_PREFIX), (ABILITIES_PREFIX,)),)

    def __init__(self, context: TrialContext, evaluator: AbilitiesEvaluator):
        self.context, self.evaluator = context, evaluator

    @classmethod
    def build(cls, context: TrialContext) -> Abilities | None:
        section = context.cfg["eval"].get("abilities") or {}
        if not section.get("enabled"):
            return None
        settings = AbilitySettings.from_config(section, context.eval_batch)
        return cls(context, AbilitiesEvaluator(settings, context.model, context.tokenizer, context.model_key,
                                               context.cache_dir, progress=context.progress))

    def due(self, step: int) -> bool:
        return self.evaluator.due(step)

    def evaluate(self, point: Checkpoint) -> dict[str, float]:
        ability = self.evaluator.evaluate(point.step)
        self.context.tracker.log_table(ability.rows, f"{ABILITY_TABLES}/step_{point.step:06d}.json")
        if point.step == 0:
            self.context.tracker.set_tags({"editgrid.abilities_from_cache": ability.from_cache})
        return ability.metrics


class RestraintMetrics(CheckpointEvaluator):
    """<restraint>/*: what the restraint (PRUNE) did to the singular values at its latest application."""

    cost_metric = None

    def __init__(self, restraint):
        self.restraint = restraint

    @classmethod
    def build(cls, context: TrialContext) -> RestraintMetrics | None:
        return cls(context.method.restraint) if context.method.restraint is not None else None

    def due(self, step: int) -> bool:
        return step > 0

    def evaluate(self, point: Checkpoint) -> dict[str, float]:
        return self.restraint.metrics()


class MemoryLookups(CheckpointEvaluator):
    """memory/served_share/<category>: which prompts of the scored edits a memory editor (GRACE's codebook, WISE's
    side memories) serves instead of the layer — rewrite prompts and paraphrases should be served (efficacy,
    generalization), neighbourhood prompts should not (specificity). One extra forward per prompt, after step 0."""

    curves = ((curves_file(MEMORY_PREFIX), (MEMORY_PREFIX,)),)

    def __init__(self, context: TrialContext):
        self.context, self.editor = context, context.method.editor

    @classmethod
    def build(cls, context: TrialContext) -> MemoryLookups | None:
        return cls(context) if hasattr(context.method.editor, "served_rows") else None

    def due(self, step: int) -> bool:
        return step > 0  # an empty memory serves nothing

    def evaluate(self, point: Checkpoint) -> dict[str, float]:
        categories = {"rewrite": [r.prompt for r in point.records],
                      "paraphrase": [p for r in point.records for p in r.paraphrase_prompts],
                      "neighborhood": [case.prompt for r in point.records for case in r.neighborhood]}
        tokenizer, batch = self.context.tokenizer, self.context.eval_batch
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out; any id works
        metrics = {}
        for category, prompts in categories.items():
            if not prompts:
                continue
            served = 0
            for start in range(0, len(prompts), batch):
                ids = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch]]
                input_ids, attention_mask = left_padded(ids, pad_id)
                served += int(self.editor.served_rows(input_ids, attention_mask).sum())
            metrics[memory_served_metric(category)] = served / len(prompts)
        return metrics


# In evaluation order: SCR first, since what it decides is the prompt the others score.
EVALUATORS: tuple[Callable[[TrialContext], CheckpointEvaluator | None], ...] = (
    ScrDecisions.build, TeacherForced.build, WeightDiagnostics.build, MemoryLookups.build, GenerationJudge.build,
    Abilities.build, RestraintMetrics.build)


def build_evaluators(context: TrialContext) -> list[CheckpointEvaluator]:
    """The registered evaluators this trial's config asks for."""
    return [evaluator for build in EVALUATORS if (evaluator := build(context)) is not None]
