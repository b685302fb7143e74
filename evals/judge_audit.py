"""A judge audit with known answers: grading items whose right verdict holds by construction.

Every audited record (a real CounterFact or zsRE edit: question, new answer = the gold, old answer) yields one item per
category, the prediction built from the record itself:

  gold            the gold answer itself                                              → A
  sentence        a longer sentence that states the gold answer                       → A
  wrong_entity    the gold answer of another record with the same question template   → B
  old_answer      the answer before the edit (what an edit that failed would say)     → B
  hedge           a hedge or a refusal                                                → B
  empty           nothing                                                             → B
  repeat          the question repeated                                               → B
  contradiction   states the gold answer, then takes it back for the old one          → B
  unrelated       a fluent sentence about something else (another record's question
                  completed with its own answer), what a small model often generates  → B

With a model to continue text (``build_audit(..., continuations=...)``, e.g. SmolLM2 generating as the second
protocol does), two more categories come from its real greedy output rather than from sentences written here:

  continuation       the unedited model's own continuation of the question, when it does not contain the
                     gold (an edit's new answer is counterfactual, so the unedited model does not give it);
                     real fluent text that answers nothing or answers otherwise                  → B
  gold_continuation  the gold, then the model's own continuation after it                        → A

A judge's accuracy and Cohen's κ against these verdicts, per category and overall, say whether its verdicts mean
something; the contains-match rule, for instance, is right on everything but ``contradiction``. The construction is
deterministic (seeded; greedy continuations), so two judges are audited on the same items. docs/second_protocol.md
reports the figures.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from evals.judge import CORRECT, INCORRECT, JudgeItem, Judgment
from evals.records import EditRecord

WRITTEN_CATEGORIES: dict[str, str] = {
    "gold": CORRECT, "sentence": CORRECT, "wrong_entity": INCORRECT, "old_answer": INCORRECT,
    "hedge": INCORRECT, "empty": INCORRECT, "repeat": INCORRECT, "contradiction": INCORRECT, "unrelated": INCORRECT,
}
GENERATED_CATEGORIES: dict[str, str] = {"continuation": INCORRECT, "gold_continuation": CORRECT}
CATEGORIES: dict[str, str] = {**WRITTEN_CATEGORIES, **GENERATED_CATEGORIES}
HEDGES = ("I'm not sure.", "I don't know.", "It is hard to say; it could be several things.",
          "I cannot answer that question.", "There is no single answer to that.")


@dataclass(frozen=True)
class AuditItem:
    category: str
    item: JudgeItem
    expected: str  # the right verdict, A or B
    source: str  # the record it was built from (source:case_id)


def record_label(record: EditRecord) -> str:
    """``<source>:<case_id>``: how an audit item names the record it was built from (``AuditItem.source``)."""
    return f"{record.source}:{record.case_id}"


def _template(record: EditRecord) -> str:
    """The record's question with its subject taken out: records sharing it ask for the same kind of entity."""
    return record.prompt.replace(record.subject, "{}", 1)


def _is_question(prompt: str) -> bool:
    return prompt.rstrip().endswith("?")


def audit_items(records: Sequence[EditRecord], seed: int = 0,
                others: Sequence[EditRecord] | None = None) -> list[AuditItem]:
    """Nine graded items per record (eight when no record of ``others`` shares its question template).

    Wrong entities and unrelated sentences come from ``others`` (default: ``records``). The gold is the record's
    new answer (the generation protocol asks whether the edited model says it); records need an old answer
    (``target_true``). Question-style prompts (zsRE) get answer sentences, cloze prompts (CounterFact) the completed
    sentence."""
    rng = random.Random(seed)
    by_template: dict[str, list[EditRecord]] = {}
    pool = list(records if others is None else others)
    for record in pool:
        by_template.setdefault(_template(record), []).append(record)
    items: list[AuditItem] = []
    for record in records:
        if not record.target_true:
            raise ValueError(f"record {record_label(record)} has no old answer (target_true) to audit with")
        question, gold, old = record.prompt, record.target_new, record.target_true
        stated = f"The answer is {gold}." if _is_question(question) else f"{question} {gold}."
        predictions = {
            "gold": gold,
            "sentence": stated,
            "old_answer": old,
            "hedge": rng.choice(HEDGES),
            "empty": "",
            "repeat": question,
            "contradiction": f"{stated} Wait, that is wrong: the correct answer is {old}, not {gold}.",
        }
        wrong = sorted({answer for other in by_template.get(_template(record), []) if other is not record
                         for answer in (other.target_new, other.target_true)
                         if answer and answer.lower() not in (gold.lower(), old.lower())
                         and gold.lower() not in answer.lower()})
        if wrong:
            predictions["wrong_entity"] = rng.choice(wrong)
        unrelated = [other for other in pool if _template(other) != _template(record)
                     and gold.lower() not in f"{other.prompt} {other.target_true}".lower()]
        if unrelated:
            other = rng.choice(unrelated)
            predictions["unrelated"] = f"{other.prompt} {other.target_true}"
        for category in WRITTEN_CATEGORIES:
            if category in predictions:
                items.append(AuditItem(category, JudgeItem(question, gold, predictions[category]),
                                       CATEGORIES[category], record_label(record)))
    return items


def generated_items(records: Sequence[EditRecord], continuations: Callable[[list[str]], list[str]]) -> list[AuditItem]:
    """Up to two items per record from a model's own text: ``continuations(prompts)`` returns its greedy
    continuation of each prompt (as the second protocol generates answers). ``continuation`` (→ B) is its
    continuation of the question, kept when non-empty and without the gold; ``gold_continuation`` (→ A) is the gold
    followed by its continuation of the question completed with the gold."""
    from evals.autoregressive import contains_answer  # noqa: PLC0415 - the protocol's own gen/contains rule

    plain = continuations([r.prompt for r in records])
    after_gold = continuations([f"{r.prompt} {r.target_new}" for r in records])
    items: list[AuditItem] = []
    for record, text, rest in zip(records, plain, after_gold):
        source = record_label(record)
        text = text.strip()
        if text and not contains_answer(text, (record.target_new,)):
            items.append(AuditItem("continuation", JudgeItem(record.prompt, record.target_new, text),
                                   CATEGORIES["continuation"], source))
        rest = rest.strip()  # generated answers come without their leading space: put it back before a word
        stated = f"{record.target_new}{' ' if rest[:1].isalnum() else ''}{rest}"
        items.append(AuditItem("gold_continuation", JudgeItem(record.prompt, record.target_new, stated),
                               CATEGORIES["gold_continuation"], source))
    return items


def cohens_kappa(expected: Sequence[str | None], observed: Sequence[str | None]) -> float:
    """Cohen's κ of two labelings (an unparsable verdict, None, is a label of its own: never agreement)."""
    n = len(expected)
    if n == 0 or n != len(observed):
        raise ValueError("cohens_kappa needs two labelings of the same, non-zero length")
    agreement = sum(e == o for e, o in zip(expected, observed)) / n
    first, second = Counter(expected), Counter(observed)
    chance = sum(first[label] * second[label] for label in first) / (n * n)
    return 1.0 if chance == 1.0 else (agreement - chance) / (1.0 - chance)


@dataclass
class AuditResult:
    judge: str
    accuracy: float
    kappa: float
    unparsable: float
    by_category: dict[str, float]  # accuracy per category
    items: int
    rows: list[dict]

    def summary(self) -> str:
        cats = ", ".join(f"{c} {a:.2f}" for c, a in self.by_category.items())
        return (f"{self.judge}: accuracy {self.accuracy:.3f}, kappa {self.kappa:.3f}, unparsable "
                f"{self.unparsable:.3f} on {self.items} items ({cats})")


def run_audit(name: str, items: Sequence[AuditItem],
              grade: Callable[[list[JudgeItem]], list[Judgment]]) -> AuditResult:
    """Grade ``items`` with ``grade`` (e.g. ``Judge.grade``) and compare with the verdicts known by construction."""
    judgments = grade([a.item for a in items])
    expected = [a.expected for a in items]
    observed = [j.verdict for j in judgments]
    rows = [{"category": a.category, "source": a.source, "question": a.item.question, "gold": a.item.gold,
             "prediction": a.item.prediction, "expected": a.expected, "verdict": j.verdict, "margin": j.margin,
             "reply": j.reply} for a, j in zip(items, judgments)]
    by_category = {}
    for category in CATEGORIES:
        members = [r for r in rows if r["category"] == category]
        if members:
            by_category[category] = sum(r["verdict"] == r["expected"] for r in members) / len(members)
    return AuditResult(judge=name, accuracy=sum(e == o for e, o in zip(expected, observed)) / len(items),
                       kappa=cohens_kappa(expected, observed),
                       unparsable=sum(o is None for o in observed) / len(items), by_category=by_category,
                       items=len(items), rows=rows)


def contains_rule(items: Sequence[JudgeItem]) -> list[Judgment]:
    """The contains-match rule as a judge: A when the prediction contains the gold answer (case-insensitive)."""
    from evals.autoregressive import contains_answer  # noqa: PLC0415 - the protocol's own gen/contains rule

    return [Judgment(CORRECT if contains_answer(i.prediction, (i.gold,)) else INCORRECT, reply="contains-rule",
                     from_cache=False) for i in items]


def build_audit(counterfact: str | None, zsre: str | None, n_counterfact: int = 25, n_zsre: int = 10,
                scan: int = 2000, seed: int = 0,
                continuations: Callable[[list[str]], list[str]] | None = None,
                exclude: frozenset[str] = frozenset()) -> list[AuditItem]:
    """The audit set from real records: a seeded sample of ``n_counterfact`` CounterFact records (among the first
    ``scan``, those whose question template another record shares, so that a wrong entity of the same type
    exists) and ``n_zsre`` zsRE records, nine items each (see ``audit_items``), and with ``continuations`` (a
    model's greedy continuations of a list of prompts) up to two more each from the model's own text
    (``generated_items``). ``exclude``: records (``source:case_id``) not to audit with, e.g. another audit's, to
    develop a judge's prompt on records disjoint from those it is reported on."""
    from evals.datasets import load_records  # noqa: PLC0415

    rng = random.Random(seed)
    items: list[AuditItem] = []
    for path, count in ((counterfact, n_counterfact), (zsre, n_zsre)):
        if not path or count <= 0:
            continue
        records = [r for r in load_records(path, limit=scan) if r.target_true]
        shared = Counter(_template(r) for r in records)
        pool = [r for r in records if shared[_template(r)] > 1] or records
        pool = [r for r in pool if record_label(r) not in exclude]
        picked = rng.sample(pool, min(count, len(pool)))
        items.extend(audit_items(picked, seed=seed, others=records))
        if continuations is not None:
            items.extend(generated_items(picked, continuations))
    return items


RECORDED_AUDITS_PATH = Path(__file__).resolve().parent / "data" / "judge_audits.json"


def recorded_audit(judge_name: str, path: Path = RECORDED_AUDITS_PATH) -> dict | None:
    """The audit recorded for exactly this judge (model weights, verdict mode, prompt and few-shot versions: its
    name), written by ``benchmarks/judge_audit.py --record``; None when this judge was never audited."""
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(judge_name)


def record_audits(results: Sequence[AuditResult], names: dict[str, str], meta: dict,
                  path: Path = RECORDED_AUDITS_PATH) -> None:
    """Add ``results`` (keyed by the judges' full names, ``names[result.judge]``) to the recorded audits."""
    recorded = json.loads(path.read_text()) if path.exists() else {}
    for result in results:
        if result.judge in names:
            recorded[names[result.judge]] = {"audit": result.judge, "kappa": round(result.kappa, 4),
                                             "accuracy": round(result.accuracy, 4), "items": result.items,
                                             "by_category": {k: round(v, 4) for k, v in result.by_category.items()},
                                             **meta}
    path.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
