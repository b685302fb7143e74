"""General abilities (docs/methods.md): zero-shot SST-2, MRPC, CoLA, RTE, NLI and MMLU on the model as it is.

Tasks read JSONL files laid out like the shared data's ``general/<task>.jsonl`` (the GLUE/MMLU field names). Each item
becomes a prompt that ends where the label word should follow. Two readings of the model's choice:

* **teacher-forced** (``general/<task>``): the label whose word (with its leading space) has the highest total
  log-probability after the prompt — one forward per (item, label), batched (evals/teacher_forced.py);
* **generated** (``general/<task>/generated``): a greedy generation of a few tokens, whose first word is matched
  against the label words; a reply that names none is *unparsable* (``general/<task>/unparsable``) and counts as
  wrong.

The score is accuracy, Matthews correlation for CoLA (as GLUE reports it), and MRPC also logs F1. The first
``n_items`` items of each file are used, so every checkpoint sees the same items.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from evals.generation import generate_greedy
from evals.jsonl import jsonl_objects
from evals.metric_names import general_metric
from evals.teacher_forced import score_continuations

GENERATED_TOKENS = 5


class GeneralTaskError(ValueError):
    """A task file that is missing or does not have the task's fields (named with path, line and field)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]  # label words; the index is the label id
    prompt: Callable[[dict], str]
    gold: Callable[[dict], int]
    fields: tuple[str, ...]
    metric: str = "accuracy"  # or "mcc"


def _yes_no_entailment(item: dict) -> int:
    label = item["label"]
    if isinstance(label, str):  # "entailment" / "not_entailment"
        return 0 if label.strip().lower() == "entailment" else 1
    return int(label)  # GLUE ids: 0 = entailment, 1 = not_entailment


def _entailment_prompt(item: dict) -> str:
    return (f"{item['sentence1'].strip()}\nQuestion: does this imply that \"{item['sentence2'].strip()}\"? "
            f"Answer yes or no.\nAnswer:")


def _mmlu_prompt(item: dict) -> str:
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCD", item["choices"]))
    return f"Question: {item['question'].strip()}\n{choices}\nAnswer with the letter of the correct choice.\nAnswer:"


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", ("negative", "positive"),
                     lambda x: f"Review: {x['sentence'].strip()}\nIs the sentiment of this review positive or "
                               f"negative?\nAnswer:", lambda x: int(x["label"]), ("sentence", "label")),
    "mrpc": TaskSpec("mrpc", ("no", "yes"),
                     lambda x: f"Sentence 1: {x['sentence1'].strip()}\nSentence 2: {x['sentence2'].strip()}\n"
                               f"Do both sentences mean the same thing? Answer yes or no.\nAnswer:",
                     lambda x: int(x["label"]), ("sentence1", "sentence2", "label")),
    "cola": TaskSpec("cola", ("no", "yes"),
                     lambda x: f"Sentence: {x['sentence'].strip()}\nIs this sentence grammatically acceptable? "
                               f"Answer yes or no.\nAnswer:", lambda x: int(x["label"]), ("sentence", "label"),
                     metric="mcc"),
    "rte": TaskSpec("rte", ("yes", "no"), _entailment_prompt, _yes_no_entailment, ("sentence1", "sentence2", "label")),
    "nli": TaskSpec("nli", ("yes", "no"), _entailment_prompt, _yes_no_entailment, ("sentence1", "sentence2", "label")),
    "mmlu": TaskSpec("mmlu", ("A", "B", "C", "D"), _mmlu_prompt, lambda x: int(x["answer"]),
                     ("question", "choices", "answer")),
}


def load_task(folder: str | Path, task: str, n_items: int) -> list[dict]:
    """The first ``n_items`` items of ``<folder>/<task>.jsonl``, checked for the task's fields."""
    spec = TASKS[task]
    path = Path(folder) / f"{task}.jsonl"
    if not path.is_file():
        raise GeneralTaskError(f"{path}: file not found (eval.general.path must hold <task>.jsonl for every task)")
    items = []
    with open(path) as fh:
        for number, item in jsonl_objects(fh, path, n_items, GeneralTaskError):
            missing = [f for f in spec.fields if f not in item]
            if missing:
                raise GeneralTaskError(f"{path}:{number}: missing field(s) {missing} for task {task}")
            gold = spec.gold(item)
            if not 0 <= gold < len(spec.labels):
                raise GeneralTaskError(f"{path}:{number}: label {gold} is not one of 0..{len(spec.labels) - 1}")
            items.append(item)
    if not items:
        raise GeneralTaskError(f"{path}: no items")
    return items


def matthews_corrcoef(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """MCC of binary labels; 0 when a row or column of the confusion matrix is empty (as scikit-learn does)."""
    tp = sum(g == 1 and p == 1 for g, p in zip(gold, predicted))
    tn = sum(g == 0 and p == 0 for g, p in zip(gold, predicted))
    fp = sum(g == 0 and p == 1 for g, p in zip(gold, predicted))
    fn = sum(g == 1 and p == 0 for g, p in zip(gold, predicted))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def f1_positive(gold: Sequence[int], predicted: Sequence[int]) -> float:
    tp = sum(g == 1 and p == 1 for g, p in zip(gold, predicted))
    fp = sum(g == 0 and p == 1 for g, p in zip(gold, predicted))
    fn = sum(g == 1 and p == 0 for g, p in zip(gold, predicted))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def parse_label(reply: str, labels: Sequence[str]) -> int | None:
    """The label whose word is the reply's first word (case-insensitive), or None."""
    match = re.search(r"[A-Za-z]+", reply)
    if not match:
        return None
    word = match.group(0).lower()
    for index, label in enumerate(labels):
        if word == label.lower():
            return index
    return None


def _score(spec: TaskSpec, gold: list[int], predicted: list[int | None]) -> float:
    filled = [-1 if p is None else p for p in predicted]  # unparsable: wrong whatever the gold label
    if spec.metric == "mcc":
        return matthews_corrcoef(gold, filled)
    return sum(g == p for g, p in zip(gold, filled)) / len(gold)


@dataclass
class GeneralResult:
    metrics: dict[str, float]
    rows: list[dict]  # one per item: task, index, gold, teacher-forced and generated choice, reply


def evaluate_general(model, tokenizer, items_by_task: dict[str, list[dict]], batch_size: int = 16,
                     generate: bool = True, progress: bool = False) -> GeneralResult:
    metrics: dict[str, float] = {}
    rows: list[dict] = []
    for task, items in items_by_task.items():
        spec = TASKS[task]
        prompts = [spec.prompt(item) for item in items]
        gold = [spec.gold(item) for item in items]
        pairs = [(p, f" {label}") for p in prompts for label in spec.labels]
        scores = score_continuations(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs], batch_size,
                                     progress=f"general/{task}: label scores" if progress else None)
        width = len(spec.labels)
        forced = []
        for i in range(len(items)):
            totals = [sum(s.token_logprobs) for s in scores[i * width:(i + 1) * width]]
            forced.append(max(range(width), key=totals.__getitem__))
        metrics[general_metric(task)] = _score(spec, gold, forced)
        if task == "mrpc":
            metrics[general_metric("mrpc", "f1")] = f1_positive(gold, forced)
        replies = [""] * len(items)
        generated: list[int | None] = [None] * len(items)
        if generate:
            replies = [g.text for g in generate_greedy(model, tokenizer, prompts, max_new_tokens=GENERATED_TOKENS,
                                                       stop=("\n",), batch_size=batch_size)]
            generated = [parse_label(r, spec.labels) for r in replies]
            metrics[general_metric(task, "generated")] = _score(spec, gold, generated)
            metrics[general_metric(task, "unparsable")] = sum(g is None for g in generated) / len(items)
        for i, item in enumerate(items):
            rows.append({"task": task, "index": i, "gold": spec.labels[gold[i]], "forced": spec.labels[forced[i]],
                         "generated": None if generated[i] is None else spec.labels[generated[i]],
                         "reply": replies[i]})
    return GeneralResult(metrics, rows)
