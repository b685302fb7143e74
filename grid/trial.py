"""One trial: model × data slice × method (+ hyper-parameters) × batch size × checkpoints, end to end.

Edits are applied in data order, ``edits.batch_size`` requests per step. At step 0 (before any edit) and at every
checkpoint n the model is evaluated on *all n edits applied so far* (retention, not edit-time success), and every
number goes to the trial's MLflow run with ``step = edits applied``:

  edit/*        teacher-forced metrics (evals/teacher_forced.py); step 0 covers all records of the trial
  diag/L<i>/*   per edited matrix: ‖W‖, ‖W−W₀‖/‖W₀‖, cond(W), σ_max(W−W₀)            (evals/diagnostics.py)
  diag/L<i>/drift  D(W) = tr((W−W₀)C(W−W₀)ᵀ), the preservation drift, for every method    (methods/drift.py)
  vstar/*       how well v* reached its target (mean target probability of the batch's rewriting prompts)
  editing/L<i>/{update_norm,residual_norm}  ‖Δ‖_F written and mean ‖R‖ of the batch, after every batch
  <stage>/*     stage diagnostics, logged after every batch: memit/lambda, alphaedit/L<i>/null_dims,
                lyaplock/L<i>/{drift,drift_mean,threshold,queue}, rect|srfusion/L<i>/energy_kept
                (methods/solvers, methods/transforms); prune/L<i>/* at every restraint (methods/restraints)
  scr/*         the SCR fact memory, retrieval recall@k, selection rates, added latency (grid/scr_stage.py);
                with SCR the edit/* metrics are scored on the prompt SCR builds (fact in front, or the bare prompt)
  cost/*        seconds per edit (editing only — for SCR adding the facts to the memory; statistics and
                evaluation excluded), statistics seconds, evaluation seconds, peak memory
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
import json
import math
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evals.datasets import load_records
from evals.diagnostics import layer_diagnostics
from evals.records import EditRecord
from evals.teacher_forced import compute_reference, evaluate_records
from grid.config import Trial, method_settings
from grid.scr_stage import ScrStage
from methods.stages import MethodSpec, build_editor, build_restraint
from grid.tracking import TrialTracker
from methods.arch import EditableModel
from methods.context import generate_context_templates
from methods.corpus import parse_corpus
from methods.models import load_model
from methods.requests import EditRequest
from methods.stats import second_moments

logger = logging.getLogger(__name__)


class TrialError(RuntimeError):
    """A trial that cannot run as configured (reported with the trial's name)."""


@dataclass
class TrialResult:
    trial: Trial
    run_id: str
    checkpoints: list[dict] = field(default_factory=list)  # one row per evaluation: step + headline metrics


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


def to_request(record: EditRecord) -> EditRequest:
    return EditRequest(prompt=record.prompt_template(), subject=record.subject, target=record.target_new)


def batches(num_edits: int, batch_size: int):
    for start in range(0, num_edits, batch_size):
        yield start, min(start + batch_size, num_edits)


def resolve_layers(editable: EditableModel, spec: MethodSpec, trial_name: str) -> list[int]:
    """The configured layers, or the architecture's default window (its last layer(s) for one-layer solvers)."""
    layers = spec.layers(editable.default_layers())
    outside = [layer for layer in layers if layer >= editable.num_layers]
    if outside:
        raise TrialError(f"trial {trial_name}: hparams.layers {outside} are outside the model "
                         f"({editable.num_layers} layers, 0–{editable.num_layers - 1})")
    return layers


def run_trial(trial: Trial, tracking_uri: str, parent_run_id: str | None = None, progress: bool = True) -> TrialResult:
    cfg = trial.config
    spec = method_settings(cfg["method"], cfg.get("hparams") or {})
    torch.manual_seed(cfg["seed"])
    tags = {"editgrid.role": "trial", "editgrid.trial_index": trial.index,
            "editgrid.axes": json.dumps(trial.axes, sort_keys=True, default=str),
            "editgrid.trial_id": trial.trial_id, "editgrid.method": cfg["method"], "editgrid.solver": spec.solver,
            "editgrid.transforms": ",".join(spec.transforms) or "none", "editgrid.restraint": spec.restraint or "none",
            "editgrid.retrieval": spec.retrieval or "none",
            "editgrid.model": str(cfg["model"]), "editgrid.data": str(cfg["data"]["path"]),
            "editgrid.protocol": "teacher_forced", **spec.tags}
    params = {**cfg, "method_hparams": spec.hparams, "solver": spec.solver,
              "transforms": list(spec.transforms), "restraint": spec.restraint, "retrieval": spec.retrieval}
    with TrialTracker(tracking_uri, cfg["experiment"], trial.name, params=params, tags=tags,
                      parent_run_id=parent_run_id) as tracker:
        result = TrialResult(trial=trial, run_id=tracker.run_id)
        _run(trial, cfg, spec, tracker, result, progress)
        return result


def _run(trial: Trial, cfg: dict, spec: MethodSpec, tracker: TrialTracker, result: TrialResult,
         progress: bool) -> None:
    cache_dir = Path(cfg["cache_dir"]) if cfg.get("cache_dir") else None
    margs = cfg["model_args"]
    loaded = load_model(cfg["model"], dtype=margs["dtype"], device=margs["device"], cache_dir=cache_dir)
    editable = EditableModel.wrap(loaded.model, blocks=margs.get("blocks"), mlp=margs.get("mlp"),
                                  mlp_out=margs.get("mlp_out"))
    tokenizer = loaded.tokenizer
    device = editable.parameter_device()
    layers = resolve_layers(editable, spec, trial.name) if spec.edits_weights else []
    tracker.set_tags({"editgrid.layers": ",".join(map(str, layers)), "editgrid.model_fingerprint": loaded.fingerprint})

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
    if spec.edits_weights:
        stats_cfg = cfg["stats"]
        stats = second_moments(editable, tokenizer, layers, parse_corpus(stats_cfg["corpus"]),
                               stats_cfg["num_tokens"], model_key=f"{loaded.model_id}@{loaded.fingerprint}",
                               cache_dir=cache_dir, max_length=stats_cfg["max_length"], progress=progress,
                               corpus_seed=stats_cfg["seed"])
        tracker.log_dict({"corpus": stats.corpus, "tokens": stats.tokens, "from_cache": stats.from_cache},
                         "stats/second_moments.json")
        context_groups = generate_context_templates(loaded.model, tokenizer, seed=cfg["seed"])
        tracker.log_dict({"context_templates": context_groups}, "editing/context_templates.json")
        moments = {layer: stats.moments[layer].to(device) for layer in layers}
        editor = build_editor(spec, editable, tokenizer, layers, moments, context_groups, seed=cfg["seed"])
    originals = {layer: editable.weight(layer).detach().clone() for layer in layers}
    live_weights = {layer: editable.weight(layer) for layer in layers}
    restraint = build_restraint(spec)
    if restraint is not None:
        restraint.prepare(originals)
    eval_batch = cfg["eval"]["batch_size"]
    scr = (ScrStage(spec, loaded.model, tokenizer, eval_batch, embedder_device=device.type, progress=progress)
           if spec.retrieval else None)

    def evaluate(step: int, edit_seconds: float, vstar_probs: list[float]) -> dict:
        """Metrics after ``step`` edits (0 = before editing, over every record of the trial)."""
        started = time.perf_counter()
        subset = records if step == 0 else records[:step]
        # PRUNE's official protocol: the restrained weights are the ones evaluated (and described by diag/*);
        # the unrestrained ones are restored afterwards and editing continues from them.
        once = step and restraint is not None and not restraint.every_step
        swap = restraint.swapped_in(live_weights) if once else nullcontext()
        with swap:
            # SCR decides, with the model as it is now, what each evaluation prompt becomes (empty memory: itself).
            scr_eval = scr.evaluate(subset) if scr is not None and step else None
            evaluation = evaluate_records(loaded.model, tokenizer, subset, reference=reference,
                                          batch_size=eval_batch,
                                          progress=f"evaluating {len(subset)} edits" if progress else None,
                                          prompt_builder=scr_eval.prompt_builder if scr_eval else None)
            metrics = dict(evaluation.metrics)
            if live_weights:
                metrics.update(layer_diagnostics(live_weights, originals, moments))
            eval_seconds = time.perf_counter() - started
            if scr_eval is not None:
                metrics.update(scr_eval.metrics)
                metrics.update(scr.measure_latency(subset, cfg["eval"]["scr_latency_queries"]))
        if scr is not None:
            metrics["scr/memory_size"] = float(len(scr.memory))
            if step:
                metrics["scr/add_seconds_per_edit"] = scr_add_seconds / step
        if scr_eval is not None:
            tracker.log_table(scr_eval.rows, f"tables/scr_decisions/step_{step:06d}.json")
            with tempfile.TemporaryDirectory() as folder:  # the memory as of this checkpoint, reloadable
                tracker.log_artifacts(str(scr.save(folder)), "checkpoints/scr_memory")
        if step and restraint is not None:
            metrics.update(restraint.metrics())
        metrics["cost/stats_seconds"] = stats.seconds if stats is not None else 0.0
        metrics["cost/eval_seconds"] = eval_seconds
        metrics["cost/peak_memory_mb"] = peak_memory_mb(device)
        if step:
            metrics["cost/seconds_per_edit"] = edit_seconds / step
        if vstar_probs:
            metrics["vstar/target_prob"] = sum(vstar_probs) / len(vstar_probs)
            metrics["vstar/target_prob_min"] = min(vstar_probs)
        tracker.log_metrics(metrics, step=step)
        result.checkpoints.append({"step": step, **{k: v for k, v in metrics.items()
                                                     if k.startswith(("edit/", "cost/seconds", "vstar/"))}})
        rows = {row["case_id"]: dict(row) for row in evaluation.per_record}
        for decision in scr_eval.rows if scr_eval is not None else []:
            if decision["category"] == "rewrite":
                rows[decision["case_id"]].update(scr_status=decision["status"], scr_chosen_id=decision["chosen_id"])
        return rows

    reference = compute_reference(loaded.model, tokenizer, records, batch_size=eval_batch)
    pre_rows = evaluate(0, 0.0, [])

    edit_seconds, scr_add_seconds, vstar_probs = 0.0, 0.0, []
    post_rows: dict = {}
    bar = tqdm(total=len(requests), desc=f"editing ({trial.name})", unit="edit", disable=not progress)
    for start, end in batches(len(requests), cfg["edits"]["batch_size"]):
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
            postfix["vstar_p"] = f"{min(report.target_prob):.2f}"
        if scr is not None:
            added = scr.add(records[start:end])
            scr_add_seconds += added
            edit_seconds += added
        bar.set_postfix(s_per_edit=f"{edit_seconds / end:.2f}", **postfix, refresh=False)
        bar.update(end - start)
        if any(not math.isfinite(float(editable.weight(layer).abs().max())) for layer in layers):
            raise TrialError(f"trial {trial.name}: edited weights became NaN/Inf after {end} edits")
        if end in checkpoints:
            bar.clear()
            post_rows = evaluate(end, edit_seconds, vstar_probs)
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
    if layers:
        tracker.log_curves("plots/diagnostics_vs_edits.png", prefixes=("diag/",))
    if scr is not None:
        tracker.log_curves("plots/scr_vs_edits.png", prefixes=("scr/recall_at_k/", "scr/acceptance_rate",
                                                             "scr/correct_selection_rate",
                                                             "scr/locality_rejection_rate"))
