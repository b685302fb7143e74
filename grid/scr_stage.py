"""The SCR retrieval stage inside a trial (presets ``scr`` and ``<preset>+scr``; docs/scr.md).

Editing adds one sentence per edit to the fact memory (retrieval/memory.py). At each checkpoint ``evaluate``
decides, for every prompt the teacher-forced evaluation will score, what the model is shown (retrieval/scr.py),
and returns that mapping as the ``prompt_builder`` of ``evaluate_records`` together with the ``scr/*`` metrics:

  scr/memory_size, scr/index_bytes          facts in the memory and the FAISS index's size
  scr/recall_at_k/{rewrite,generalization,portability}
                                            share of in-scope prompts whose own edit is among the top-k retrieved
  scr/acceptance_rate                       share of in-scope prompts for which the LLM accepted some fact
  scr/correct_selection_rate                ... accepted exactly the prompt's own edit
  scr/locality_rejection_rate               share of locality/neighbourhood prompts for which it accepted none
  scr/unparsable_rate                       selection replies that were neither a fact nor a rejection
  scr/latency/*_ms_per_query                answering ``eval.scr_latency_queries`` rewrite prompts by greedy
                                            generation (16 tokens), bare vs through SCR (retrieval + selection +
                                            answer), and their ratio: the latency SCR adds to the model alone
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from evals.generation import generate_greedy
from evals.metric_names import SCR_INDEX_BYTES, SCR_MEMORY_SIZE, scr_metric
from evals.records import EditRecord
from methods.stages import MethodSpec
from retrieval.embedder import Embedder
from retrieval.memory import FactMemory
from retrieval.prompts import fact_sentence
from retrieval.scr import LOCALITY, ScrDecision, ScrQuery, SelectiveContextReasoner, scr_metrics

SELECTION_MAX_TOKENS = 50  # SCR's selection: greedy, at most 50 tokens, first line
# The latency measurement generates answers of exactly this many tokens, bare and through SCR, so that the
# difference is what SCR adds (retrieval, selection, the longer prompt) and not how long the answers happen to be.
LATENCY_ANSWER_TOKENS = 16


def scr_queries(records: list[EditRecord]) -> list[ScrQuery]:
    """Every prompt the teacher-forced evaluation scores for ``records``, with what SCR should do with it."""
    queries = []
    for record in records:
        queries.append(ScrQuery(record.prompt, "rewrite", record.case_id))
        queries += [ScrQuery(p, "generalization", record.case_id) for p in record.paraphrase_prompts]
        queries += [ScrQuery(c.prompt, "portability", record.case_id)
                    for cases in record.portability.values() for c in cases]
        queries += [ScrQuery(c.prompt, LOCALITY) for c in record.neighborhood]
        queries += [ScrQuery(c.prompt, LOCALITY) for cases in record.locality.values() for c in cases]
    return queries


@dataclass
class ScrEvaluation:
    prompt_builder: Callable[[list[str]], list[str]]
    metrics: dict[str, float]
    rows: list[dict]  # one per evaluated prompt: what was retrieved, replied, chosen and shown


def _decision_row(query: ScrQuery, decision: ScrDecision) -> dict:
    return {"query": query.text, "category": query.category, "case_id": query.fact_id,
            "status": decision.status, "reply": decision.reply,
            "chosen_id": decision.chosen.fact_id if decision.chosen else None,
            "retrieved_ids": [h.fact_id for h in decision.hits],
            "retrieved_scores": [round(h.score, 4) for h in decision.hits], "shown_prompt": decision.prompt}


class ScrStage:
    def __init__(self, spec: MethodSpec, model, tokenizer, batch_size: int, embedder_device: str = "cpu",
                 progress: bool = False):
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress
        # the method's values, else the stage registry's defaults (methods/stages.py RETRIEVAL_PARAMS)
        self.top_k = int(spec.hparam("scr_top_k"))
        self.embedder = Embedder(spec.hparam("scr_embedder"), device=embedder_device)
        self._use(FactMemory(self.embedder, spec.hparam("scr_index")))

    def _use(self, memory: FactMemory) -> None:
        self.memory = memory
        self.reasoner = SelectiveContextReasoner(self.memory, self._select, self.top_k)

    def restore(self, folder: str | Path) -> None:
        """Continue with the memory saved in ``folder`` (a trial checkpoint)."""
        self._use(FactMemory.load(folder, self.embedder))

    def _generate(self, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...],
                  progress: str | None = None) -> list[str]:
        return [g.text for g in generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                stop=stop, batch_size=self.batch_size, progress=progress)]

    def _select(self, prompts: list[str]) -> list[str]:
        label = f"SCR selection for {len(prompts)} prompts" if self.progress else None
        return self._generate(prompts, SELECTION_MAX_TOKENS, ("\n",), progress=label)

    def add(self, records: list[EditRecord]) -> float:
        """Put the edits' facts into the memory; returns the seconds it took (SCR's whole "edit")."""
        started = time.perf_counter()
        self.memory.add([fact_sentence(r.prompt, r.target_new) for r in records], [r.case_id for r in records])
        return time.perf_counter() - started

    def evaluate(self, records: list[EditRecord]) -> ScrEvaluation:
        queries = scr_queries(records)
        decided: dict[str, ScrDecision] = {d.query: d for d in self.reasoner.decide([q.text for q in queries])}

        def prompt_builder(prompts: list[str]) -> list[str]:
            unseen = [p for p in prompts if p not in decided]
            decided.update({d.query: d for d in self.reasoner.decide(unseen)} if unseen else {})
            return [decided[p].prompt for p in prompts]

        metrics = {scr_metric(name): value for name, value in scr_metrics(queries, decided, self.top_k).items()}
        metrics[SCR_MEMORY_SIZE] = float(len(self.memory))
        metrics[SCR_INDEX_BYTES] = float(self.memory.index_bytes)
        rows = [_decision_row(q, decided[q.text]) for q in queries]
        return ScrEvaluation(prompt_builder, metrics, rows)

    def measure_latency(self, records: list[EditRecord], num_queries: int) -> dict[str, float]:
        """Greedy answers (``LATENCY_ANSWER_TOKENS`` each) to the first ``num_queries`` rewrite prompts, bare and
        through SCR, in milliseconds per query."""
        queries = [r.prompt for r in records[:num_queries]]
        if not queries or not len(self.memory):
            return {}
        started = time.perf_counter()
        self._generate(queries, LATENCY_ANSWER_TOKENS, ())
        bare = time.perf_counter() - started
        timings = self.reasoner.timings
        retrieval_before, selection_before = timings.retrieval_seconds, timings.selection_seconds
        started = time.perf_counter()
        decisions = self.reasoner.decide(queries, embed_fresh=True)
        decided = time.perf_counter()
        retrieval = timings.retrieval_seconds - retrieval_before
        selection = timings.selection_seconds - selection_before
        self._generate([d.prompt for d in decisions], LATENCY_ANSWER_TOKENS, ())
        through_scr = time.perf_counter() - started
        n = len(queries)
        latency = {"base_ms_per_query": 1000 * bare / n, "scr_ms_per_query": 1000 * through_scr / n,
                   "overhead_ms_per_query": 1000 * (through_scr - bare) / n,
                   "decide_ms_per_query": 1000 * (decided - started) / n,
                   "retrieval_ms_per_query": 1000 * retrieval / n, "selection_ms_per_query": 1000 * selection / n,
                   "ratio": through_scr / bare if bare > 0 else float("nan")}
        return {scr_metric(f"latency/{name}"): value for name, value in latency.items()}

    def save(self, folder: str | Path) -> Path:
        return self.memory.save(folder)
