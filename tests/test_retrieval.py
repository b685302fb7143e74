"""The SCR building blocks: fact sentences, selection parsing, the FAISS memory on real CounterFact records with
the embedded all-MiniLM-L6-v2, memory save/load, the reasoner's decisions and the scr/* metrics."""

from __future__ import annotations

import pytest

from retrieval.prompts import (
    ANSWER_TEMPLATE, answer_prompt, fact_sentence, is_question, parse_selection, selection_prompt,
)
from retrieval.scr import ScrQuery, SelectiveContextReasoner, scr_metrics

FACTS = ["The mother tongue of Danielle Darrieux is English.", "Paris is the capital of Italy.",
         "Apple A5 was created by Google."]


# ---------------------------------------------------------------------------------------------------------------
# Prompts and parsing (no model)
# ---------------------------------------------------------------------------------------------------------------

def test_fact_sentence_for_completion_and_question_prompts():
    assert fact_sentence("The mother tongue of Danielle Darrieux is", "English") == \
        "The mother tongue of Danielle Darrieux is English."
    question = "What university did Watts Humphrey attend?"
    assert is_question(question)
    assert fact_sentence(question, "Illinois Institute of Technology") == \
        'The answer to "What university did Watts Humphrey attend?" is Illinois Institute of Technology.'
    with pytest.raises(ValueError, match="needs a prompt and an answer"):
        fact_sentence("The capital of France is", " ")


def test_answer_prompt_keeps_the_query_as_the_end_of_the_prompt():
    completion = answer_prompt("The mother tongue of Danielle Darrieux is", FACTS[0])
    assert completion == "Fact: The mother tongue of Danielle Darrieux is English.\nThe mother tongue of Danielle Darrieux is"
    question = answer_prompt("Who created Apple A5?", FACTS[2])
    assert question == ANSWER_TEMPLATE.format(fact=FACTS[2], question="Who created Apple A5?")
    assert question.endswith("Answer:")


def test_selection_prompt_numbers_the_facts_after_the_examples():
    prompt = selection_prompt("The mother tongue of Danielle Darrieux is", FACTS)
    tail = prompt.split("\n\n")[-1]
    assert tail == ("Facts:\n1. The mother tongue of Danielle Darrieux is English.\n2. Paris is the capital of Italy."
                    "\n3. Apple A5 was created by Google.\nQuestion: The mother tongue of Danielle Darrieux is\n"
                    "Fact number:")
    assert prompt.count("Fact number:") == 3  # two worked examples, then the real question
    with pytest.raises(ValueError):
        selection_prompt("q", [])


@pytest.mark.parametrize("reply, expected", [
    ("1", ("accepted", 0)), ("3", ("accepted", 2)), ("2.", ("accepted", 1)), ("(2)", ("accepted", 1)),
    ("Fact 3", ("accepted", 2)), ("fact number 2: Paris is the capital of Italy.", ("accepted", 1)),
    ("  1\n", ("accepted", 0)),
    ("0", ("rejected", None)), ("None", ("rejected", None)), ("none of the facts", ("rejected", None)),
    ("No relevant fact.", ("rejected", None)), ("There is no fact about this.", ("rejected", None)),
    ("Paris is the capital of Italy.", ("accepted", 1)),
    ("paris is the capital of italy", ("accepted", 1)),
    ("The answer: Apple A5 was created by Google. Hope this helps", ("accepted", 2)),
    ("7", ("unparsable", None)),  # a number beyond the k facts shown is not silently clamped
    ("", ("unparsable", None)), ("The sky is blue", ("unparsable", None)),
    ("12345 is a number", ("unparsable", None)),
])
def test_parse_selection(reply, expected):
    selection = parse_selection(reply, FACTS)
    assert (selection.status, selection.index) == expected


# ---------------------------------------------------------------------------------------------------------------
# The memory with the real embedder on real records
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder():
    from retrieval.embedder import Embedder
    return Embedder()


@pytest.fixture(scope="module")
def counterfact_100(shared_data):
    from evals.datasets import load_records
    return load_records(shared_data / "counterfact" / "counterfact-edit.json", limit=100, offset=5000)


@pytest.fixture(scope="module")
def memory_100(embedder, counterfact_100):
    from retrieval.memory import FactMemory
    memory = FactMemory(embedder)
    for start in range(0, 100, 25):  # incremental adds, as edits arrive
        batch = counterfact_100[start:start + 25]
        memory.add([fact_sentence(r.prompt, r.target_new) for r in batch], [r.case_id for r in batch])
    return memory


def test_embedder_default_is_the_packaged_minilm(embedder):
    vectors = embedder.encode(["a", "b c"])
    assert vectors.shape == (2, 384) and str(vectors.dtype) == "float32"
    assert abs(float((vectors[0] ** 2).sum()) - 1.0) < 1e-4  # MiniLM's pipeline normalises: IP = cosine


def test_unknown_embedder_is_reported_by_name(tmp_path):
    from retrieval.embedder import Embedder, EmbedderError
    with pytest.raises(EmbedderError, match="no-such-embedder"):
        Embedder(str(tmp_path / "no-such-embedder"))


def test_index_finds_the_edited_fact_for_paraphrases_of_real_records(memory_100, counterfact_100):
    assert len(memory_100) == 100
    paraphrases = [(p, r.case_id) for r in counterfact_100 for p in r.paraphrase_prompts]
    hits = memory_100.search([p for p, _ in paraphrases], k=5)
    top5 = sum(case_id in [h.fact_id for h in found] for found, (_, case_id) in zip(hits, paraphrases))
    top1 = sum(found[0].fact_id == case_id for found, (_, case_id) in zip(hits, paraphrases))
    assert top5 / len(paraphrases) >= 0.9
    assert top1 / len(paraphrases) >= 0.75
    assert all(len(found) == 5 and found[0].score >= found[-1].score for found in hits)
    rewrite = memory_100.search([counterfact_100[7].prompt], k=1)[0][0]
    assert rewrite.fact_id == counterfact_100[7].case_id
    assert rewrite.fact == fact_sentence(counterfact_100[7].prompt, counterfact_100[7].target_new)


def test_search_returns_fewer_hits_than_k_when_the_memory_is_small(embedder):
    from retrieval.memory import FactMemory
    memory = FactMemory(embedder)
    assert memory.search(["anything"], k=5) == [[]]
    memory.add(FACTS[:2], ["a", "b"])
    (hits,) = memory.search(["What language does Danielle Darrieux speak?"], k=5)
    assert [h.fact_id for h in hits] == ["a", "b"]
    with pytest.raises(ValueError, match="k must be"):
        memory.search(["x"], k=0)


def test_hnsw_index_agrees_with_exact_search_on_a_small_memory(embedder, counterfact_100):
    from retrieval.memory import FactMemory
    records = counterfact_100[:40]
    exact, approximate = FactMemory(embedder, "flat"), FactMemory(embedder, "hnsw")
    for memory in (exact, approximate):
        memory.add([fact_sentence(r.prompt, r.target_new) for r in records], [r.case_id for r in records])
    queries = [r.paraphrase_prompts[0] for r in records]
    assert [h[0].fact_id for h in approximate.search(queries, 1)] == [h[0].fact_id for h in exact.search(queries, 1)]


def test_memory_save_load_round_trip(tmp_path, memory_100, counterfact_100, embedder):
    from retrieval.memory import FactMemory
    folder = memory_100.save(tmp_path / "memory")
    loaded = FactMemory.load(folder, embedder)
    assert loaded.facts == memory_100.facts and loaded.fact_ids == memory_100.fact_ids
    queries = [r.paraphrase_prompts[-1] for r in counterfact_100[:20]]
    before, after = memory_100.search(queries, 5), loaded.search(queries, 5)
    assert [[h.fact_id for h in row] for row in before] == [[h.fact_id for h in row] for row in after]
    assert after[0][0].score == pytest.approx(before[0][0].score, abs=1e-6)
    loaded.add(["The Eiffel Tower is in Rome."], ["new"])  # a loaded memory keeps growing, and saves again
    again = FactMemory.load(loaded.save(tmp_path / "again"), embedder)
    assert len(again) == 101 and again.search(["Where is the Eiffel Tower?"], 1)[0][0].fact_id == "new"


def test_memory_load_refuses_another_embedder(tmp_path, memory_100, embedder):
    import copy

    from retrieval.memory import FactMemory
    folder = memory_100.save(tmp_path / "memory")
    other = copy.copy(embedder)
    other.name = "facebook/contriever-msmarco"
    with pytest.raises(ValueError, match="not comparable"):
        FactMemory.load(folder, other)
    with pytest.raises(FileNotFoundError, match="no saved fact memory"):
        FactMemory.load(tmp_path / "empty", embedder)


# ---------------------------------------------------------------------------------------------------------------
# The reasoner's decisions and metrics, with a scripted selector
# ---------------------------------------------------------------------------------------------------------------

class ScriptedSelector:
    """Replies chosen by the question, recording every selection prompt it was shown."""

    def __init__(self, replies: dict[str, str]):
        self.replies, self.prompts = replies, []

    def __call__(self, prompts):
        self.prompts.extend(prompts)
        out = []
        for prompt in prompts:
            question = prompt.rsplit("Question: ", 1)[1].split("\n")[0]
            out.append(self.replies[question])
        return out


def test_reasoner_builds_the_prompt_from_the_chosen_fact_or_leaves_the_query(embedder):
    from retrieval.memory import FactMemory
    memory = FactMemory(embedder)
    memory.add(FACTS, ["darrieux", "paris", "apple"])
    selector = ScriptedSelector({"The mother tongue of Danielle Darrieux is": "1",
                                 "Danielle Darrieux was born in": "0",
                                 "Who created Apple A5?": "Apple A5 was created by Google.",
                                 "The capital of Italy is": "maybe"})
    reasoner = SelectiveContextReasoner(memory, selector, top_k=2)
    queries = ["The mother tongue of Danielle Darrieux is", "Danielle Darrieux was born in", "Who created Apple A5?",
               "The capital of Italy is", "The mother tongue of Danielle Darrieux is"]
    decisions = reasoner.decide(queries)
    assert len(selector.prompts) == 4  # the repeated query is decided once
    first, born, apple, italy, repeat = decisions
    assert first.status == "accepted" and first.chosen.fact_id == "darrieux"
    assert first.prompt == answer_prompt(queries[0], FACTS[0])
    assert repeat == first
    assert born.status == "rejected" and born.chosen is None and born.prompt == queries[1]
    assert apple.status == "accepted" and apple.chosen.fact_id == "apple" and apple.prompt.endswith("Answer:")
    assert italy.status == "unparsable" and italy.prompt == queries[3]  # never counted as an acceptance
    assert all(len(d.hits) == 2 for d in decisions)
    assert reasoner.timings.queries == 4 and reasoner.timings.selection_seconds >= 0


def test_scr_metrics_count_recall_selection_and_locality():
    from retrieval.memory import Hit
    from retrieval.scr import ScrDecision

    def decision(query, hit_ids, status, chosen=None):
        hits = tuple(Hit(i, fid, f"fact {fid}", 1.0 - i / 10) for i, fid in enumerate(hit_ids))
        chosen_hit = next((h for h in hits if h.fact_id == chosen), None)
        return ScrDecision(query, hits, "r", status, chosen_hit, query)

    decisions = {
        "r1": decision("r1", ["a", "b"], "accepted", "a"),  # rewrite: recalled, correct
        "r2": decision("r2", ["c", "a"], "accepted", "c"),  # rewrite of b: not recalled, wrong fact accepted
        "p1": decision("p1", ["b", "a"], "rejected"),  # paraphrase of a: recalled, rejected
        "n1": decision("n1", ["a"], "accepted", "a"),  # locality: wrongly accepted
        "n2": decision("n2", ["a"], "unparsable"),  # locality: not accepted
    }
    queries = [ScrQuery("r1", "rewrite", "a"), ScrQuery("r2", "rewrite", "b"),
               ScrQuery("p1", "generalization", "a"), ScrQuery("n1", "locality"), ScrQuery("n2", "locality")]
    metrics = scr_metrics(queries, decisions, top_k=2)
    assert metrics == {"recall_at_k/rewrite": 0.5, "recall_at_k/generalization": 1.0,
                       "acceptance_rate": pytest.approx(2 / 3), "correct_selection_rate": pytest.approx(1 / 3),
                       "locality_rejection_rate": 0.5, "unparsable_rate": 0.2, "top_k": 2.0}
