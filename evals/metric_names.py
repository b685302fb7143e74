"""Every metric EditGrid logs, named in one place: each family's prefix, what it measures, when it is logged and
the file that computes it.

    python -m evals.metric_names edit/efficacy diag/L7/drift      # where do these numbers come from?
    python -m evals.metric_names                                 # every family

Producers build their names from the constants and helpers below (``edit_metric("efficacy")``,
``DIAG_PREFIX``, ``cost/*`` constants), and the consumers — the grid report, the trial's plots — read the families'
``report``/``curves`` fields, so a family added here reaches all
of them. Families owned by one editing method (``memit/``, ``lyaplock/``, ``grace/`` …) are named by that method's
file under ``methods/``, under its registry name as prefix (``method_families`` lists them from the registry;
methods never import evals).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricFamily:
    prefix: str  # every name of the family starts with it (ends with "/")
    meaning: str
    when: str  # at which steps it is logged
    source: str  # the file(s) that compute it
    report: bool = False  # a column family of the grid report's table (grid/report.py)
    curves: str | None = None  # the trial's plot of the family against edits (an MLflow artifact path)


EDIT_PREFIX = "edit/"
RETENTION_PREFIX = "retention/"
EVAL_PREFIX = "eval/"
DIAG_PREFIX = "diag/"
VSTAR_PREFIX = "vstar/"
EDITING_PREFIX = "editing/"
SCR_PREFIX = "scr/"
MEMORY_PREFIX = "memory/"
ABILITIES_PREFIX = "abilities/"
JUDGE_PREFIX = "judge/"
GEN_PREFIX = "gen/"
GENERAL_PREFIX = "general/"
LM_EVAL_PREFIX = "lm_eval/"
COST_PREFIX = "cost/"

FAMILIES: tuple[MetricFamily, ...] = (
    MetricFamily(EDIT_PREFIX, "teacher-forced edit metrics over the edits so far (step 0: every record of the "
                 "trial, unedited): efficacy, generalization (paraphrases), specificity (neighbourhood), locality, "
                 "portability, their score; each rate with _ci95_low/_ci95_high (Wilson) and _n",
                 "step 0 and every checkpoint", "evals/teacher_forced.py, evals/retention.py", report=True,
                 curves="plots/metrics_vs_edits.png"),
    MetricFamily(RETENTION_PREFIX, "the edit metrics per age bin of the edits (age_1_of_4 = the oldest quarter) and "
                 "for the newest batch; edits_scored, complete", "every checkpoint", "evals/retention.py",
                 report=True, curves="plots/retention_by_age_vs_edits.png"),
    MetricFamily(EVAL_PREFIX, "bookkeeping of the evaluation (records scored)", "step 0 and every checkpoint",
                 "evals/teacher_forced.py", report=True),
    MetricFamily(DIAG_PREFIX, "per edited matrix L<i>: ‖W‖, ‖W−W₀‖/‖W₀‖, cond(W), σ_max(W−W₀), preservation drift "
                 "D = tr((W−W₀)C(W−W₀)ᵀ); only editors that write weights", "step 0 and every checkpoint",
                 "evals/diagnostics.py, methods/drift.py", report=True, curves="plots/diagnostics_vs_edits.png"),
    MetricFamily(VSTAR_PREFIX, "how well v* reached its target: mean (and min) target probability of the rewriting "
                 "prompts of every batch so far", "every checkpoint", "methods/targets.py (grid/trial.py averages)",
                 report=True),
    MetricFamily(EDITING_PREFIX, "per batch and layer L<i>: ‖Δ‖_F written (update_norm), mean residual ‖R‖ "
                 "(residual_norm)", "after every batch", "methods/editor.py (EditReport)"),
    MetricFamily(SCR_PREFIX, "the SCR fact memory: recall@k, acceptance / correct-selection / locality-rejection "
                 "rates, memory size, added latency", "every checkpoint", "grid/scr_stage.py, retrieval/scr.py",
                 report=True, curves="plots/scr_vs_edits.png"),
    MetricFamily(MEMORY_PREFIX, "memory editors (GRACE, WISE): served_share/<category>, the share of rewrite, "
                 "paraphrase and neighbourhood prompts of the scored edits that the editor's memory serves instead of "
                 "the layer (rewrites and paraphrases should be served, neighbourhood prompts should not)",
                 "every checkpoint after step 0", "grid/evaluators.py (MemoryLookups), methods/editors/", report=True,
                 curves="plots/memory_served_vs_edits.png"),
    MetricFamily(ABILITIES_PREFIX, "likelihood-scored general abilities <task>/<metric>: ARC, PIQA, HellaSwag, "
                 "OpenBookQA, LAMBADA (acc, perplexity), WikiText-2 perplexity", "eval.abilities.steps",
                 "evals/abilities.py", report=True, curves="plots/abilities_vs_edits.png"),
    MetricFamily(JUDGE_PREFIX, "generated answers graded by the LLM judge, per dimension (reliability, "
                 "generalization, portability, locality), agreement with string containment",
                 "step 0 and every checkpoint (eval.generate + eval.judge)", "evals/autoregressive.py, evals/judge.py",
                 report=True, curves="plots/generation_vs_edits.png"),
    MetricFamily(GEN_PREFIX, "generated answers: contains-the-target rates, locality unchanged, fluency",
                 "step 0 and every checkpoint (eval.generate)", "evals/autoregressive.py, evals/fluency.py",
                 report=True, curves="plots/generation_vs_edits.png"),
    MetricFamily(GENERAL_PREFIX, "GLUE/MMLU label scoring (and generated labels)", "eval.general.steps",
                 "evals/general.py", report=True, curves="plots/generation_vs_edits.png"),
    MetricFamily(LM_EVAL_PREFIX, "lm-evaluation-harness tasks <task>/<metric>[/<filter>]", "eval.lm_eval.steps",
                 "evals/lm_eval_bridge.py", report=True),
    MetricFamily(COST_PREFIX, "seconds per edit (editing only), statistics and evaluation seconds, the evaluation's "
                 "share of the trial's time, peak memory (overall and since the previous checkpoint), judge speed",
                 "step 0 and every checkpoint", "grid/trial.py, grid/generation_stage.py, evals/abilities.py",
                 report=True),
)

def method_families() -> tuple[MetricFamily, ...]:
    """The families the editing methods name themselves, one per registered stage or editor kind (``memit/``,
    ``alphaedit/L<i>/null_dims``, ``lyaplock/L<i>/queue``, ``rect/L<i>/energy_kept``, ``prune/L<i>/*``,
    ``grace/codebook_size``, ``wise/threshold`` …): read from the stage registry, so a new stage or editor kind is
    listed without touching this file. Logged after every batch (restraints: at every restraint)."""
    from methods.stages import EDITOR_KINDS, RESTRAINTS, SOLVERS, TARGET_SCALINGS, TRANSFORMS

    registries = (("solver", SOLVERS), ("target scaling", TARGET_SCALINGS), ("update transform", TRANSFORMS),
                  ("restraint", RESTRAINTS),
                  ("editor kind", {name: kind.editor for name, kind in EDITOR_KINDS.items()}))
    families = []
    for role, registry in registries:
        for name, cls in registry.items():
            source = cls.__module__.replace(".", "/") + ".py"
            families.append(MetricFamily(f"{name}/", f"diagnostics of the {name} {role} ({cls.__name__}; its "
                                         "docstring says what each number is)",
                                         "at every restraint" if role == "restraint" else "after every batch",
                                         source))
    return tuple(families)


# ----------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------

EDIT_RATES = ("efficacy", "generalization", "specificity", "locality", "portability")  # teacher-forced rates
SCORE_PARTS = ("efficacy", "generalization", "specificity")  # edit/score is their harmonic mean


def edit_metric(name: str) -> str:
    return f"{EDIT_PREFIX}{name}"


EFFICACY, GENERALIZATION, SPECIFICITY, LOCALITY, PORTABILITY = (edit_metric(name) for name in EDIT_RATES)
EDIT_SCORE = edit_metric("score")
EVAL_NUM_RECORDS = f"{EVAL_PREFIX}num_records"


def retention_metric(group: str, name: str) -> str:
    """``retention/<age bin or newest_batch>/<rate>``, or ``retention/<name>`` when ``group`` is empty."""
    return f"{RETENTION_PREFIX}{group}/{name}" if group else f"{RETENTION_PREFIX}{name}"


def diag_metric(layer: int | str, name: str) -> str:
    """``diag/L<layer>/<name>`` (``layer="mean"``: the report's mean over layers)."""
    return f"{DIAG_PREFIX}{'L' if isinstance(layer, int) else ''}{layer}/{name}"


def editing_metric(layer: int | str, name: str) -> str:
    """``editing/L<layer>/<name>`` for a layer's MLP output projection; ``editing/<label>/<name>`` for another
    matrix an editor writes (label ``L<layer>.<path>``)."""
    return f"{EDITING_PREFIX}{'L' if isinstance(layer, int) else ''}{layer}/{name}"


VSTAR_TARGET_PROB = f"{VSTAR_PREFIX}target_prob"
VSTAR_TARGET_PROB_MIN = f"{VSTAR_PREFIX}target_prob_min"

SCR_MEMORY_SIZE = f"{SCR_PREFIX}memory_size"
SCR_INDEX_BYTES = f"{SCR_PREFIX}index_bytes"
SCR_ADD_SECONDS_PER_EDIT = f"{SCR_PREFIX}add_seconds_per_edit"


def scr_metric(name: str) -> str:
    """``scr/<name>`` (retrieval/scr.py returns its rates unprefixed)."""
    return f"{SCR_PREFIX}{name}"


def memory_served_metric(category: str) -> str:
    return f"{MEMORY_PREFIX}served_share/{category}"


def abilities_metric(task: str, metric: str) -> str:
    return f"{ABILITIES_PREFIX}{task}/{metric}"


def judge_metric(name: str) -> str:
    return f"{JUDGE_PREFIX}{name}"


def gen_metric(name: str) -> str:
    return f"{GEN_PREFIX}{name}"


def general_metric(task: str, *parts: str) -> str:
    return "/".join((f"{GENERAL_PREFIX}{task}", *parts))


def lm_eval_metric(task: str, metric: str, result_filter: str = "") -> str:
    return f"{LM_EVAL_PREFIX}{task}/{metric}" + ("" if result_filter in ("", "none") else f"/{result_filter}")


COST_SECONDS_PER_EDIT = f"{COST_PREFIX}seconds_per_edit"
COST_STATS_SECONDS = f"{COST_PREFIX}stats_seconds"
COST_EVAL_SECONDS = f"{COST_PREFIX}eval_seconds"  # this checkpoint's teacher-forced evaluation
COST_EVAL_SECONDS_TOTAL = f"{COST_PREFIX}eval_seconds_total"  # every evaluation so far, all families
COST_EVAL_SHARE = f"{COST_PREFIX}eval_share"
COST_PEAK_MEMORY_MB = f"{COST_PREFIX}peak_memory_mb"
COST_INTERVAL_PEAK_MEMORY_MB = f"{COST_PREFIX}interval_peak_memory_mb"
COST_PROTOCOL_EVAL_SECONDS = f"{COST_PREFIX}protocol_eval_seconds"
COST_ABILITIES_EVAL_SECONDS = f"{COST_PREFIX}abilities_eval_seconds"
COST_JUDGE_JUDGMENTS_PER_SECOND = f"{COST_PREFIX}judge_judgments_per_second"
COST_JUDGE_CACHED_SHARE = f"{COST_PREFIX}judge_cached_share"

# The checkpoint rows a trial returns (run_trial's result, what Ray Tune and the launcher's summary draw from).
HEADLINE_PREFIXES = (EDIT_PREFIX, COST_SECONDS_PER_EDIT, COST_EVAL_SHARE, VSTAR_PREFIX)


def report_prefixes() -> tuple[str, ...]:
    """The families the grid report tabulates."""
    return tuple(family.prefix for family in FAMILIES if family.report)


def family_of(name: str) -> MetricFamily | None:
    """The family ``name`` belongs to (longest prefix), or None for a name no family declares."""
    matches = [f for f in (*FAMILIES, *method_families()) if name.startswith(f.prefix)]
    return max(matches, key=lambda f: len(f.prefix)) if matches else None


def explain(name: str) -> str:
    family = family_of(name)
    if family is None:
        return f"{name}: no metric family has this prefix (see python -m evals.metric_names)"
    return f"{name}\n  {family.meaning}\n  logged: {family.when}\n  computed in: {family.source}"


def main(argv: list[str]) -> int:
    if argv:
        print("\n".join(explain(name) for name in argv))
        return 0 if all(family_of(name) for name in argv) else 1
    for family in (*FAMILIES, *method_families()):
        print(f"{family.prefix:<12} {family.meaning}\n{'':<12} logged: {family.when}; in {family.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
