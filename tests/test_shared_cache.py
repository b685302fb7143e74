"""Expensive things shared by the trials of a grid are computed once: AlphaEdit's null-space projectors
(methods/solvers/alphaedit.py) and the unedited model's reference outputs and step-0 evaluation (evals/pre_edit.py),
each keyed by content in the cache folder and built under a file lock (two processes asking at once: one builds,
the other waits and reads)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

import methods.solvers.alphaedit as alphaedit
from evals.datasets import load_records
from evals.pre_edit import pre_edit_outputs
from evals.teacher_forced import compute_reference, evaluate_records


def _second_moment(m: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(m, 4 * m, generator=g, dtype=torch.float64) * torch.logspace(0, -3, m, dtype=torch.float64)[:, None]
    return keys @ keys.T / keys.shape[1]


def test_alphaedit_projectors_are_computed_once_and_equal_the_direct_ones(tmp_path, monkeypatch):
    c = {3: _second_moment(seed=0), 5: _second_moment(seed=1)}
    weights = {layer: torch.zeros(8, 24) for layer in c}
    direct = alphaedit.AlphaEditSolver(nullspace_threshold=1e-4)
    direct.prepare([3, 5], c, weights)

    calls = []
    original = alphaedit.nullspace_projector
    monkeypatch.setattr(alphaedit, "nullspace_projector", lambda *a: calls.append(1) or original(*a))
    first = alphaedit.AlphaEditSolver(nullspace_threshold=1e-4, cache_dir=tmp_path)
    first.prepare([3, 5], c, weights)
    assert len(calls) == 2 and len(list((tmp_path / "projectors").glob("*.pt"))) == 2
    second = alphaedit.AlphaEditSolver(nullspace_threshold=1e-4, cache_dir=tmp_path)
    second.prepare([3, 5], c, weights)
    assert len(calls) == 2  # read from the cache, not recomputed
    for layer in c:
        assert torch.equal(second.projector(layer), direct.projector(layer))
        assert second.metrics() == direct.metrics()
    # Another null-space rule is another entry.
    alphaedit.AlphaEditSolver(nullspace_threshold=1e-2, cache_dir=tmp_path).prepare([3], c, weights)
    assert len(calls) == 3


def test_the_cache_folder_reaches_only_solvers_that_share_setup(tmp_path):
    from methods.stages import build_solver

    assert build_solver("alphaedit", {}, cache_dir=tmp_path).cache_dir == tmp_path
    assert build_solver("alphaedit", {}).cache_dir is None
    assert not hasattr(build_solver("memit", {}, cache_dir=tmp_path), "cache_dir")


def _slow_projector_in_child(cache_dir: str, queue) -> None:
    original = alphaedit.nullspace_projector

    def slow(*args):
        time.sleep(1.0)  # long enough for the other process to arrive while this one holds the lock
        queue.put("computed")
        return original(*args)

    alphaedit.nullspace_projector = slow
    solver = alphaedit.AlphaEditSolver(nullspace_threshold=1e-4, cache_dir=Path(cache_dir))
    solver.prepare([0], {0: _second_moment(seed=7)}, {0: torch.zeros(8, 24)})
    queue.put(float(solver.projector(0).trace()))


def test_concurrent_trials_wait_for_the_first_projector_instead_of_recomputing(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_slow_projector_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    messages = [queue.get(timeout=5) for _ in range(3)]
    assert messages.count("computed") == 1
    traces = [m for m in messages if m != "computed"]
    assert len(traces) == 2 and traces[0] == traces[1]


def test_pre_edit_outputs_are_cached_and_equal_a_direct_evaluation(tmp_path, tiny_llama, smol_tokenizer):
    records = load_records("builtin", limit=4)
    first = pre_edit_outputs(tiny_llama, smol_tokenizer, records, "tiny@0", batch_size=3, cache_dir=tmp_path)
    second = pre_edit_outputs(tiny_llama, smol_tokenizer, records, "tiny@0", batch_size=3, cache_dir=tmp_path)
    assert (first.from_cache, second.from_cache) == (False, True)
    reference = compute_reference(tiny_llama, smol_tokenizer, records, batch_size=3)
    direct = evaluate_records(tiny_llama, smol_tokenizer, records, reference=reference, batch_size=3)
    assert second.reference == reference
    assert second.evaluation.metrics == pytest.approx(direct.metrics)
    assert [r["case_id"] for r in second.evaluation.per_record] == [r["case_id"] for r in direct.per_record]
    # Other records, another model fingerprint: other entries.
    assert not pre_edit_outputs(tiny_llama, smol_tokenizer, records[:2], "tiny@0", 3, tmp_path).from_cache
    assert not pre_edit_outputs(tiny_llama, smol_tokenizer, records, "tiny@1", 3, tmp_path).from_cache
