"""What the unedited model says, computed once per (model, records, batch size) and shared by every trial.

Besides the teacher-forced outputs below, ``pre_edit_answers`` keeps the unedited model's generated answers for the
autoregressive protocol (evals/autoregressive.py), keyed also by the generation settings.

Every trial of a grid on the same model and data slice starts from the same weights, so its pre-edit reference
(the argmax tokens on the locality cases, evals/teacher_forced.compute_reference) and its step-0 evaluation (every
edit/* metric before any edit) are the same numbers. They are stored in ``<cache_dir>/pre_edit/<key>.json``, keyed
by the model's fingerprint, the records' content and the evaluation batch size (batch composition can move fp32
logits in the last bits, so it is part of the key), and built under the cache's file lock: concurrent trials that
need the same entry wait for the first instead of recomputing it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from evals.answer_backends import AnswerBackend
from evals.autoregressive import GenerationSettings, answer_queries, generate_answers
from evals.records import EditRecord
from evals.teacher_forced import EvalResult, PreEditReference, compute_reference, evaluate_records
from methods.infra.cache import cached_path, content_key

FORMAT_VERSION = 1


@dataclass
class PreEditOutputs:
    reference: PreEditReference
    evaluation: EvalResult  # evaluate_records on the unedited model, over every record, with ``reference``
    from_cache: bool


def records_key(records: list[EditRecord]) -> str:
    return content_key({"records": [dataclasses.asdict(r) for r in records]})


def _cached_json(cache_dir: Path, key: str, suffix: str, compute: Callable[[], object]) -> tuple[object, bool]:
    """``compute()`` stored as JSON in ``<cache_dir>/pre_edit/<key><suffix>`` (under the cache's lock), and whether
    it was read from there rather than computed now."""
    built = False

    def build(tmp: Path) -> None:
        nonlocal built
        tmp.write_text(json.dumps(compute()))
        built = True

    path = cached_path(Path(cache_dir), "pre_edit", key, build, suffix=suffix)
    return json.loads(path.read_text()), not built


def pre_edit_outputs(model: torch.nn.Module, tokenizer, records: list[EditRecord], model_key: str, batch_size: int,
                     cache_dir: Path, progress: str | None = None) -> PreEditOutputs:
    """The unedited model's reference and step-0 evaluation of ``records``, from the cache or computed now.

    ``model_key`` must identify the weights (e.g. ``<model id>@<fingerprint>``): the caller promises the model is
    still unedited.
    """
    key = content_key({"format": FORMAT_VERSION, "model": model_key, "records": records_key(records),
                       "batch_size": batch_size})

    def compute() -> dict:
        reference = compute_reference(model, tokenizer, records, batch_size=batch_size)
        evaluation = evaluate_records(model, tokenizer, records, reference=reference, batch_size=batch_size,
                                      progress=progress)
        return {"reference": reference.to_dict(), "metrics": evaluation.metrics, "per_record": evaluation.per_record}

    saved, from_cache = _cached_json(cache_dir, key, ".json", compute)
    return PreEditOutputs(reference=PreEditReference.from_dict(saved["reference"]),
                          evaluation=EvalResult(metrics=saved["metrics"], per_record=saved["per_record"]),
                          from_cache=from_cache)


@dataclass
class PreEditAnswers:
    answers: dict[str, str]  # prompt → the unedited model's answer
    from_cache: bool
    backend_check: dict | None  # what ``check_backend`` returned when the answers were generated (None: no check)


def pre_edit_answers(model: torch.nn.Module, tokenizer, records: list[EditRecord], settings: GenerationSettings,
                     model_key: str, batch_size: int, cache_dir: Path, progress: str | None = None,
                     backend: AnswerBackend | None = None,
                     check_backend: Callable[[], dict] | None = None) -> PreEditAnswers:
    """The unedited model's generated answer to every prompt of ``records``, from the cache or generated now.

    ``backend``: generate them there instead of in process (a vLLM engine or endpoint serving the same weights);
    its name enters the cache key. ``check_backend`` runs first, only when the answers are generated (it raises to
    refuse the backend, and then nothing is stored); what it returns is stored with the answers, so a later trial
    reading them from the cache gets the check they passed instead of asking the backend again."""
    prompts = list(dict.fromkeys(q.prompt for q in answer_queries(records)))
    where = {"batch_size": batch_size} if backend is None else {"backend": backend.name}
    key = content_key({"format": FORMAT_VERSION, "layout": "answers+check", "model": model_key,
                       "records": records_key(records), "generation": settings.describe(), **where})

    def compute() -> dict:
        check = check_backend() if check_backend is not None else None
        answers = generate_answers(model, tokenizer, prompts, settings, batch_size, progress=progress, backend=backend)
        return {"answers": dict(zip(prompts, answers)), "backend_check": check}

    saved, from_cache = _cached_json(cache_dir, key, ".answers.json", compute)
    return PreEditAnswers(saved["answers"], from_cache, saved["backend_check"])
