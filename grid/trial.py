"""One trial: model × data slice × method (+ hyper-parameters) × batch size × checkpoints, end to end.

Edits are applied in data order, ``edits.batch_size`` requests per step. At step 0 (before any edit) and at every
checkpoint n the model is evaluated on the edits applied so far (retention, not edit-time success): every one of
them when n <= eval.retention.sample_size and at the last checkpoint, otherwise a fixed seeded sample stratified by
age (evals/retention.py). Every number goes to the trial's MLflow run with ``step = edits applied``:

  edit/*        teacher-forced metrics (evals/teacher_forced.py); step 0 covers all records of the trial; each rate
                with ``_ci95_low``/``_ci95_high`` (Wilson) and ``_n`` (edits scored)
  retention/*   the same rates per age bin (``age_1_of_4`` = the oldest quarter …) and for the newest batch
  diag/L<i>/*   per edited matrix: ‖W‖, ‖W−W₀‖/‖W₀‖, cond(W), σ_max(W−W₀)            (evals/diagnostics.py)
  diag/L<i>/drift  D(W) = tr((W−W₀)C(W−W₀)ᵀ), the preservation drift, for every method    (methods/drift.py)
  vstar/*       how well v* reached its target (mean target probability of the batch's rewriting prompts)
  editing/L<i>/{update_norm,residual_norm}  ‖Δ‖_F written and mean ‖R‖ of the batch, after every batch
  <stage>/*     stage diagnostics, logged after every batch: memit/lambda, alphaedit/L<i>/null_dims,
                lyaplock/L<i>/{drift,drift_mean,threshold,queue}, rect|srfusion/L<i>/energy_kept
                (methods/solvers, methods/transforms); prune/L<i>/* at every restraint (methods/restraints)
  scr/*         the SCR fact memory, retrieval recall@k, selection rates, added latency (grid/scr_stage.py);
                with SCR the edit/* metrics are scored on the prompt SCR builds (fact in front, or the bare prompt)
  abilities/<task>/*  likelihood-scored general abilities (ARC, PIQA, HellaSwag, ..., LAMBADA, WikiText-2
                perplexity; evals/abilities.py) at ``eval.abilities.steps``; step 0 from the shared cache
  cost/*        seconds per edit (editing only — for SCR adding the facts to the memory; statistics and
                evaluation excluded), statistics seconds, evaluation seconds, peak memory, and eval_share: the
                evaluation's share of the trial's editing + evaluation time so far

The trial is a ``TrialRun``: it loads the model, assembles the method (grid/assembly.py, shared with
benchmarks/bench_editing.py), builds the checkpoint evaluators the config asks for (grid/evaluators.py: one class
per metric family, registered once) and then alternates editing batches and evaluations. Metric names and where
each family is computed: evals/metric_names.py (``python -m evals.metric_names <name>``).

Inside a grid (a parent run) every evaluation checkpoint also writes a trial checkpoint (grid/trial_checkpoint.py);
an attempt that finds one — a Ray retry, or the grid submitted again after its driver died — copies the history the
interrupted attempt logged up to it into its own run, deletes that run, restores the edited weights, the editor's
state and the SCR memory, and continues with the next batch. ``stop_on_collapse`` (grid/collapse.py) can end a
trial at a checkpoint where it has collapsed; the run is then tagged ``editgrid.stopped_early`` with the reason.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evals.datasets import load_records
from evals.metric_names import (COST_EVAL_SECONDS, COST_EVAL_SECONDS_TOTAL, COST_EVAL_SHARE,
                                COST_INTERVAL_PEAK_MEMORY_MB, COST_PEAK_MEMORY_MB, COST_SECONDS_PER_EDIT,
                                COST_STATS_SECONDS, HEADLINE_PREFIXES, VSTAR_TARGET_PROB, VSTAR_TARGET_PROB_MIN,
                                editing_metric)
from evals.records import EditRecord
from evals.retention import RetentionPlan
from grid.assembly import AssemblyError, MethodAssembly, assemble_method, resolve_layers as _resolve_layers
from grid.collapse import collapse_reason
from grid.config import Trial, method_settings
from grid.evaluators import Checkpoint, TrialClock, TrialContext, build_evaluators
from grid.gridrun import delete_runs, unfinished_trial_runs
from grid.memory_plan import plan_trial_memory
from grid.scr_stage import ScrStage
from grid.tracking import TrialTracker
from grid.trial_checkpoint import TrialCheckpoints, TrialState
from methods.infra.arch import EditableModel
from methods.infra.cache import default_cache_dir
from methods.context import generate_context_templates
from methods.corpus import parse_corpus
from methods.infra.memory import peak_memory_mb, reset_peak_memory
from methods.infra.models import load_model
from methods.requests import EditRequest
from methods.stages import MethodSpec
from methods.stats import FORWARD_DTYPE_BY_NAME, second_moments

logger = logging.getLogger(__name__)


class TrialError(RuntimeError):
    """A trial that cannot run as configured (reported with the trial's name)."""


@dataclass
class TrialResult:
    trial: Trial
    run_id: str
    checkpoints: list[dict] = field(default_factory=list)  # one row per evaluation: step + headline metrics


def to_request(record: EditRecord) -> EditRequest:
    return EditRequest(prompt=record.prompt_template(), subject=record.subject, target=record.target_new)


def batches(num_edits: int, batch_size: int):
    for start in range(0, num_edits, batch_size):
        yield start, min(start + batch_size, num_edits)


def resolve_layers(editable: EditableModel, spec: MethodSpec, trial_name: str) -> list[int]:
    """grid/assembly.py's ``resolve_layers``, reported as a TrialError."""
    try:
        return _resolve_layers(editable, spec, f"trial {trial_name}")
    except AssemblyError as err:
        raise TrialError(str(err)) from err


def cache_root(cfg: dict) -> Path:
    """The cache shared by trials: ``cache_dir``, else ``$EDITGRID_CACHE`` or ``~/.cache/editgrid``."""
    return Path(cfg["cache_dir"]) if cfg.get("cache_dir") else default_cache_dir()


def checkpoint_store(cfg: dict, trial_id: str) -> TrialCheckpoints | None:
    """Where this trial's checkpoints go (``checkpoints.dir``, else ``<cache dir>/trial_checkpoints``), or None when
    checkpoints are off."""
    settings = cfg.get("checkpoints") or {}
    if not settings.get("enabled", True):
        return None
    return TrialCheckpoints(settings.get("dir") or cache_root(cfg) / "trial_checkpoints", trial_id)


def _resume_point(store: TrialCheckpoints | None, unfinished: list[str], trial_name: str) -> TrialState | None:
    """The checkpoint to continue from: the latest one, if the run holding its history is an unfinished attempt
    of this trial in this grid (otherwise its metrics before the cursor could not be carried over: start again)."""
    state = store.latest() if store is not None else None
    if state is None:
        return None
    if store.run_id() not in unfinished:
        logger.warning("trial %s: checkpoint at %d edits belongs to run %s, which is not an unfinished run of this "
                       "trial in this grid; starting again from edit 0", trial_name, state.cursor, store.run_id())
        store.remove()
        return None
    return state


def run_trial(trial: Trial, tracking_uri: str, parent_run_id: str | None = None, progress: bool = True,
              on_checkpoint=None) -> TrialResult:
    """Run ``trial`` into its own MLflow run (a child of ``parent_run_id`` inside a grid). ``on_checkpoint(row)`` is
    called after each evaluation checkpoint with its headline row (step, edit/*, cost/*, vstar/*), e.g. to report
    progress to Ray Tune."""
    cfg = trial.config
    spec = method_settings(cfg["method"], cfg.get("hparams") or {})
    torch.manual_seed(cfg["seed"])
    tags = {"editgrid.role": "trial", "editgrid.trial_index": trial.index,
            "editgrid.axes": json.dumps(trial.axes, sort_keys=True, default=str),
            "editgrid.trial_id": trial.trial_id, "editgrid.method": cfg["method"], "editgrid.editor": spec.editor,
            "editgrid.solver": spec.solver, "editgrid.target_scaling": spec.target_scaling or "none",
            "editgrid.transforms": ",".join(spec.transforms) or "none", "editgrid.restraint": spec.restraint or "none",
            "editgrid.retrieval": spec.retrieval or "none",
            "editgrid.model": str(cfg["model"]), "editgrid.data": str(cfg["data"]["path"]),
            "editgrid.protocol": "teacher_forced", **spec.tags}
    params = {**cfg, "method_hparams": spec.hparams, "editor": spec.editor, "solver": spec.solver,
              "target_scaling": spec.target_scaling, "transforms": list(spec.transforms), "restraint": spec.restraint,
              "retrieval": spec.retrieval}
    # Only trials of a grid checkpoint: resuming needs the parent run to find the interrupted attempt.
    store = checkpoint_store(cfg, trial.trial_id) if parent_run_id else None
    with TrialTracker(tracking_uri, cfg["experiment"], trial.name, params=params, tags=tags,
                      parent_run_id=parent_run_id) as tracker:
        resume = None
        if parent_run_id:
            unfinished = [run_id for run_id in unfinished_trial_runs(tracker.tracking_uri, tracker.experiment_id,
                                                                     parent_run_id, trial.trial_id)
                          if run_id != tracker.run_id]
            resume = _resume_point(store, unfinished, trial.name)
            if resume is not None:
                source = store.run_id()
                copied = tracker.carry_over(source, resume.cursor)
                store.set_run_id(tracker.run_id)
                tracker.set_tags({"editgrid.resumed_from_step": resume.cursor, "editgrid.resumed_from_run": source})
                logger.info("trial %s: resuming after %d edits (%d metric points carried over from run %s)",
                            trial.name, resume.cursor, copied, source)
            delete_runs(tracker.tracking_uri, unfinished)
        result = TrialResult(trial=trial, run_id=tracker.run_id)
        TrialRun(trial, spec, tracker, result, progress, store, on_checkpoint).run(resume)
    if store is not None and not (cfg.get("checkpoints") or {}).get("keep_final"):
        store.remove()
    return result


class TrialRun:
    """One trial inside its MLflow run: set up (model, records, method, evaluators), then edit batch by batch and
    evaluate at step 0 and every checkpoint."""

    def __init__(self, trial: Trial, spec: MethodSpec, tracker: TrialTracker, result: TrialResult, progress: bool,
                 store: TrialCheckpoints | None = None, on_checkpoint=None):
        self.trial, self.cfg, self.spec = trial, trial.config, spec
        self.tracker, self.result, self.progress = tracker, result, progress
        self.store, self.on_checkpoint = store, on_checkpoint
        self.clock = TrialClock()
        self.vstar_probs: list[float] = []
        self.pre_rows: dict = {}
        self.post_rows: dict = {}
        self._setup()

    # -- set-up -------------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg, spec, tracker = self.cfg, self.spec, self.tracker
        self.cache_dir = cache_root(cfg)
        margs = cfg["model_args"]
        plan_trial_memory(cfg, spec, tracker, self.trial.name, self.cache_dir)  # refuses what cannot fit, unloaded
        loaded = load_model(cfg["model"], dtype=margs["dtype"], device=margs["device"], cache_dir=self.cache_dir,
                            linear_backend=margs["linear_backend"])
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.editable = EditableModel.wrap(loaded.model, blocks=margs.get("blocks"), mlp=margs.get("mlp"),
                                           mlp_out=margs.get("mlp_out"))
        self.model_key = f"{loaded.model_id}@{loaded.fingerprint}"  # names the unedited weights in every cache key
        self.device = self.editable.parameter_device()
        layers = resolve_layers(self.editable, spec, self.trial.name) if spec.edits_model else []
        tracker.set_tags({"editgrid.layers": ",".join(map(str, layers)),
                          "editgrid.model_fingerprint": loaded.fingerprint,
                          "editgrid.linear_backend": loaded.linear_backend, "editgrid.linear_plan": loaded.linear_plan})
        self.records = self._load_records()
        self.requests = [to_request(r) for r in self.records]
        if spec.kind is None:  # the closed-form solvers read C when they are built
            self.stats = self._second_moments(layers)
            self.method = self._assemble(layers, self.stats.moments if self.stats is not None else {})
        else:
            # An editor kind needs no C to be built; C serves only the drift D of the output projections it writes,
            # which may be none of its layers (UltraEdit on gate/up): compute C for those only.
            self.method = self._assemble(layers, {})
            self.stats = self._second_moments(self.method.weight_layers) if self.method.weight_layers else None
            if self.stats is not None:
                self.method.moments = {layer: c.to(self.device) for layer, c in self.stats.moments.items()}
        self.live_weights = self.method.live_weights(self.editable)
        self.other_weights = self.method.other_live_weights()
        self.scr = (ScrStage(spec, self.model, self.tokenizer, cfg["eval"]["batch_size"],
                             embedder_device=self.device.type, progress=self.progress)
                    if spec.retrieval else None)
        retention = cfg["eval"]["retention"]
        self.retention = RetentionPlan(len(self.requests), retention["sample_size"], retention["strata"],
                                       seed=cfg["seed"] if retention["seed"] is None else retention["seed"])
        started = time.perf_counter()
        self.context = TrialContext(cfg=cfg, tracker=tracker, model=self.model, tokenizer=self.tokenizer,
                                    records=self.records, model_key=self.model_key, cache_dir=self.cache_dir,
                                    method=self.method, live_weights=self.live_weights,
                                    other_weights=self.other_weights, scr=self.scr,
                                    clock=self.clock, progress=self.progress)
        self.evaluators = build_evaluators(self.context)
        # Building the evaluators computes the unedited model's outputs (or reads them from the cache): step 0's cost.
        self.evaluators_setup_seconds = time.perf_counter() - started

    def _load_records(self) -> list[EditRecord]:
        data, checkpoints = self.cfg["data"], self.cfg["edits"]["checkpoints"]
        records = load_records(data["path"], format=data["format"], limit=data["limit"] or checkpoints[-1],
                               offset=data["offset"])
        if len(records) < checkpoints[-1]:
            raise TrialError(f"trial {self.trial.name}: {data['path']} has {len(records)} usable records after offset "
                             f"{data['offset']}, fewer than the last checkpoint {checkpoints[-1]}")
        return records[:checkpoints[-1]]

    def _second_moments(self, layers: list[int]):
        """C for the solvers and for the drift diagnostic D of every weight-writing editor (None otherwise)."""
        if not self.spec.edits_weights:
            return None
        stats_cfg = self.cfg["stats"]
        # Trials on Ray run without progress bars: a line per phase says what the minutes before the first report go to.
        logger.info("trial %s: second-moment statistics of layers %s from %s tokens of %s (computed once, then cached)",
                    self.trial.name, layers, f"{stats_cfg['num_tokens']:,}", stats_cfg["corpus"])
        stats = second_moments(self.editable, self.tokenizer, layers, parse_corpus(stats_cfg["corpus"]),
                               stats_cfg["num_tokens"], model_key=self.model_key, cache_dir=self.cache_dir,
                               max_length=stats_cfg["max_length"], progress=self.progress,
                               corpus_seed=stats_cfg["seed"],
                               forward_dtype=FORWARD_DTYPE_BY_NAME.get(stats_cfg["forward_dtype"]))
        self.tracker.log_dict({"corpus": stats.corpus, "tokens": stats.tokens, "from_cache": stats.from_cache},
                              "stats/second_moments.json")
        return stats

    def _assemble(self, layers: list[int], moments: dict) -> MethodAssembly:
        groups = None
        if self.spec.edits_model and self.spec.kind is None:  # v*'s context templates (locate-then-edit only)
            groups = generate_context_templates(self.model, self.tokenizer, seed=self.cfg["seed"])
            self.tracker.log_dict({"context_templates": groups}, "editing/context_templates.json")
        reference = self._reference_requests() if self.spec.target_scaling else None
        try:
            method = assemble_method(self.spec, self.editable, self.tokenizer, layers, moments, seed=self.cfg["seed"],
                                     cache_dir=self.cache_dir, context_groups=groups, reference_requests=reference,
                                     model_key=self.model_key)
        except AssemblyError as err:
            raise TrialError(f"trial {self.trial.name}: {err}") from err
        if reference:
            scaling = method.editor.target_scaling
            self.tracker.log_dict({"reference_norm": scaling.reference_norm, "reference_requests": len(reference),
                                   "trim": scaling.trim, "skip_factor": scaling.skip_factor},
                                  f"editing/{scaling.name}_reference.json")
        return method

    def _reference_requests(self) -> list[EditRequest]:
        """NAS's reference requests: a seeded sample of ``nas_samples`` records of the whole data file (edited ones
        included, as in the reference code, which samples CounterFact), or all of them when it holds fewer."""
        data = self.cfg["data"]
        pool = load_records(data["path"], format=data["format"])
        wanted = self.spec.hparam("nas_samples")
        if len(pool) < wanted:
            logger.warning("trial %s: %s has %d records, fewer than nas_samples=%d: NAS's anchor norm uses all of "
                           "them", self.trial.name, data["path"], len(pool), wanted)
        chosen = sorted(random.Random(self.cfg["seed"]).sample(range(len(pool)), min(wanted, len(pool))))
        return [to_request(pool[i]) for i in chosen]

    # -- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self, step: int, newest_start: int = 0) -> dict[str, float]:
        """Every due evaluator after ``step`` edits (0 = before editing, over every record of the trial; later,
        over the retention sample of the edits so far), then the cost/* and vstar/* metrics; logged at ``step``."""
        started = time.perf_counter()
        checkpoints = self.cfg["edits"]["checkpoints"]
        if step == 0:
            point = Checkpoint(step, self.records, None)
            logger.info("trial %s: evaluating the unedited model on the trial's %d records", self.trial.name,
                        len(self.records))
        else:
            final_all = step == checkpoints[-1] and self.cfg["eval"]["retention"]["final"] == "all"
            sample = self.retention.sample(step, newest_start, score_all=final_all)
            point = Checkpoint(step, [self.records[i] for i in sample.indices], sample)
        seconds: dict[str, float] = {}
        if step == 0:
            seconds[COST_EVAL_SECONDS] = self.evaluators_setup_seconds
        metrics: dict[str, float] = {}
        # PRUNE's official protocol: the restrained weights are the ones evaluated (and described by diag/*); the
        # unrestrained ones are restored afterwards and editing continues from them.
        restraint = self.method.restraint
        once = step and restraint is not None and not restraint.every_step
        with restraint.swapped_in(self.live_weights) if once else nullcontext():
            for evaluator in self.evaluators:
                if not evaluator.due(step):
                    continue
                evaluator_started = time.perf_counter()
                metrics.update(evaluator.evaluate(point))
                if evaluator.cost_metric is not None:
                    seconds[evaluator.cost_metric] = (seconds.get(evaluator.cost_metric, 0.0)
                                                      + time.perf_counter() - evaluator_started)
        metrics.update(seconds)
        metrics.update(self._cost_metrics(step, time.perf_counter() - started
                                          + (self.evaluators_setup_seconds if step == 0 else 0.0)))
        if self.vstar_probs:
            metrics[VSTAR_TARGET_PROB] = sum(self.vstar_probs) / len(self.vstar_probs)
            metrics[VSTAR_TARGET_PROB_MIN] = min(self.vstar_probs)
        self.tracker.log_metrics(metrics, step=step)
        self.result.checkpoints.append({"step": step, **{k: v for k, v in metrics.items()
                                                          if k.startswith(HEADLINE_PREFIXES)}})
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.result.checkpoints[-1])
        reset_peak_memory(self.device)
        rows = point.record_rows
        for case_id, notes in point.record_notes.items():
            rows.setdefault(case_id, {}).update(notes)
        if step == 0:
            self.pre_rows = rows
        else:
            self.post_rows = rows
        return metrics

    def _cost_metrics(self, step: int, evaluation_seconds: float) -> dict[str, float]:
        clock = self.clock
        clock.eval_seconds += evaluation_seconds
        # Peak since the previous checkpoint (editing + this evaluation): flat in N when nothing grows with it.
        interval_peak = peak_memory_mb(self.device)
        clock.peak_memory_mb = max(clock.peak_memory_mb, interval_peak)
        metrics = {COST_STATS_SECONDS: self.stats.seconds if self.stats is not None else 0.0,
                   # everything this checkpoint evaluated (every family), against editing so far
                   COST_EVAL_SECONDS_TOTAL: clock.eval_seconds,
                   COST_INTERVAL_PEAK_MEMORY_MB: interval_peak, COST_PEAK_MEMORY_MB: clock.peak_memory_mb}
        if step:
            metrics[COST_EVAL_SHARE] = clock.eval_seconds / (clock.eval_seconds + clock.edit_seconds)
            metrics[COST_SECONDS_PER_EDIT] = clock.edit_seconds / step
        return metrics

    # -- editing ------------------------------------------------------------------------------------------------

    def edit(self, start: int, end: int) -> dict:
        """Apply requests [start, end) (and add them to SCR's memory); log the editor's per-batch metrics.
        Returns the progress bar's postfix."""
        postfix, editor, restraint = {}, self.method.editor, self.method.restraint
        if editor is not None:
            report = editor.apply(self.requests[start:end])
            self.clock.edit_seconds += report.seconds
            if restraint is not None and restraint.every_step:
                restrain_start = time.perf_counter()
                restraint.apply_in_place(self.live_weights)  # PRUNE appendix C.6: the next batch edits restrained W
                self.clock.edit_seconds += time.perf_counter() - restrain_start
            batch_metrics = editor.metrics()
            for name, values in (("update_norm", report.update_norm), ("residual_norm", report.residual_norm)):
                batch_metrics.update({editing_metric(layer, name): value for layer, value in values.items()})
            self.tracker.log_metrics(batch_metrics, step=end)
            self.vstar_probs.extend(report.target_prob)
            if report.target_prob:
                postfix["vstar_p"] = f"{min(report.target_prob):.2f}"
        if self.scr is not None:
            added = self.scr.add(self.records[start:end])
            self.clock.scr_add_seconds += added
            self.clock.edit_seconds += added
        if any(not math.isfinite(float(weight.abs().max()))
               for weight in (*self.live_weights.values(), *self.other_weights.values())):
            raise TrialError(f"trial {self.trial.name}: edited weights became NaN/Inf after {end} edits")
        return postfix

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        editor = self.method.editor
        state = TrialState(trial_id=self.trial.trial_id, cursor=step,
                           weights={layer: self.editable.weight(layer) for layer in self.method.weight_layers},
                           other_weights=dict(self.other_weights),
                           editor_state=editor.state_dict() if editor is not None else {},
                           edit_seconds=self.clock.edit_seconds, scr_add_seconds=self.clock.scr_add_seconds,
                           vstar_probs=self.vstar_probs, eval_seconds=self.clock.eval_seconds,
                           pre_rows=self.pre_rows, post_rows=self.post_rows, result_rows=self.result.checkpoints,
                           rng_state=torch.get_rng_state())
        self.store.save(state, self.tracker.run_id, scr_saver=self.scr.save if self.scr is not None else None)

    def restore(self, state: TrialState) -> None:
        """Put the model, the editor, the SCR memory and the running totals back as they were at ``state.cursor``
        edits."""
        layers = self.method.weight_layers
        if sorted(state.weights) != sorted(layers):
            raise TrialError(f"checkpoint after {state.cursor} edits holds layers {sorted(state.weights)}, the trial "
                             f"edits {layers}")
        if sorted(state.other_weights) != sorted(self.other_weights):
            raise TrialError(f"checkpoint after {state.cursor} edits holds matrices {sorted(state.other_weights)}, "
                             f"the trial edits {sorted(self.other_weights)}")
        with torch.no_grad():
            for layer in layers:
                self.editable.weight(layer).copy_(state.weights[layer])
            for label, weight in self.other_weights.items():
                weight.copy_(state.other_weights[label])
        if self.method.editor is not None:
            self.method.editor.load_state_dict(state.editor_state)
        if self.scr is not None:
            if state.scr_memory is None:
                raise TrialError(f"checkpoint after {state.cursor} edits has no SCR memory")
            self.scr.restore(state.scr_memory)
        torch.set_rng_state(state.rng_state)
        self.pre_rows, self.post_rows = state.pre_rows, state.post_rows
        self.clock.edit_seconds, self.clock.scr_add_seconds = state.edit_seconds, state.scr_add_seconds
        self.clock.eval_seconds = state.eval_seconds
        self.vstar_probs = list(state.vstar_probs)
        self.result.checkpoints.extend(state.result_rows)

    # -- the loop -----------------------------------------------------------------------------------------------

    def run(self, resume: TrialState | None = None) -> None:
        cfg, checkpoints = self.cfg, self.cfg["edits"]["checkpoints"]
        if resume is None:
            self.evaluate(0)
            cursor = 0
        else:
            self.restore(resume)
            cursor = resume.cursor
        bar = tqdm(total=len(self.requests), initial=cursor, desc=f"editing ({self.trial.name})", unit="edit",
                   disable=not self.progress)
        # Between evaluation checkpoints that lie hours apart, the state is also saved every ``every_minutes``
        # (without evaluating), so a stopped trial loses at most that much editing.
        every_minutes = (cfg.get("checkpoints") or {}).get("every_minutes")
        last_saved = time.monotonic()
        for start, end in batches(len(self.requests), cfg["edits"]["batch_size"]):
            if end <= cursor:  # applied before the checkpoint this attempt resumed from
                continue
            postfix = self.edit(start, end)
            bar.set_postfix(s_per_edit=f"{self.clock.edit_seconds / end:.2f}", **postfix, refresh=False)
            bar.update(end - start)
            if (end not in checkpoints and self.store is not None and every_minutes is not None
                    and time.monotonic() - last_saved >= 60 * every_minutes):
                self.save_checkpoint(end)
                logger.info("trial %s: state saved after %d edits (between evaluations, every %s min)",
                            self.trial.name, end, every_minutes)
                last_saved = time.monotonic()
            if end in checkpoints:
                bar.clear()
                metrics = self.evaluate(end, newest_start=start)
                stopped = collapse_reason(cfg.get("stop_on_collapse") or {}, metrics, end, self.trial.name)
                if stopped:
                    logger.warning("trial %s: %s; stopping early", self.trial.name, stopped)
                    self.tracker.set_tags({"editgrid.stopped_early": stopped})
                    break
                if self.store is not None and (end < checkpoints[-1]
                                               or (cfg.get("checkpoints") or {}).get("keep_final")):
                    self.save_checkpoint(end)
                    last_saved = time.monotonic()
                bar.refresh()
        bar.close()
        self.finish()

    def finish(self) -> None:
        """The per-edit table (before and after) and every evaluator's curves."""
        table = []
        for record in self.records:
            pre, post = self.pre_rows.get(record.case_id, {}), self.post_rows.get(record.case_id, {})
            row = {"case_id": record.case_id, "subject": record.subject, "prompt": record.prompt,
                   "target_true": record.target_true, "target_new": record.target_new}
            row.update({f"pre_{k}": v for k, v in pre.items() if k not in ("case_id", "source", "protocol")})
            row.update({f"post_{k}": v for k, v in post.items() if k not in ("case_id", "source", "protocol")})
            table.append(row)
        self.tracker.log_table(table, "tables/per_edit_results.json")
        for evaluator in self.evaluators:
            for artifact, prefixes in evaluator.curves:
                self.tracker.log_curves(artifact, prefixes=prefixes)
