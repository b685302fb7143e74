"""Every prompt SCR shows the LLM, and the parser of its selection replies (docs/scr.md). One place to read.

Three texts:

* ``fact_sentence`` — the memory's declarative sentence for one edit. A completion prompt ("The mother tongue of
  Danielle Darrieux is") becomes "prompt answer."; a question ("What is the mother tongue of X?") cannot be turned
  into a statement without knowing its relation, so it gets the statement template ``QUESTION_FACT``.
* ``selection_prompt`` — the k retrieved facts, numbered, and the question; the model is asked for the number of
  the one fact that answers it, or 0 when none does. Two worked examples (one answered, one rejected) precede the
  real question because a small model given only the instruction tends to copy the first fact every time.
* ``answer_prompt`` — the accepted fact in front of the query: "Fact / Question / Answer" for a question, and
  "Fact: …" followed by the prompt itself for a completion prompt ("… is"), which the model then continues.
  (Measured on SmolLM2-135M with the right fact in context, 40 CounterFact records: "Fact / Question / Answer"
  around a completion prompt gives efficacy 0.45, the fact then the prompt 0.875.) A rejected query is answered
  from the bare question, i.e. the original prompt unchanged.

``parse_selection`` reads a reply as: a number 1..k (also "Fact 2", "2.", "(2)"), 0 or a refusal ("none", "no
relevant fact") -> rejected, the text of one of the facts -> that fact, anything else -> unparsable (treated as a
rejection by SCR and counted separately, never as an acceptance).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

PROMPT_VERSION = "scr-v1"  # bump when any text below changes: cached decisions are keyed by it

QUESTION_FACT = 'The answer to "{question}" is {answer}.'

SELECTION_INSTRUCTION = ("Each question comes with numbered facts. Reply with the number of the fact that answers "
                         "the question, or 0 if no fact is about the question's subject.")
SELECTION_EXAMPLES = (
    (("The capital of Norway is Oslo.", "Marie Curie was born in Warsaw.", "The Danube flows into the Black Sea."),
     "Where was Marie Curie born?", "2"),
    (("The chairman of Fiat is John Elkann.", "Mount Kenya is located in Africa.", "The Nile is in Egypt."),
     "The official language of Brazil is", "0"),
)
SELECTION_TEMPLATE = "Facts:\n{facts}\nQuestion: {question}\nFact number:"
ANSWER_TEMPLATE = "Fact: {fact}\nQuestion: {question}\nAnswer:"
COMPLETION_TEMPLATE = "Fact: {fact}\n{prompt}"

_REFUSALS = ("none", "no fact", "no relevant", "not relevant", "no answer", "nothing", "irrelevant", "n/a")
_NUMBER = re.compile(r"^\s*(?:fact\s*(?:number|no\.?|#)?\s*)?[\(\[#]?\s*(\d+)\s*[\)\]\.:,]?(?:\s|$)", re.IGNORECASE)


def is_question(prompt: str) -> bool:
    return prompt.rstrip().endswith("?")


def fact_sentence(prompt: str, answer: str) -> str:
    """The memory's sentence for the edit "``prompt`` -> ``answer``"."""
    prompt, answer = prompt.strip(), answer.strip()
    if not prompt or not answer:
        raise ValueError(f"a fact needs a prompt and an answer, got {prompt!r} -> {answer!r}")
    if is_question(prompt):
        return QUESTION_FACT.format(question=prompt, answer=answer)
    return f"{prompt} {answer}."


def _numbered(facts: list[str]) -> str:
    return "\n".join(f"{i}. {fact}" for i, fact in enumerate(facts, start=1))


def selection_prompt(question: str, facts: list[str]) -> str:
    """The prompt that asks the LLM which of ``facts`` (retrieved for ``question``) answers it."""
    if not facts:
        raise ValueError("selection needs at least one retrieved fact")
    parts = [SELECTION_INSTRUCTION, ""]
    for example_facts, example_question, reply in SELECTION_EXAMPLES:
        parts += [SELECTION_TEMPLATE.format(facts=_numbered(list(example_facts)), question=example_question)
                  + f" {reply}", ""]
    parts.append(SELECTION_TEMPLATE.format(facts=_numbered(facts), question=question.strip()))
    return "\n".join(parts)


def answer_prompt(query: str, fact: str) -> str:
    """What the model answers ``query`` from once ``fact`` was accepted (ends like the query does, so the answer
    is scored and generated the same way as without SCR)."""
    if is_question(query):
        return ANSWER_TEMPLATE.format(fact=fact, question=query.strip())
    return COMPLETION_TEMPLATE.format(fact=fact, prompt=query)


@dataclass(frozen=True)
class Selection:
    status: Literal["accepted", "rejected", "unparsable"]
    index: int | None = None  # 0-based position among the retrieved facts, when accepted


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_selection(reply: str, facts: list[str]) -> Selection:
    """What the selection ``reply`` chose among ``facts`` (see the module docstring for the accepted forms)."""
    text = reply.strip()
    if not text:
        return Selection("unparsable")
    match = _NUMBER.match(text)
    if match:
        number = int(match.group(1))
        if number == 0:
            return Selection("rejected")
        if 1 <= number <= len(facts):
            return Selection("accepted", number - 1)
        return Selection("unparsable")
    lowered = text.lower()
    if any(lowered.startswith(r) or f" {r} " in f" {lowered} " for r in _REFUSALS):
        return Selection("rejected")
    # The model may repeat the fact instead of giving its number: accept an exact (normalised) repeat, or a reply
    # that contains exactly one of the facts.
    said = _normalise(text)
    exact = [i for i, fact in enumerate(facts) if _normalise(fact) == said]
    if len(exact) == 1:
        return Selection("accepted", exact[0])
    contained = [i for i, fact in enumerate(facts) if _normalise(fact) and _normalise(fact) in said]
    if len(contained) == 1:
        return Selection("accepted", contained[0])
    return Selection("unparsable")
