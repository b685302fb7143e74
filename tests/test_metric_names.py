"""Metric names in one place (evals/metric_names.py) and checkpoint evaluators registered once
(grid/evaluators.py): every name a trial logs belongs to a declared family whose computing file exists; a family
declared for the report reaches it; a new evaluator appended to the registry is evaluated at step 0 and every
checkpoint, timed, and plotted, with nothing else touched."""

from __future__ import annotations

from pathlib import Path

import pytest

import grid.evaluators
from evals import metric_names
from evals.metric_names import FAMILIES, family_of, method_families
from grid.evaluators import CheckpointEvaluator
from grid.launch import main
from grid.report import ROW_PREFIXES

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_names_files_that_exist_and_prefixes_are_distinct():
    families = (*FAMILIES, *method_families())
    prefixes = [family.prefix for family in families]
    assert len(prefixes) == len(set(prefixes))
    for family in families:
        assert family.prefix.endswith("/")
        for source in family.source.split(","):
            path = source.strip().split(" ")[0]
            assert (ROOT / path).exists(), (family.prefix, path)


def test_method_families_come_from_the_stage_registry():
    from methods.stages import EDITOR_KINDS, RESTRAINTS, SOLVERS, TRANSFORMS

    for name in (*SOLVERS, *TRANSFORMS, *RESTRAINTS, *EDITOR_KINDS):
        assert family_of(f"{name}/L3/anything") is not None, name
    assert family_of("lyaplock/L7/queue").source == "methods/solvers/lyaplock.py"
    assert family_of("grace/codebook_size").source == "methods/editors/grace.py"
    assert family_of("edit/efficacy_ci95_low").prefix == "edit/"
    assert family_of("nothing/at_all") is None


def test_the_report_tabulates_every_family_declared_for_it():
    assert set(ROW_PREFIXES) == {f.prefix for f in FAMILIES if f.report}
    assert {"lm_eval/", "vstar/", "edit/", "abilities/"} <= set(ROW_PREFIXES)  # lm_eval/ and vstar/ were missing


def test_explain_says_where_a_number_comes_from(capsys):
    assert metric_names.main(["diag/L7/drift", "cost/eval_share"]) == 0
    out = capsys.readouterr().out
    assert "evals/diagnostics.py" in out and "grid/trial.py" in out
    assert metric_names.main(["made/up"]) == 1


class EditsSeen(CheckpointEvaluator):
    """A new family for the test: how many edits the checkpoint scored, logged as probe/edits_scored."""

    curves = (("plots/probe_vs_edits.png", ("probe/",)),)
    calls: list[int] = []

    @classmethod
    def build(cls, context):
        return cls()

    def due(self, step: int) -> bool:
        return step != 4

    def evaluate(self, point) -> dict[str, float]:
        EditsSeen.calls.append(point.step)
        return {"probe/edits_scored": float(len(point.records))}


def test_an_evaluator_appended_to_the_registry_is_run_logged_timed_and_plotted(
        tmp_path, tiny_llama_dir, small_corpus, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setattr(grid.evaluators, "EVALUATORS", (*grid.evaluators.EVALUATORS, EditsSeen.build))
    EditsSeen.calls = []
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--no-ray", "--no-progress", "--tracking-uri", uri]
    for item in (f"model={tiny_llama_dir}", "method=memit", "data.limit=6", "edits.batch_size=2",
                 "edits.checkpoints=[2, 4, 6]", f"stats.corpus={small_corpus}", "stats.num_tokens=2000",
                 "hparams.layers=[1, 2]", "hparams.v_num_grad_steps=2", f"cache_dir={tmp_path / 'cache'}"):
        args += ["--set", item]
    assert main(args) == 0
    client = MlflowClient(uri)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("editgrid-default").experiment_id])
              if r.data.tags.get("editgrid.role") == "trial"]
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "probe/edits_scored")]
    assert sorted(history) == [(0, 6.0), (2, 2.0), (6, 6.0)]  # all records at 0; the edits so far after
    assert EditsSeen.calls == [0, 2, 6]
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/probe_vs_edits.png" in plots and "plots/metrics_vs_edits.png" in plots
    # every name the trial logged belongs to a declared family (the probe's is the test's own)
    undeclared = [name for name in run.data.metrics if family_of(name) is None and not name.startswith("probe/")]
    assert undeclared == []


@pytest.mark.parametrize("name", ["edit/efficacy", "retention/age_1_of_4/efficacy", "abilities/piqa/acc_norm",
                                  "scr/recall_at_k/rewrite", "cost/seconds_per_edit", "vstar/target_prob"])
def test_names_built_by_the_helpers_have_their_family(name):
    assert family_of(name) is not None
