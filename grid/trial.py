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

Inside a grid (a parent run) every evaluation checkpoint also writes a trial checkpoint (grid/trial_checkpoint.py);
an attempt that finds one — a Ray retry, or the grid submitted again after its driver died — copies the history the
interrupted attempt logged up to it into its own run, deletes that run, restores the edited weights, the editor's
state and the SCR memory, and continues with the next batch. ``stop_on_collapse`` (grid/collapse.py) can end a
trial at a checkpoint where it has collapsed; the run is then tagged ``editgrid.stopped_early`` with the reason.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evals.abilities import (CURVES_FILE as ABILITY_CURVES, TABLE_DIR as ABILITY_TABLES, AbilitiesEvaluator,
                             AbilitySettings)
from evals.datasets import load_records
from evals.diagnostics import layer_diagnostics
from evals.records import EditRecord
from evals.pre_edit import pre_edit_outputs
from evals.retention import RetentionPlan, retention_metrics
from evals.teacher_forced import METRIC_ORDER, edit_score, evaluate_records
from grid.collapse import collapse_reason
from grid.config import Trial, method_settings
from grid.generation_stage import GenerationStage
from grid.gridrun import delete_runs, unfinished_trial_runs
from grid.scr_stage import ScrStage
from grid.tracking import TrialTracker
from grid.trial_checkpoint import TrialCheckpoints, TrialState
from methods.arch import EditableModel
from methods.cache import default_cache_dir
from methods.context import generate_context_templates
from methods.corpus import parse_corpus
from methods.memory import peak_memory_mb, reset_peak_memory
from methods.models import load_model
from methods.requests import EditRequest
from methods.stages import MethodSpec, build_editor, build_restraint
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
    """The configured layers, else the editor kind's default depths, else the architecture's default window (its
    last layer(s) for one-layer solvers)."""
    layers = spec.layers(editable.default_layers(), editable.num_layers)
    outside = [layer for layer in layers if layer >= editable.num_layers]
    if outside:
        raise TrialError(f"trial {trial_name}: hparams.layers {outside} are outside the model "
                         f"({editable.num_layers} layers, 0–{editable.num_layers - 1})")
    return layers


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
            "editgrid.solver": spec.solver,
            "editgrid.transforms": ",".join(spec.transforms) or "none", "editgrid.restraint": spec.restraint or "none",
            "editgrid.retrieval": spec.retrieval or "none",
            "editgrid.model": str(cfg["model"]), "editgrid.data": str(cfg["data"]["path"]),
            "editgrid.protocol": "teacher_forced", **spec.tags}
    params = {**cfg, "method_hparams": spec.hparams, "editor": spec.editor, "solver": spec.solver,
              "transforms": list(spec.transforms), "restraint": spec.restraint, "retrieval": spec.retrieval}
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
        _run(trial, cfg, spec, tracker, result, progress, store, resume, on_checkpoint)
    if store is not None and not (cfg.get("checkpoints") or {}).get("keep_final"):
        store.remove()
    return result


def _restore(state: TrialState, editable: EditableModel, layers: list[int], editor, scr: ScrStage | None) -> None:
    """Put the model, the editor and the SCR memory back as they were at ``state.cursor`` edits."""
    if sorted(state.weights) != sorted(layers):
        raise TrialError(f"checkpoint after {state.cursor} edits holds layers {sorted(state.weights)}, the trial "
                         f"edits {layers}")
    with torch.no_grad():
        for layer in layers:
            editable.weight(layer).copy_(state.weights[layer])
    if editor is not None:
        editor.load_state_dict(state.editor_state)
    if scr is not None:
        if state.scr_memory is None:
            raise TrialError(f"checkpoint after {state.cursor} edits has no SCR memory")
        scr.restore(state.scr_memory)
    torch.set_rng_state(state.rng_state)


def _run(trial: Trial, cfg: dict, spec: MethodSpec, tracker: TrialTracker, result: TrialResult,
         progress: bool, store: TrialCheckpoints | None = None, resume: TrialState | None = None,
         on_checkpoint=None) -> None:
    cache_dir = cache_root(cfg)
    margs = cfg["model_args"]
    loaded = load_model(cfg["model"], dtype=margs["dtype"], device=margs["device"], cache_dir=cache_dir,
                        linear_backend=margs["linear_backend"])
    editable = EditableModel.wrap(loaded.model, blocks=margs.get("blocks"), mlp=margs.get("mlp"),
                                  mlp_out=margs.get("mlp_out"))
    tokenizer = loaded.tokenizer
    model_key = f"{loaded.model_id}@{loaded.fingerprint}"  # names the unedited weights in every cache key
    device = editable.parameter_device()
    layers = resolve_layers(editable, spec, trial.name) if spec.edits_model else []
    tracker.set_tags({"editgrid.layers": ",".join(map(str, layers)), "editgrid.model_fingerprint": loaded.fingerprint,
                      "editgrid.linear_backend": loaded.linear_backend, "editgrid.linear_plan": loaded.linear_plan})

    data = cfg["data"]
    checkpoints = cfg["edits"]["checkpoints"]
    records = load_records(data["path"], format=data["format"], limit=data["limit"] or checkpoints[-1],
                           offset=data["offset"])
    if len(records) < checkpoints[-1]:
        raise TrialError(f"trial {trial.name}: {data['path']} has {len(records)} usable records after offset "
                         f"{data['offset']}, fewer than the last checkpoint {checkpoints[-1]}")
    records = records[:checkpoints[-1]]
    requests = [to_request(r) for r in records]

    stats, moments, editor = None, {}, None
    if spec.edits_weights:  # C for the solvers and for the drift diagnostic D of every weight-writing editor
        stats_cfg = cfg["stats"]
        stats = second_moments(editable, tokenizer, layers, parse_corpus(stats_cfg["corpus"]),
                               stats_cfg["num_tokens"], model_key=model_key,
                               cache_dir=cache_dir, max_length=stats_cfg["max_length"], progress=progress,
                               corpus_seed=stats_cfg["seed"],
                               forward_dtype=FORWARD_DTYPE_BY_NAME.get(stats_cfg["forward_dtype"]))
        tracker.log_dict({"corpus": stats.corpus, "tokens": stats.tokens, "from_cache": stats.from_cache},
                         "stats/second_moments.json")
        moments = {layer: stats.moments[layer].to(device) for layer in layers}
    if spec.edits_model:
        context_groups = []
        if spec.kind is None:  # v*'s context templates (locate-then-edit only)
            context_groups = generate_context_templates(loaded.model, tokenizer, seed=cfg["seed"])
            tracker.log_dict({"context_templates": context_groups}, "editing/context_templates.json")
        editor = build_editor(spec, editable, tokenizer, layers, moments, context_groups, seed=cfg["seed"],
                              cache_dir=cache_dir)
    # The matrices the editor writes in place (none for editors that wrap a module with a memory, e.g. GRACE).
    weight_layers = layers if spec.edits_weights else []
    originals = {layer: editable.weight(layer).detach().clone() for layer in weight_layers}
    live_weights = {layer: editable.weight(layer) for layer in weight_layers}
    restraint = build_restraint(spec)
    if restraint is not None:
        restraint.prepare(originals)
    eval_batch = cfg["eval"]["batch_size"]
    scr = (ScrStage(spec, loaded.model, tokenizer, eval_batch, embedder_device=device.type, progress=progress)
           if spec.retrieval else None)

    retention_cfg = cfg["eval"]["retention"]
    retention = RetentionPlan(len(requests), retention_cfg["sample_size"], retention_cfg["strata"],
                              seed=cfg["seed"] if retention_cfg["seed"] is None else retention_cfg["seed"])
    # Every checkpoint's evaluation so far, step 0 included (cost/eval_share), and the peak memory so far.
    clock = {"eval_seconds": 0.0, "peak_memory_mb": 0.0}

    def evaluate(step: int, edit_seconds: float, vstar_probs: list[float], newest_start: int = 0
                 ) -> tuple[dict, dict]:
        """Metrics after ``step`` edits (0 = before editing, over every record of the trial; later, over the
        retention sample of the edits so far, evals/retention.py), and the per-record rows."""
        started = time.perf_counter()
        sample = None
        if step == 0:
            subset = records
        else:
            sample = retention.sample(step, newest_start,
                                      score_all=step == checkpoints[-1] and retention_cfg["final"] == "all")
            subset = [records[i] for i in sample.indices]
        # PRUNE's official protocol: the restrained weights are the ones evaluated (and described by diag/*);
        # the unrestrained ones are restored afterwards and editing continues from them.
        once = step and restraint is not None and not restraint.every_step
        swap = restraint.swapped_in(live_weights) if once else nullcontext()
        with swap:
            # SCR decides, with the model as it is now, what each evaluation prompt becomes (empty memory: itself).
            scr_eval = scr.evaluate(subset) if scr is not None and step else None
            if step == 0:  # the unedited model: the same for every trial on this model and data slice
                evaluation = pre_edit.evaluation
            else:
                evaluation = evaluate_records(loaded.model, tokenizer, subset, reference=pre_edit.reference,
                                              batch_size=eval_batch,
                                              progress=f"evaluating {len(subset)} edits" if progress else None,
                                              prompt_builder=scr_eval.prompt_builder if scr_eval else None)
            metrics = dict(evaluation.metrics)
            if sample is not None:  # stratified estimates with intervals replace the plain means of the sample
                metrics.update(retention_metrics(sample, dict(zip(sample.indices, evaluation.per_record)),
                                                 METRIC_ORDER))
                metrics.update(edit_score(metrics))
            if live_weights:
                metrics.update(layer_diagnostics(live_weights, originals, moments))
            eval_seconds = time.perf_counter() - started + (0.0 if step else pre_edit_seconds)
            if protocol.active:  # generation + judge, general abilities, fluency: same model, same prompts
                protocol_started = time.perf_counter()
                protocol_metrics, protocol_tables = protocol.evaluate(
                    step, subset, scr_eval.prompt_builder if scr_eval is not None else None)
                metrics.update(protocol_metrics)
                metrics["cost/protocol_eval_seconds"] = time.perf_counter() - protocol_started
            if abilities is not None and abilities.due(step):  # step 0 from the shared cache
                ability = abilities.evaluate(step)
                metrics.update(ability.metrics)
                tracker.log_table(ability.rows, f"{ABILITY_TABLES}/step_{step:06d}.json")
                if step == 0:
                    tracker.set_tags({"editgrid.abilities_from_cache": ability.from_cache})
            if scr_eval is not None:
                metrics.update(scr_eval.metrics)
                metrics.update(scr.measure_latency(subset, cfg["eval"]["scr_latency_queries"]))
        if scr is not None:
            metrics["scr/memory_size"] = float(len(scr.memory))
            if step:
                metrics["scr/add_seconds_per_edit"] = scr_add_seconds / step
        for artifact, rows in (protocol_tables.items() if protocol.active else ()):
            tracker.log_table(rows, artifact)
        if scr_eval is not None:
            tracker.log_table(scr_eval.rows, f"tables/scr_decisions/step_{step:06d}.json")
            with tempfile.TemporaryDirectory() as folder:  # the memory as of this checkpoint, reloadable
                tracker.log_artifacts(str(scr.save(folder)), "checkpoints/scr_memory")
        if step and restraint is not None:
            metrics.update(restraint.metrics())
        metrics["cost/stats_seconds"] = stats.seconds if stats is not None else 0.0
        metrics["cost/eval_seconds"] = eval_seconds
        # Everything this checkpoint evaluated (teacher-forced, protocol, abilities, SCR), against editing so far.
        clock["eval_seconds"] += time.perf_counter() - started + (0.0 if step else pre_edit_seconds)
        metrics["cost/eval_seconds_total"] = clock["eval_seconds"]
        if step:
            metrics["cost/eval_share"] = clock["eval_seconds"] / (clock["eval_seconds"] + edit_seconds)
        # Peak since the previous checkpoint (editing + this evaluation): flat in N when nothing grows with it.
        interval_peak = peak_memory_mb(device)
        clock["peak_memory_mb"] = max(clock["peak_memory_mb"], interval_peak)
        metrics["cost/interval_peak_memory_mb"] = interval_peak
        metrics["cost/peak_memory_mb"] = clock["peak_memory_mb"]
        if step:
            metrics["cost/seconds_per_edit"] = edit_seconds / step
        if vstar_probs:
            metrics["vstar/target_prob"] = sum(vstar_probs) / len(vstar_probs)
            metrics["vstar/target_prob_min"] = min(vstar_probs)
        tracker.log_metrics(metrics, step=step)
        result.checkpoints.append({"step": step, **{k: v for k, v in metrics.items()
                                                     if k.startswith(("edit/", "cost/seconds", "cost/eval_share",
                                                                      "vstar/"))}})
        if on_checkpoint is not None:
            on_checkpoint(result.checkpoints[-1])
        reset_peak_memory(device)
        rows = {row["case_id"]: dict(row) for row in evaluation.per_record}
        for decision in scr_eval.rows if scr_eval is not None else []:
            if decision["category"] == "rewrite":
                rows[decision["case_id"]].update(scr_status=decision["status"], scr_chosen_id=decision["chosen_id"])
        return rows, metrics

    pre_edit_started = time.perf_counter()
    pre_edit = pre_edit_outputs(loaded.model, tokenizer, records, model_key, eval_batch, cache_dir,
                                progress=f"evaluating the unedited model on {len(records)} edits" if progress else None)
    pre_edit_seconds = time.perf_counter() - pre_edit_started  # counted in step 0's cost/eval_seconds
    tracker.set_tags({"editgrid.pre_edit_from_cache": pre_edit.from_cache})
    protocol = GenerationStage(cfg["eval"], loaded.model, tokenizer, records, model_key, cfg["model"], margs,
                               cache_dir, progress=progress)
    abilities = (AbilitiesEvaluator(AbilitySettings.from_config(cfg["eval"]["abilities"], eval_batch), loaded.model,
                                    tokenizer, model_key, cache_dir, progress=progress)
                 if (cfg["eval"].get("abilities") or {}).get("enabled") else None)
    if protocol.judge is not None:
        tracker.set_tags({"editgrid.protocol": "teacher_forced+generation_judge",
                          "editgrid.judge": protocol.judge.backend.name,
                          "editgrid.generation": json.dumps(protocol.settings.describe())})
    edit_seconds, scr_add_seconds, vstar_probs = 0.0, 0.0, []
    post_rows: dict = {}
    if resume is None:
        pre_rows, _ = evaluate(0, 0.0, [])
        cursor = 0
    else:
        _restore(resume, editable, weight_layers, editor, scr)
        pre_rows, post_rows, cursor = resume.pre_rows, resume.post_rows, resume.cursor
        edit_seconds, scr_add_seconds = resume.edit_seconds, resume.scr_add_seconds
        clock["eval_seconds"] = resume.eval_seconds
        vstar_probs = list(resume.vstar_probs)
        result.checkpoints.extend(resume.result_rows)

    def save_checkpoint(step: int) -> None:
        state = TrialState(trial_id=trial.trial_id, cursor=step,
                           weights={layer: editable.weight(layer) for layer in weight_layers},
                           editor_state=editor.state_dict() if editor is not None else {},
                           edit_seconds=edit_seconds, scr_add_seconds=scr_add_seconds, vstar_probs=vstar_probs,
                           eval_seconds=clock["eval_seconds"],
                           pre_rows=pre_rows, post_rows=post_rows, result_rows=result.checkpoints,
                           rng_state=torch.get_rng_state())
        store.save(state, tracker.run_id, scr_saver=scr.save if scr is not None else None)

    bar = tqdm(total=len(requests), initial=cursor, desc=f"editing ({trial.name})", unit="edit",
               disable=not progress)
    for start, end in batches(len(requests), cfg["edits"]["batch_size"]):
        if end <= cursor:  # applied before the checkpoint this attempt resumed from
            continue
        postfix = {}
        if editor is not None:
            report = editor.apply(requests[start:end])
            edit_seconds += report.seconds
            if restraint is not None and restraint.every_step:
                restrain_start = time.perf_counter()
                restraint.apply_in_place(live_weights)  # PRUNE appendix C.6: the next batch edits restrained weights
                edit_seconds += time.perf_counter() - restrain_start
            batch_metrics = editor.metrics()
            batch_metrics.update({f"editing/L{layer}/update_norm": norm
                                  for layer, norm in report.update_norm.items()})
            batch_metrics.update({f"editing/L{layer}/residual_norm": norm
                                  for layer, norm in report.residual_norm.items()})
            tracker.log_metrics(batch_metrics, step=end)
            vstar_probs.extend(report.target_prob)
            if report.target_prob:
                postfix["vstar_p"] = f"{min(report.target_prob):.2f}"
        if scr is not None:
            added = scr.add(records[start:end])
            scr_add_seconds += added
            edit_seconds += added
        bar.set_postfix(s_per_edit=f"{edit_seconds / end:.2f}", **postfix, refresh=False)
        bar.update(end - start)
        if any(not math.isfinite(float(weight.abs().max())) for weight in live_weights.values()):
            raise TrialError(f"trial {trial.name}: edited weights became NaN/Inf after {end} edits")
        if end in checkpoints:
            bar.clear()
            post_rows, metrics = evaluate(end, edit_seconds, vstar_probs, newest_start=start)
            stopped = collapse_reason(cfg.get("stop_on_collapse") or {}, metrics, end, trial.name)
            if stopped:
                logger.warning("trial %s: %s; stopping early", trial.name, stopped)
                tracker.set_tags({"editgrid.stopped_early": stopped})
                break
            if store is not None and (end < checkpoints[-1] or (cfg.get("checkpoints") or {}).get("keep_final")):
                save_checkpoint(end)
            bar.refresh()
    bar.close()

    table = []
    for record in records:
        pre, post = pre_rows.get(record.case_id, {}), post_rows.get(record.case_id, {})
        row = {"case_id": record.case_id, "subject": record.subject, "prompt": record.prompt,
               "target_true": record.target_true, "target_new": record.target_new}
        row.update({f"pre_{k}": v for k, v in pre.items() if k not in ("case_id", "source", "protocol")})
        row.update({f"post_{k}": v for k, v in post.items() if k not in ("case_id", "source", "protocol")})
        table.append(row)
    tracker.log_table(table, "tables/per_edit_results.json")
    tracker.log_curves("plots/metrics_vs_edits.png", prefixes=("edit/",))
    tracker.log_curves("plots/retention_by_age_vs_edits.png", prefixes=("retention/",))
    if protocol.active:
        tracker.log_curves("plots/generation_vs_edits.png", prefixes=("judge/", "gen/", "general/"))
    if abilities is not None:
        tracker.log_curves(ABILITY_CURVES, prefixes=("abilities/",))
    if live_weights:
        tracker.log_curves("plots/diagnostics_vs_edits.png", prefixes=("diag/",))
    if scr is not None:
        tracker.log_curves("plots/scr_vs_edits.png", prefixes=("scr/recall_at_k/", "scr/acceptance_rate",
                                                             "scr/correct_selection_rate",
                                                             "scr/locality_rejection_rate"))
