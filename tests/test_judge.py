"""The LLM judge (evals/judge.py): exact verdict parsing (the "INCORRECT contains CORRECT" trap), the on-disk
judgment cache (hits, and two processes writing at once), the OpenAI-compatible backend against a local HTTP
endpoint (key sent but never shown, retries, rate limit, a clear error when the endpoint is down), and the
transformers backend on the real SmolLM2."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from evals.judge import (Judge, JudgeItem, JudgmentCache, JudgeUnavailable, OpenAIJudge, TransformersJudge,
                         judge_prompt, judgment_key, parse_verdict)


@pytest.mark.parametrize("reply, verdict", [
    ("A", "A"), ("B", "B"), (" a", "A"), ("B.", "B"), ("(A)", "A"), ("**B**", "B"), ("[A]", "A"), ("A\nB", "A"),
    ("Grade: A", "A"), ("Answer: B", "B"), ("CORRECT", "A"), ("INCORRECT", "B"), ("incorrect.", "B"),
    ("Incorrect - it says Rome", "B"), ("A - the answer names Paris", "A"),
    ("", None), ("  ", None), ("The answer is A", None), ("AB", None), ("C", None), ("Both", None),
    ("I think it is correct", None), ("Bananas", None), ("a bit off", None), ("b.", "B"),
])
def test_parse_verdict_is_exact(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_incorrect_is_never_read_as_correct():
    # Released code tested `"CORRECT" in reply` first, so every INCORRECT counted as correct.
    assert "CORRECT" in "INCORRECT" and parse_verdict("INCORRECT") == "B"


def test_grader_prompt_shows_question_gold_and_prediction():
    prompt = judge_prompt(" What is the capital of France? ", "Paris", "It is Paris.\n")
    assert "Question: What is the capital of France?" in prompt
    assert "Reference answer: Paris" in prompt and "Answer to grade: It is Paris." in prompt
    assert prompt.rstrip().endswith("Grade:") and "single letter A or B" in prompt


class ContainsBackend:
    """A deterministic fake judge: A when the gold answer is in the prediction; counts what it is asked."""

    name = "fake-contains"

    def __init__(self, reply_for_unknown: str = "B"):
        self.calls = 0
        self.reply_for_unknown = reply_for_unknown

    def complete(self, prompts):
        self.calls += len(prompts)
        out = []
        for p in prompts:
            gold = p.split("Reference answer: ")[1].split("\n")[0]
            pred = p.split("Answer to grade: ")[1].split("\n")[0]
            out.append("A" if gold.lower() in pred.lower() else ("I am not sure" if "?" in pred else "B"))
        return out


def test_judgments_are_cached_deduplicated_and_unparsable_replies_counted(tmp_path):
    backend = ContainsBackend()
    judge = Judge(backend, JudgmentCache.in_folder(tmp_path), batch_size=2)
    items = [JudgeItem("q1", "Paris", "Paris."), JudgeItem("q2", "Rome", "Milan"), JudgeItem("q1", "Paris", "Paris."),
             JudgeItem("q3", "Oslo", "maybe?")]
    first = judge.grade(items)
    assert [j.verdict for j in first] == ["A", "B", "A", None]
    assert [j.correct for j in first] == [True, False, True, False] and first[3].unparsable
    assert backend.calls == 3  # the repeated item was asked once
    again = Judge(backend, JudgmentCache.in_folder(tmp_path)).grade(items)
    assert backend.calls == 3 and all(j.from_cache for j in again)
    assert [(j.verdict, j.reply) for j in again] == [(j.verdict, j.reply) for j in first]
    other_model = ContainsBackend()
    other_model.name = "another-judge"
    Judge(other_model, JudgmentCache.in_folder(tmp_path)).grade(items[:1])
    assert other_model.calls == 1  # the judge model is part of the key


def _grade_in_child(cache_path: str, offset: int, queue) -> None:
    judge = Judge(ContainsBackend(), JudgmentCache(cache_path), batch_size=7)
    items = [JudgeItem(f"q{i}", "x", "x" if i % 2 else "y") for i in range(offset, offset + 150)]
    queue.put([j.verdict for j in judge.grade(items)])


def test_two_processes_share_the_cache_file(tmp_path):
    path = str(tmp_path / "judgments.sqlite")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_grade_in_child, args=(path, offset, queue)) for offset in (0, 100)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    for verdicts in results:
        assert len(verdicts) == 150 and set(verdicts) == {"A", "B"}
    cache = JudgmentCache(path)
    keys = [judgment_key("fake-contains", JudgeItem(f"q{i}", "x", "x" if i % 2 else "y")) for i in range(250)]
    stored = cache.get(keys)
    assert len(stored) == 250 and all(stored[k][0] == ("A" if i % 2 else "B") for i, k in enumerate(keys))


class _Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that grades by containment; fails the first ``failures`` calls."""

    failures = 0
    seen_keys: list = []
    bodies: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen_keys.append(self.headers.get("Authorization"))
        type(self).bodies.append(body)
        if type(self).failures > 0:
            type(self).failures -= 1
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"busy")
            return
        reply = ContainsBackend().complete([body["messages"][0]["content"]])[0]
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def endpoint():
    _Endpoint.failures, _Endpoint.seen_keys, _Endpoint.bodies = 0, [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_backend_sends_the_key_never_shows_it_and_retries(endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("EDITGRID_TEST_JUDGE_KEY", "sk-secret-123")
    backend = OpenAIJudge(endpoint, "smollm2", api_key_env="EDITGRID_TEST_JUDGE_KEY", constrained_choice=True)
    assert "sk-secret" not in repr(backend) and "sk-secret" not in str(vars(backend).get("name"))
    _Endpoint.failures = 2  # two 503s, then answers: retried with back-off
    verdicts = Judge(backend, JudgmentCache.in_folder(tmp_path)).grade(
        [JudgeItem("capital of France?", "Paris", "Paris"), JudgeItem("capital of Italy?", "Rome", "Milan")])
    assert [v.verdict for v in verdicts] == ["A", "B"]
    assert set(_Endpoint.seen_keys) == {"Bearer sk-secret-123"}
    assert all(b["temperature"] == 0.0 and b["model"] == "smollm2" for b in _Endpoint.bodies)
    assert all(b["structured_outputs"] == {"choice": ["A", "B"]} for b in _Endpoint.bodies)


def test_openai_backend_rate_limit(endpoint):
    backend = OpenAIJudge(endpoint, "m", api_key_env=None, requests_per_second=20, concurrency=4)
    started = time.perf_counter()
    backend.complete([judge_prompt("q", "x", "x")] * 10)
    assert time.perf_counter() - started >= 0.4  # 10 request starts at most 20 per second: ≥ 9 intervals of 50 ms
    assert len(_Endpoint.bodies) == 10 and all("structured_outputs" not in b for b in _Endpoint.bodies)


def test_openai_backend_down_gives_one_clear_error_without_the_key(monkeypatch):
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("EDITGRID_TEST_JUDGE_KEY", "sk-secret-123")
    backend = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", api_key_env="EDITGRID_TEST_JUDGE_KEY", max_retries=1)
    with pytest.raises(JudgeUnavailable) as err:
        backend.complete([judge_prompt("q", "x", "x")])
    message = str(err.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in message and "not answering after 2 attempts" in message
    assert "sk-secret" not in message


def test_transformers_judge_on_smollm2_answers_through_the_chat_template(smollm2, tmp_path):
    from evals.generation import generate_greedy

    backend = TransformersJudge(smollm2.model, smollm2.tokenizer, name="hf:smollm2", batch_size=4)
    items = [JudgeItem("What is the capital of France?", "Paris", "The capital of France is Paris."),
             JudgeItem("What is the capital of France?", "Paris", "The capital of France is Berlin."),
             JudgeItem("Who wrote Hamlet?", "William Shakespeare", "Hamlet hamlet hamlet hamlet")]
    judge = Judge(backend, JudgmentCache.in_folder(tmp_path), batch_size=2)
    judged = judge.grade(items)
    # Each reply is exactly the model's greedy chat answer to the grader prompt, parsed exactly.
    for item, judgment in zip(items, judged):
        shown = smollm2.tokenizer.apply_chat_template(
            [{"role": "user", "content": judge_prompt(item.question, item.gold, item.prediction)}],
            tokenize=False, add_generation_prompt=True)
        (direct,) = generate_greedy(smollm2.model, smollm2.tokenizer, [shown], max_new_tokens=4, stop=("\n",))
        assert judgment.reply == direct.text
        assert judgment.verdict == parse_verdict(direct.text)
    assert judge.stats.asked == 3 and judge.stats.judgments_per_second > 0
