"""The second protocol (Ren et al. §5.1; docs/second_protocol.md): answers are *generated* and graded by an LLM judge.

For every record evaluated at a checkpoint the model greedily answers its prompts — rewrite (gold: the new target),
paraphrases (gold: the new target), portability prompts (gold: their answers) and locality prompts (CounterFact
neighbourhood / zsRE ``loc`` / KnowEdit locality; gold: their ground truth) — from the raw prompt (a chat template
is optional and recorded), at most ``max_new_tokens`` tokens, cut at "." or a newline, first line kept. Reasoning
models get ``reasoning_max_new_tokens`` and the text after ``</think>`` is what is judged.

Metrics (``step`` = edits applied):
  judge/reliability, judge/generalization, judge/portability, judge/locality   share judged A (correct)
  gen/locality_unchanged    share of locality prompts answered exactly as the unedited model answered them
  gen/contains              share of all judged answers that contain the gold answer (or an alias), lower-cased;
                            gen/contains/<dimension> per dimension
  judge/agreement_with_contains   share of judged answers where "judged A" equals "contains the gold answer"
  judge/unparsable          share of judge replies that were not a verdict (counted as not correct)
The per-prompt rows (prompt as shown, generation, gold, contains, verdict, judge reply) go to an MLflow table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from evals.answer_backends import AnswerBackend, InProcessAnswers
from evals.generation import cut_at_stop
from evals.judge import Judge, JudgeItem
from evals.metric_names import gen_metric, judge_metric
from evals.records import EditRecord

RELIABILITY, GENERALIZATION, PORTABILITY, LOCALITY = "reliability", "generalization", "portability", "locality"
DIMENSIONS = (RELIABILITY, GENERALIZATION, PORTABILITY, LOCALITY)
THINK_END = "</think>"


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 50
    stop: tuple[str, ...] = (".", "\n")
    chat_template: bool = False
    reasoning: bool = False
    reasoning_max_new_tokens: int = 1024

    def describe(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "stop": list(self.stop), "chat_template": self.chat_template,
                "reasoning": self.reasoning, "reasoning_max_new_tokens": self.reasoning_max_new_tokens}


@dataclass(frozen=True)
class AnswerQuery:
    dimension: str
    case_id: str
    prompt: str
    answers: tuple[str, ...]  # the gold answer first, then aliases


def answer_queries(records: list[EditRecord]) -> list[AnswerQuery]:
    queries = []
    for r in records:
        gold = (r.target_new,)
        queries.append(AnswerQuery(RELIABILITY, r.case_id, r.prompt, gold))
        queries += [AnswerQuery(GENERALIZATION, r.case_id, p, gold) for p in r.paraphrase_prompts]
        queries += [AnswerQuery(PORTABILITY, r.case_id, c.prompt, c.answers)
                    for cases in r.portability.values() for c in cases]
        queries += [AnswerQuery(LOCALITY, r.case_id, c.prompt, c.answers) for c in r.neighborhood]
        queries += [AnswerQuery(LOCALITY, r.case_id, c.prompt, c.answers)
                    for cases in r.locality.values() for c in cases]
    return queries


def final_answer(text: str, settings: GenerationSettings) -> str:
    """What is judged: the text after ``</think>`` for reasoning models (empty if the thinking never ended)."""
    if not settings.reasoning:
        return text
    return text.split(THINK_END, 1)[1].strip() if THINK_END in text else ""


def generate_answers(model, tokenizer, prompts: list[str], settings: GenerationSettings, batch_size: int = 16,
                     progress: str | None = None, backend: AnswerBackend | None = None) -> list[str]:
    """Greedy answers to ``prompts`` under ``settings``: by ``backend`` if given (evals/answer_backends.py; it must
    serve this model's weights), else by the model as it is in memory, edited or not."""
    backend = backend or InProcessAnswers(model, tokenizer, batch_size, progress)
    shown = prompts
    if settings.chat_template:
        shown = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    if settings.reasoning:
        # The reasoning runs over several lines and sentences: generate it whole, then keep the answer's first line.
        raw = backend.continuations(shown, settings.reasoning_max_new_tokens, ())
        return [cut_at_stop(final_answer(text, settings), settings.stop) for text in raw]
    return [cut_at_stop(text, settings.stop)
            for text in backend.continuations(shown, settings.max_new_tokens, settings.stop)]


@dataclass
class BackendAgreement:
    share: float  # probe prompts answered exactly as the in-process model answers them
    rows: list[dict]  # prompt, in-process answer, backend answer, same


def agreement_with_in_process(backend: AnswerBackend, model, tokenizer, prompts: list[str],
                              settings: GenerationSettings, batch_size: int = 16) -> BackendAgreement:
    """Do ``backend``'s answers equal the in-process (unedited) model's on ``prompts``? A backend serving other
    weights (another model, a stale copy) disagrees on nearly every prompt; the same weights run by other kernels
    may flip a rare near-tie of greedy decoding."""
    if not prompts:
        raise ValueError("agreement_with_in_process needs at least one probe prompt")
    here = generate_answers(model, tokenizer, prompts, settings, batch_size)
    there = generate_answers(model, tokenizer, prompts, settings, batch_size, backend=backend)
    rows = [{"prompt": p, "in_process": a, "backend": b, "same": a == b} for p, a, b in zip(prompts, here, there)]
    return BackendAgreement(sum(r["same"] for r in rows) / len(rows), rows)


def contains_answer(generation: str, answers: tuple[str, ...]) -> bool:
    text = generation.lower()
    return any(a.strip() and a.strip().lower() in text for a in answers)


@dataclass
class GenerationEvaluation:
    metrics: dict[str, float]
    rows: list[dict]
    generations: dict[str, str]  # prompt -> answer, for the unedited model's reference


def evaluate_generation(model, tokenizer, records: list[EditRecord], judge: Judge, settings: GenerationSettings,
                        pre_edit_answers: dict[str, str] | None = None, batch_size: int = 16,
                        prompt_builder: Callable[[list[str]], list[str]] | None = None,
                        answers: dict[str, str] | None = None, progress: bool = False) -> GenerationEvaluation:
    """Generate, judge and score the records' prompts.

    ``pre_edit_answers``: the unedited model's answers (prompt → text), for ``gen/locality_unchanged``.
    ``answers``: answers already generated for these prompts (the unedited model's, at step 0), used instead of
    generating them again.
    """
    queries = answer_queries(records)
    distinct = list(dict.fromkeys(q.prompt for q in queries))
    shown = prompt_builder(distinct) if prompt_builder is not None else distinct
    if answers is not None:
        by_prompt = {p: answers[p] for p in distinct}
    else:
        generated = generate_answers(model, tokenizer, shown, settings, batch_size,
                                     progress=f"generating {len(distinct)} answers" if progress else None)
        by_prompt = dict(zip(distinct, generated))
    shown_by_prompt = dict(zip(distinct, shown))
    judgments = judge.grade([JudgeItem(q.prompt, q.answers[0], by_prompt[q.prompt]) for q in queries])

    rows, per_dimension = [], {d: [] for d in DIMENSIONS}
    for query, judgment in zip(queries, judgments):
        generation = by_prompt[query.prompt]
        contained = contains_answer(generation, query.answers)
        row = {"case_id": query.case_id, "dimension": query.dimension, "prompt": query.prompt,
               "shown_prompt": shown_by_prompt[query.prompt], "generation": generation, "gold": query.answers[0],
               "contains": contained, "verdict": judgment.verdict, "judge_reply": judgment.reply,
               "judge_margin": judgment.margin}
        if query.dimension == LOCALITY and pre_edit_answers is not None:
            row["pre_edit_generation"] = pre_edit_answers.get(query.prompt)
            row["unchanged"] = pre_edit_answers.get(query.prompt) == generation
        rows.append(row)
        per_dimension[query.dimension].append(row)

    metrics: dict[str, float] = {}
    for dimension, dim_rows in per_dimension.items():
        if not dim_rows:
            continue  # a dimension no record supports is omitted, not reported as 0
        metrics[judge_metric(dimension)] = sum(r["verdict"] == "A" for r in dim_rows) / len(dim_rows)
        metrics[gen_metric(f"contains/{dimension}")] = sum(r["contains"] for r in dim_rows) / len(dim_rows)
    if rows:
        metrics[gen_metric("contains")] = sum(r["contains"] for r in rows) / len(rows)
        metrics[judge_metric("agreement_with_contains")] = sum((r["verdict"] == "A") == r["contains"] for r in rows) / len(rows)
        metrics[judge_metric("unparsable")] = sum(r["verdict"] is None for r in rows) / len(rows)
        margins = [abs(r["judge_margin"]) for r in rows if r["judge_margin"] is not None]
        if margins:  # logit judges: how sure the verdicts were (|log P(A) − log P(B)|, median over the prompts)
            metrics[judge_metric("margin_median")] = float(sorted(margins)[len(margins) // 2])
    locality = [r for r in per_dimension[LOCALITY] if "unchanged" in r]
    if locality:
        metrics[gen_metric("locality_unchanged")] = sum(r["unchanged"] for r in locality) / len(locality)
    return GenerationEvaluation(metrics, rows, by_prompt)
