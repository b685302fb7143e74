"""SCR, selective contextual reasoning (He et al. 2025; the Revisiting paper's retrieval
baseline; docs/methods.md, "SCR").

For each query: retrieve the top-k facts from the memory; show them to the same LLM with the question and let it
pick the one fact that answers it or reject them all (``retrieval/prompts.py``); an accepted fact becomes the
context of a "Fact / Question / Answer" prompt, a rejection leaves the original prompt unchanged (the bare
question). ``decide`` returns that prompt per query, so any scoring protocol — teacher-forced now, generation and
the judge later — runs on exactly what SCR would show the model.

The LLM enters as ``select``: a function from prompts to replies (greedy, raw prompt, first line), so this module
does not depend on how or where the model runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal

from retrieval.memory import FactMemory, Hit
from retrieval.prompts import answer_prompt, parse_selection, selection_prompt

SelectFn = Callable[[list[str]], list[str]]
IN_SCOPE = ("rewrite", "generalization", "portability")
LOCALITY = "locality"


@dataclass(frozen=True)
class ScrDecision:
    query: str
    hits: tuple[Hit, ...]
    reply: str | None  # the selection reply; None when the memory returned nothing
    status: Literal["accepted", "rejected", "unparsable", "empty"]
    chosen: Hit | None
    prompt: str  # what the model answers: the answer prompt with the chosen fact, or the query itself


@dataclass
class ScrTimings:
    queries: int = 0
    retrieval_seconds: float = 0.0  # embedding the queries + FAISS search
    selection_seconds: float = 0.0  # the LLM's selection generations

    @property
    def seconds(self) -> float:
        return self.retrieval_seconds + self.selection_seconds


@dataclass
class SelectiveContextReasoner:
    memory: FactMemory
    select: SelectFn
    top_k: int = 5
    timings: ScrTimings = field(default_factory=ScrTimings)

    def decide(self, queries: list[str], embed_fresh: bool = False) -> list[ScrDecision]:
        """One decision per query (in order); repeated queries are decided once. ``embed_fresh`` skips the
        memory's query-vector cache (for latency measurements)."""
        unique = list(dict.fromkeys(queries))
        started = time.perf_counter()
        hits = self.memory.search(unique, self.top_k, cache=not embed_fresh)
        retrieved = time.perf_counter()
        asking = [i for i, found in enumerate(hits) if found]
        replies = self.select([selection_prompt(unique[i], [h.fact for h in hits[i]]) for i in asking]) if asking else []
        self.timings.queries += len(unique)
        self.timings.retrieval_seconds += retrieved - started
        self.timings.selection_seconds += time.perf_counter() - retrieved
        reply_of = dict(zip(asking, replies))
        decided: dict[str, ScrDecision] = {}
        for i, query in enumerate(unique):
            found = tuple(hits[i])
            if not found:
                decided[query] = ScrDecision(query, found, None, "empty", None, query)
                continue
            reply = reply_of[i]
            selection = parse_selection(reply, [h.fact for h in found])
            chosen = found[selection.index] if selection.status == "accepted" else None
            prompt = answer_prompt(query, chosen.fact) if chosen else query
            decided[query] = ScrDecision(query, found, reply, selection.status, chosen, prompt)
        return [decided[q] for q in queries]


@dataclass(frozen=True)
class ScrQuery:
    """An evaluation prompt and what SCR should do with it: in-scope categories (rewrite, generalization,
    portability) should retrieve and accept ``fact_id``; ``locality`` prompts should be rejected."""

    text: str
    category: str
    fact_id: str | None = None


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def scr_metrics(queries: list[ScrQuery], decisions: dict[str, ScrDecision], top_k: int) -> dict[str, float]:
    """The rates of one evaluation, unprefixed (the grid logs them as ``scr/<name>``: grid/scr_stage.py)."""
    metrics: dict[str, float] = {}
    in_scope = [q for q in queries if q.category in IN_SCOPE]
    for category in IN_SCOPE:
        flags = [any(h.fact_id == q.fact_id for h in decisions[q.text].hits) for q in in_scope if q.category == category]
        value = _share(flags)
        if value is not None:
            metrics[f"recall_at_k/{category}"] = value
    accepted = [decisions[q.text].status == "accepted" for q in in_scope]
    correct = [decisions[q.text].chosen is not None and decisions[q.text].chosen.fact_id == q.fact_id for q in in_scope]
    local = [q for q in queries if q.category == LOCALITY]
    rejected = [decisions[q.text].status != "accepted" for q in local]
    everything = list(dict.fromkeys(q.text for q in queries))
    unparsable = [decisions[t].status == "unparsable" for t in everything]
    for name, value in (("acceptance_rate", _share(accepted)), ("correct_selection_rate", _share(correct)),
                        ("locality_rejection_rate", _share(rejected)), ("unparsable_rate", _share(unparsable))):
        if value is not None:
            metrics[name] = value
    metrics["top_k"] = float(top_k)
    return metrics
