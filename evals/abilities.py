"""General abilities scored by likelihood, the way lm-evaluation-harness scores them (issue 19, deliverable 3).

The tasks read a folder laid out like the shared data's ``abilities/`` (see its README.md; the folder is given by the
configuration, ``eval.abilities.path``): one JSONL file per multiple-choice task, ``{"id", "context", "choices",
"answer"}`` with ``answer`` a 0-based index; ``lambada.jsonl`` with ``{"id", "text"}``; and ``wikitext2_test.txt``,
raw WikiText-2 test text. Every task uses the first ``n_items`` items in file order, so every checkpoint of every
trial sees the same items.

**Multiple choice** (``abilities/<task>/acc`` and ``abilities/<task>/acc_norm``). For each item, the
log-likelihood of every choice as a continuation of the task's query (summed over the continuation's tokens,
teacher-forced, evals/teacher_forced.score_continuations: the query's forward pass is shared by its choices and
rows are batched). ``acc``: the choice with the highest summed log-likelihood is the gold one. ``acc_norm``: the
same after dividing each log-likelihood by the length *in characters* of the choice text (without the separating
space), which is what lm-eval's ``acc_norm`` does (``len(choice)`` of ``doc_to_choice``). Queries and
continuations follow lm-eval's task YAMLs, so the numbers are comparable with lm-eval's 0-shot figures:

* ``arc_easy``, ``arc_challenge``: query ``"Question: {context}\\nAnswer:"``, continuation ``" {choice}"``
  (lm-eval ``arc_easy``/``arc_challenge``: ``doc_to_text: "Question: {{question}}\\nAnswer:"``, choices the option
  texts, default target delimiter " ").
* ``piqa``: query ``"Question: {goal}\\nAnswer:"``, continuation ``" {solution}"`` (lm-eval ``piqa``; the data's
  ``context`` is PIQA's ``goal``, verbatim with its stray spaces).
* ``hellaswag``: query = ``context`` as stored (already lm-eval's ``preprocess(activity_label + ": " + ctx)``, see
  the data README: the one difference is that ``ctx_b`` is not capitalised), continuation ``" {ending}"``.
* ``openbookqa``: query = the question stem alone, continuation ``" {choice}"`` (lm-eval ``openbookqa``:
  ``doc_to_text: question_stem``; no fact from the open book).
* ``winogrande`` (acc only): lm-eval's *partial* scoring. The query is the sentence up to the blank with the option
  filled in, one query per option; the continuation is ``" " + the rest of the sentence after the blank, stripped``,
  the same for both options, so only the option's effect on the rest of the sentence is compared. acc_norm would
  divide equal continuations by one length and is not reported (lm-eval reports only ``acc``).
* ``boolq`` (optional; acc only, as lm-eval): query ``"{context}\\nAnswer:"`` where the stored context is
  ``"Passage: ...\\nQuestion: ...?"`` (lm-eval's ``"{{passage}}\\nQuestion: {{question}}?\\nAnswer:"``, plus the
  "Passage: " label the data carries), choices ``" no"`` / ``" yes"``. Its majority class is 62.5 %: a weak signal
  on a 135M model.

**LAMBADA** (OpenAI version; ``abilities/lambada/acc``, ``abilities/lambada/perplexity``): the target is ``" " +``
the last space-separated word of the passage, the query everything before that space (lm-eval ``lambada_openai``).
An item is correct when the greedy argmax equals the target token at every target position (lm-eval's
``is_greedy``); the perplexity is ``exp(-mean over items of the target's summed log-likelihood)``, lm-eval's
``perplexity`` aggregation.

**WikiText-2** (``abilities/wikitext2/token_perplexity``, ``.../word_perplexity``, ``.../bits_per_byte``): the first
``wikitext_chars`` characters of the text, cut back to a whole line, scored as one document the way lm-eval's
``loglikelihood_rolling`` does: the tokens (no special tokens) are preceded by one prefix token (the tokenizer's
BOS token, else its EOS token, as lm-eval's HF model does), split into consecutive chunks of ``max_length``
predicted tokens, and each chunk is scored once given the ``max_length`` tokens before its end (the first chunk
from the prefix token; later ones with one token of overlap, the last, shorter one with more context). Every token
is scored exactly once. ``token_perplexity = exp(total NLL / tokens)``; ``word_perplexity = exp(total NLL /
whitespace-separated words)`` and ``bits_per_byte = total NLL / (UTF-8 bytes · ln 2)`` as lm-eval defines them.
The text is scored raw (lm-eval's ``wikitext`` task first applies its detokeniser and scores per article), so the
token perplexity is that of the raw ``wiki.test.raw`` layout, comparable across checkpoints, not with lm-eval's
``wikitext`` figures. ``max_length`` below the model's context raises perplexity (less context per token) and keeps a
checkpoint cheap.

In a trial (grid/trial.py) the abilities are scored on the model's weights as they are at the checkpoint (with
PRUNE applied once, the restrained ones); SCR's fact memory is not put in front of these queries, so an SCR trial
scores the unedited weights at every step.

**The unedited model** gives the same numbers in every trial on the same weights, task files and settings: they are
computed once and stored in ``<cache_dir>/abilities/<key>.json`` (``key`` = the model key, the task files' sha256,
and every setting that changes a number, batch size included since batch composition moves fp32 logits in the last
bits), built under the cache's file lock and renamed into place when complete (methods/infra/cache.py), as
evals/pre_edit.py does for the edit metrics. ``AbilitiesEvaluator.evaluate(0)`` reads it; later steps run the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from evals.batching import left_padded, model_device, positions_from_mask
from evals.jsonl import jsonl_objects
from evals.teacher_forced import score_continuations
from evals.metric_names import COST_ABILITIES_EVAL_SECONDS as COST_SECONDS, abilities_metric
from methods.infra.cache import cached_path, content_key

FORMAT_VERSION = 1
PREFIX = "abilities"  # the cache folder
ACC, ACC_NORM, PERPLEXITY = "acc", "acc_norm", "perplexity"
TOKEN_PERPLEXITY, WORD_PERPLEXITY, BITS_PER_BYTE = "token_perplexity", "word_perplexity", "bits_per_byte"
TABLE_DIR = "tables/abilities"
ROLLING_TOKENS_PER_BATCH = 2048  # WikiText windows per forward: about this many tokens (bounds the logits' memory)


def metric_name(task: str, metric: str) -> str:
    """The MLflow name of one ability metric: ``abilities/<task>/<metric>``."""
    return abilities_metric(task, metric)


class AbilityTaskError(ValueError):
    """A task file that is missing or malformed (named with path, line and field)."""


# ----------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------

def _question_answer(context: str) -> str:
    return f"Question: {context}\nAnswer:"


def _as_is(context: str) -> str:
    return context


def _boolq(context: str) -> str:
    return f"{context}\nAnswer:"


@dataclass(frozen=True)
class ChoiceTask:
    """A multiple-choice task: how an item's context becomes the query that each choice continues."""

    name: str
    query: Callable[[str], str]
    partial: bool = False  # WinoGrande: each option fills the blank; the rest of the sentence is scored
    length_normalised: bool = True  # report acc_norm


CHOICE_TASKS: dict[str, ChoiceTask] = {
    "arc_easy": ChoiceTask("arc_easy", _question_answer),
    "arc_challenge": ChoiceTask("arc_challenge", _question_answer),
    "piqa": ChoiceTask("piqa", _question_answer),
    "hellaswag": ChoiceTask("hellaswag", _as_is),
    "openbookqa": ChoiceTask("openbookqa", _as_is),
    "winogrande": ChoiceTask("winogrande", _as_is, partial=True, length_normalised=False),
    "boolq": ChoiceTask("boolq", _boolq, length_normalised=False),  # lm-eval reports acc only
}
LAMBADA, WIKITEXT = "lambada", "wikitext2"
TASK_NAMES = (*CHOICE_TASKS, LAMBADA, WIKITEXT)
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "openbookqa", "lambada", "wikitext2")


def task_file(task: str) -> str:
    """The file name of ``task`` inside the abilities folder."""
    if task not in TASK_NAMES:
        raise AbilityTaskError(f"unknown ability task {task!r} (known: {', '.join(TASK_NAMES)})")
    return "wikitext2_test.txt" if task == WIKITEXT else f"{task}.jsonl"


def task_metrics(task: str) -> tuple[str, ...]:
    """The metric names (``abilities/<task>/<metric>``) that evaluating ``task`` reports."""
    if task == LAMBADA:
        kinds: tuple[str, ...] = (ACC, PERPLEXITY)
    elif task == WIKITEXT:
        kinds = (TOKEN_PERPLEXITY, WORD_PERPLEXITY, BITS_PER_BYTE)
    else:
        kinds = (ACC, ACC_NORM) if CHOICE_TASKS[task].length_normalised else (ACC,)
    return tuple(metric_name(task, kind) for kind in kinds)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AbilityData:
    """What is scored: the first ``n_items`` items per task, the WikiText excerpt, and each file's sha256."""

    items: dict[str, list[dict]]  # choice tasks and lambada: task -> items in file order
    wikitext: str | None  # the excerpt scored (None when wikitext2 is not a task)
    file_hashes: dict[str, str]  # task -> sha256 of its whole file

    @property
    def tasks(self) -> tuple[str, ...]:
        return (*self.items, *((WIKITEXT,) if self.wikitext is not None else ()))


def _file_bytes(folder: Path, task: str) -> tuple[Path, bytes]:
    path = Path(folder) / task_file(task)
    if not path.is_file():
        raise AbilityTaskError(f"{path}: file not found (eval.abilities.path must hold {task_file(task)} for task "
                               f"{task})")
    return path, path.read_bytes()


def _field_problem(path: Path, number: int, name: str, problem: str) -> AbilityTaskError:
    return AbilityTaskError(f"{path}:{number}: field {name!r} {problem}")


def _check_choice_item(task: str, item: dict, path: Path, number: int) -> None:
    for name in ("id", "context", "choices", "answer"):
        if name not in item:
            raise _field_problem(path, number, name, f"is missing (a {task} item has id, context, choices, answer)")
    if not isinstance(item["context"], str) or not item["context"].strip():
        raise _field_problem(path, number, "context", f"must be a non-empty string, got {item['context']!r}")
    choices = item["choices"]
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise _field_problem(path, number, "choices", f"must be a list of at least 2 non-empty strings, got "
                                                      f"{choices!r}")
    answer = item["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise _field_problem(path, number, "answer", f"must be an index into choices (0..{len(choices) - 1}), got "
                                                     f"{answer!r}")
    if CHOICE_TASKS[task].partial and "_" not in item["context"]:
        raise _field_problem(path, number, "context", "has no blank '_' for the options to fill")


def _check_lambada_item(item: dict, path: Path, number: int) -> None:
    for name in ("id", "text"):
        if name not in item:
            raise _field_problem(path, number, name, "is missing (a lambada item has id, text)")
    text = item["text"]
    if not isinstance(text, str) or " " not in text or not text.rsplit(" ", 1)[0] or not text.rsplit(" ", 1)[1]:
        raise _field_problem(path, number, "text", "must be a passage whose last space-separated word is the target")


def _load_jsonl(task: str, path: Path, raw: bytes, n_items: int) -> list[dict]:
    items = []
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise AbilityTaskError(f"{path}: not UTF-8 text ({err})") from None
    for number, item in jsonl_objects(lines, path, n_items, AbilityTaskError):
        if task == LAMBADA:
            _check_lambada_item(item, path, number)
        else:
            _check_choice_item(task, item, path, number)
        items.append(item)
    if not items:
        raise AbilityTaskError(f"{path}: no items")
    return items


def wikitext_excerpt(text: str, max_chars: int) -> str:
    """The first ``max_chars`` characters of ``text``, cut back to the end of the last whole line (all of it when
    shorter; the first ``max_chars`` characters when its first line is longer)."""
    if len(text) <= max_chars:
        return text
    end = text.rfind("\n", 0, max_chars)
    return text[:end + 1] if end >= 0 else text[:max_chars]


def load_abilities(folder: str | Path, tasks: tuple[str, ...] | list[str], n_items: int,
                   wikitext_chars: int) -> AbilityData:
    """Read and check the tasks' files in ``folder``."""
    if n_items < 1 or wikitext_chars < 1:
        raise ValueError(f"n_items and wikitext_chars must be >= 1, got {n_items} and {wikitext_chars}")
    items: dict[str, list[dict]] = {}
    wikitext = None
    hashes: dict[str, str] = {}
    for task in dict.fromkeys(tasks):
        path, raw = _file_bytes(Path(folder), task)
        hashes[task] = hashlib.sha256(raw).hexdigest()
        if task == WIKITEXT:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise AbilityTaskError(f"{path}: not UTF-8 text ({err})") from None
            wikitext = wikitext_excerpt(text, wikitext_chars)
            if not wikitext.strip():
                raise AbilityTaskError(f"{path}: no text")
        else:
            items[task] = _load_jsonl(task, path, raw, n_items)
    return AbilityData(items=items, wikitext=wikitext, file_hashes=hashes)


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------

def choice_requests(task: str, item: dict) -> list[tuple[str, str]]:
    """``(query, continuation)`` per choice of one item, in choice order."""
    spec = CHOICE_TASKS[task]
    context = item["context"]
    if spec.partial:
        blank = context.index("_")
        rest = " " + context[blank + 1:].strip()
        return [(context[:blank] + option, rest) for option in item["choices"]]
    query = spec.query(context)
    return [(query, " " + choice) for choice in item["choices"]]


def choose(loglikelihoods: list[float], choices: list[str]) -> tuple[int, int]:
    """``(argmax of the log-likelihoods, argmax of log-likelihood / len(choice in characters))``; ties go to the
    first, as numpy's argmax (lm-eval) does."""
    best = max(range(len(loglikelihoods)), key=lambda i: (loglikelihoods[i], -i))
    normalised = [ll / len(choice) for ll, choice in zip(loglikelihoods, choices)]
    best_norm = max(range(len(normalised)), key=lambda i: (normalised[i], -i))
    return best, best_norm


def _score_choice_task(model, tokenizer, task: str, items: list[dict], batch_size: int,
                       progress: bool) -> tuple[dict[str, float], list[dict]]:
    spec = CHOICE_TASKS[task]
    requests = [choice_requests(task, item) for item in items]
    flat = [pair for pairs in requests for pair in pairs]
    scores = score_continuations(model, tokenizer, [q for q, _ in flat], [c for _, c in flat], batch_size,
                                 progress=f"abilities/{task}" if progress else None)
    rows, cursor = [], 0
    correct = correct_norm = 0
    for index, (item, pairs) in enumerate(zip(items, requests)):
        lls = [sum(s.token_logprobs) for s in scores[cursor:cursor + len(pairs)]]
        cursor += len(pairs)
        pred, pred_norm = choose(lls, item["choices"])
        correct += pred == item["answer"]
        correct_norm += pred_norm == item["answer"]
        row = {"task": task, "index": index, "id": str(item["id"]), "gold": item["answer"], "pred": pred,
               "loglikelihoods": lls}
        if spec.length_normalised:
            row["pred_norm"] = pred_norm
        rows.append(row)
    metrics = {metric_name(task, ACC): correct / len(items)}
    if spec.length_normalised:
        metrics[metric_name(task, ACC_NORM)] = correct_norm / len(items)
    return metrics, rows


def lambada_request(item: dict) -> tuple[str, str]:
    context, word = item["text"].rsplit(" ", 1)
    return context, " " + word


def _score_lambada(model, tokenizer, items: list[dict], batch_size: int,
                   progress: bool) -> tuple[dict[str, float], list[dict]]:
    pairs = [lambada_request(item) for item in items]
    scores = score_continuations(model, tokenizer, [q for q, _ in pairs], [c for _, c in pairs], batch_size,
                                 progress="abilities/lambada" if progress else None)
    rows = [{"task": LAMBADA, "index": i, "id": str(item["id"]), "target": pair[1].strip(),
             "greedy": all(score.is_argmax), "loglikelihood": sum(score.token_logprobs)}
            for i, (item, pair, score) in enumerate(zip(items, pairs, scores))]
    mean_ll = sum(r["loglikelihood"] for r in rows) / len(rows)
    return {metric_name(LAMBADA, ACC): sum(r["greedy"] for r in rows) / len(rows),
            metric_name(LAMBADA, PERPLEXITY): math.exp(-mean_ll)}, rows


def prefix_token_id(tokenizer) -> int:
    """The token the first WikiText token is predicted from: BOS, else EOS (lm-eval's HF ``prefix_token_id``)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("rolling perplexity needs a tokenizer with a BOS or EOS token to predict the first token "
                         "from")
    return token


def rolling_windows(n_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """``(input_start, predicted_start, predicted_end)`` per window over ``[prefix] + tokens``.

    Token ``j`` sits at position ``j + 1`` of the prefixed sequence and is predicted at position ``j``. A window
    predicts tokens ``[p, e)`` (consecutive chunks of ``max_length``; together they cover every token once) from
    the input positions ``[a, e)`` with ``a = max(0, e - max_length)``: at most ``max_length`` inputs, the last
    ``e - p`` of which predict the chunk (lm-eval's ``get_rolling_token_windows`` with context length 1).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    windows = []
    for start in range(0, n_tokens, max_length):
        end = min(start + max_length, n_tokens)
        windows.append((max(0, end - max_length), start, end))
    return windows


@torch.inference_mode()
def rolling_token_logprobs(model, tokenizer, text: str, max_length: int) -> list[float]:
    """log P(token | the tokens before it in its window) for every token of ``text``, in order (see
    ``rolling_windows``). Windows of equal length share a forward (left-padded, explicit positions)."""
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not tokens:
        raise ValueError("no tokens to score")
    sequence = [prefix_token_id(tokenizer), *tokens]
    windows = rolling_windows(len(tokens), max_length)
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out; any id works
    per_batch = max(1, ROLLING_TOKENS_PER_BATCH // max_length)
    logprobs: list[float] = []
    for first in range(0, len(windows), per_batch):
        batch = windows[first:first + per_batch]
        input_ids, attention_mask = left_padded([sequence[a:e] for a, _, e in batch], pad_id)
        output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       position_ids=positions_from_mask(attention_mask).to(device), use_cache=False)
        for row, (_, p, e) in enumerate(batch):  # the last e - p positions of a (left-padded) row predict its chunk
            log_probs = torch.log_softmax(output.logits[row, -(e - p):, :].float(), dim=-1)  # a row at a time
            targets = torch.tensor(tokens[p:e], dtype=torch.long, device=log_probs.device)
            logprobs.extend(log_probs.gather(-1, targets[:, None])[:, 0].cpu().tolist())
    return logprobs


def rolling_perplexity(model, tokenizer, text: str, max_length: int) -> dict[str, float]:
    """Token perplexity, word perplexity and bits per byte of ``text`` (see the module docstring)."""
    logprobs = rolling_token_logprobs(model, tokenizer, text, max_length)
    nll = -sum(logprobs)
    words = len(re.split(r"\s+", text))  # lm-eval's word count
    n_bytes = len(text.encode("utf-8"))
    return {TOKEN_PERPLEXITY: math.exp(nll / len(logprobs)), WORD_PERPLEXITY: math.exp(nll / words),
            BITS_PER_BYTE: nll / n_bytes / math.log(2), "tokens": float(len(logprobs)), "nll": nll,
            "words": float(words), "bytes": float(n_bytes)}


@dataclass
class AbilityResult:
    metrics: dict[str, float]  # abilities/<task>/<metric>
    rows: list[dict]  # one per item (per text for wikitext2)


def evaluate_abilities(model, tokenizer, data: AbilityData, batch_size: int = 32, max_length: int = 1024,
                       progress: bool = False) -> AbilityResult:
    """Every task of ``data`` on ``model`` as it is now."""
    was_training = model.training
    model.eval()
    try:
        metrics: dict[str, float] = {}
        rows: list[dict] = []
        for task, items in data.items.items():
            if task == LAMBADA:
                task_metrics_, task_rows = _score_lambada(model, tokenizer, items, batch_size, progress)
            else:
                task_metrics_, task_rows = _score_choice_task(model, tokenizer, task, items, batch_size, progress)
            metrics.update(task_metrics_)
            rows.extend(task_rows)
        if data.wikitext is not None:
            result = rolling_perplexity(model, tokenizer, data.wikitext, max_length)
            for kind in (TOKEN_PERPLEXITY, WORD_PERPLEXITY, BITS_PER_BYTE):
                metrics[metric_name(WIKITEXT, kind)] = result[kind]
            rows.append({"task": WIKITEXT, "index": 0, "id": "excerpt", "characters": len(data.wikitext),
                         **{k: result[k] for k in ("tokens", "words", "bytes", "nll")}})
    finally:
        model.train(was_training)
    return AbilityResult(metrics, rows)


# ----------------------------------------------------------------------------------------------------------------
# Settings, cache and the evaluator a trial uses
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AbilitySettings:
    path: str
    tasks: tuple[str, ...] = DEFAULT_TASKS
    n_items: int = 200
    wikitext_chars: int = 20_000
    max_length: int = 1024
    batch_size: int = 32
    steps: tuple[int, ...] | None = None  # evaluation steps (None: step 0 and every checkpoint)

    @classmethod
    def from_config(cls, section: dict, batch_size: int) -> AbilitySettings:
        """From a validated ``eval.abilities`` section (grid/config.py) and ``eval.batch_size``."""
        steps = section.get("steps")
        return cls(path=str(section["path"]), tasks=tuple(section["tasks"]), n_items=int(section["n_items"]),
                   wikitext_chars=int(section["wikitext_chars"]), max_length=int(section["max_length"]),
                   batch_size=int(batch_size), steps=None if steps is None else tuple(steps))

    def describe(self) -> dict:
        """Every setting that changes a number (the cache key's part; not the path or the steps)."""
        return {"tasks": list(self.tasks), "n_items": self.n_items, "wikitext_chars": self.wikitext_chars,
                "max_length": self.max_length, "batch_size": self.batch_size}


@dataclass
class AbilityEvaluation:
    metrics: dict[str, float]  # abilities/* and COST_SECONDS
    rows: list[dict]
    from_cache: bool


@dataclass
class AbilitiesEvaluator:
    """The abilities of one model at a trial's steps; step 0 (the unedited model) through the shared cache.

    ``model_key`` must name the unedited weights (e.g. ``<model id>@<fingerprint>``): the caller promises the
    model is unedited when it asks for step 0.
    """

    settings: AbilitySettings
    model: torch.nn.Module
    tokenizer: object
    model_key: str
    cache_dir: Path
    progress: bool = False
    data: AbilityData = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.data = load_abilities(s.path, s.tasks, s.n_items, s.wikitext_chars)

    def due(self, step: int) -> bool:
        return self.settings.steps is None or step in self.settings.steps

    @property
    def cache_key(self) -> str:
        return content_key({"format": FORMAT_VERSION, "model": self.model_key, "files": self.data.file_hashes,
                            "settings": self.settings.describe()})

    def _compute(self) -> AbilityResult:
        return evaluate_abilities(self.model, self.tokenizer, self.data, batch_size=self.settings.batch_size,
                                  max_length=self.settings.max_length, progress=self.progress)

    def evaluate(self, step: int) -> AbilityEvaluation:
        """Metrics and per-item rows after ``step`` edits (0: the unedited model, from the cache when there)."""
        started = time.perf_counter()
        from_cache = False
        if step == 0:
            built = False

            def build(tmp: Path) -> None:
                nonlocal built
                result = self._compute()
                tmp.write_text(json.dumps({"metrics": result.metrics, "rows": result.rows}))
                built = True

            path = cached_path(Path(self.cache_dir), PREFIX, self.cache_key, build, suffix=".json")
            saved = json.loads(path.read_text())
            result, from_cache = AbilityResult(saved["metrics"], saved["rows"]), not built
        else:
            result = self._compute()
        metrics = {**result.metrics, COST_SECONDS: time.perf_counter() - started}
        return AbilityEvaluation(metrics, result.rows, from_cache)
