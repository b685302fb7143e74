"""Where the unedited model's answers are generated (evals/answer_backends.py): an OpenAI-compatible completions
endpoint answers like the in-process model when it serves the same weights (the endpoint here stops like vLLM does:
it generates, then cuts before the first stop string); a trial takes the unedited answers from it after checking the
agreement; an endpoint serving other weights stops the trial with one clear message. The vLLM engine itself runs in
``make test-vllm`` (tests_vllm/)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from evals.answer_backends import InProcessAnswers, OpenAICompletionsAnswers
from evals.autoregressive import GenerationSettings, agreement_with_in_process, answer_queries, generate_answers
from evals.datasets import load_records
from evals.generation import generate_greedy
from evals.openai_endpoint import EndpointUnavailable
from evals.pre_edit import pre_edit_answers


def _serve_completions(model, tokenizer):
    """A /v1/completions endpoint over ``model``: greedy, ``max_tokens``, then the text before the first stop string
    (vLLM's rule: generation ends at a stop string, which is left out of the text)."""
    lock = threading.Lock()
    seen = {"bodies": [], "keys": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen["bodies"].append((self.path, body))
            seen["keys"].append(self.headers.get("Authorization"))
            with lock:
                (generation,) = generate_greedy(model, tokenizer, [body["prompt"]], max_new_tokens=body["max_tokens"],
                                                stop=())
            text = generation.raw
            cuts = [text.find(s) for s in body.get("stop", []) if s in text]
            payload = json.dumps({"choices": [{"text": text[:min(cuts)] if cuts else text}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1", seen


@pytest.fixture
def smollm2_endpoint(smollm2):
    server, url, seen = _serve_completions(smollm2.model, smollm2.tokenizer)
    yield url, seen
    server.shutdown()


def _prompts(limit: int) -> list[str]:
    return list(dict.fromkeys(q.prompt for q in answer_queries(load_records("builtin", limit=limit))))


def test_completions_endpoint_answers_like_the_in_process_model(smollm2, smollm2_endpoint, monkeypatch):
    url, seen = smollm2_endpoint
    monkeypatch.setenv("EDITGRID_TEST_GEN_KEY", "sk-gen-secret")
    backend = OpenAICompletionsAnswers(url, "smollm2", api_key_env="EDITGRID_TEST_GEN_KEY", concurrency=2)
    prompts = _prompts(2)
    settings = GenerationSettings()
    # Batch 1 in process too: the endpoint answers one prompt at a time, and padding alone may flip a greedy near-tie.
    agreement = agreement_with_in_process(backend, smollm2.model, smollm2.tokenizer, prompts, settings, batch_size=1)
    assert agreement.share == 1.0, agreement.rows
    assert all(r["backend"] and "." not in r["backend"] and "\n" not in r["backend"] for r in agreement.rows)
    # Raw prompts, greedy, the protocol's token budget and stop strings; the key sent, never shown.
    assert sorted(b["prompt"] for _, b in seen["bodies"]) == sorted(prompts)
    assert all(path == "/v1/completions" and b["temperature"] == 0.0 and b["max_tokens"] == 50
               and b["stop"] == [".", "\n"] and b["model"] == "smollm2" for path, b in seen["bodies"])
    assert set(seen["keys"]) == {"Bearer sk-gen-secret"} and "sk-gen" not in repr(backend)


def test_reasoning_mode_asks_the_backend_for_the_long_budget_without_stops():
    class Recorder:
        name = "recorder"
        calls = []

        def continuations(self, prompts, max_new_tokens, stop):
            self.calls.append((max_new_tokens, stop))
            return ["<think>a. b\nc</think> Paris. More" for _ in prompts]

    backend = Recorder()
    settings = GenerationSettings(reasoning=True, reasoning_max_new_tokens=300)
    assert generate_answers(None, None, ["q1", "q2"], settings, backend=backend) == ["Paris", "Paris"]
    assert backend.calls == [(300, ())]


def test_unedited_answers_are_cached_per_backend(smollm2, smollm2_endpoint, tmp_path):
    url, seen = smollm2_endpoint
    records = load_records("builtin", limit=1)
    settings = GenerationSettings(max_new_tokens=8)
    backend = OpenAICompletionsAnswers(url, "smollm2", api_key_env=None)
    checks = []
    first = pre_edit_answers(smollm2.model, smollm2.tokenizer, records, settings, "smollm2@x", 1, tmp_path,
                             backend=backend, check_backend=lambda: checks.append(1) or {"share": 1.0, "rows": []})
    served = first.answers
    assert not first.from_cache and len(seen["bodies"]) == len(served) and checks == [1]
    again = pre_edit_answers(smollm2.model, smollm2.tokenizer, records, settings, "smollm2@x", 1, tmp_path,
                             backend=backend, check_backend=lambda: checks.append(2) or {"share": 0.0, "rows": []})
    assert again.from_cache and again.answers == served and len(seen["bodies"]) == len(served)  # not asked again
    assert checks == [1] and again.backend_check == {"share": 1.0, "rows": []}  # the check the answers passed
    here = pre_edit_answers(smollm2.model, smollm2.tokenizer, records, settings, "smollm2@x", 1, tmp_path)
    assert not here.from_cache and here.answers == served  # the in-process answers are an entry of their own
    assert here.backend_check is None


def _stage_config(url: str) -> dict:
    from grid.config import DEFAULTS, deep_merge

    return deep_merge(DEFAULTS, {"eval": {
        "generate": {"enabled": True, "max_new_tokens": 6, "batch_size": 1,
                     "unedited_answers": {"backend": "openai", "base_url": url, "model": "served",
                                          "api_key_env": None, "verify_prompts": 4}},
        "judge": {"backend": "openai", "base_url": url, "model": "judge"}}})["eval"]


def _other_model(tiny_llama):
    other = type(tiny_llama)(tiny_llama.config)
    torch.manual_seed(1)
    for parameter in other.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    return other.eval()


@pytest.mark.parametrize("serves", ["same weights", "other weights"])
def test_generation_stage_checks_the_unedited_backend(serves, tiny_llama, smol_tokenizer, tmp_path):
    from grid.generation_stage import GenerationStage, UneditedBackendMismatch

    served_model = tiny_llama if serves == "same weights" else _other_model(tiny_llama)
    server, url, seen = _serve_completions(served_model, smol_tokenizer)
    records = load_records("builtin", limit=2)
    model_args = {"dtype": "float32", "device": "cpu"}
    try:
        if serves == "other weights":
            with pytest.raises(UneditedBackendMismatch) as err:
                GenerationStage(_stage_config(url), tiny_llama, smol_tokenizer, records, "tiny@x", "tiny", model_args,
                                tmp_path)
            message = str(err.value)
            assert "eval.generate.unedited_answers" in message and "served" in message and "in process" in message
            assert len(seen["bodies"]) == 4  # the probe only: nothing was generated for the trial
            return
        stage = GenerationStage(_stage_config(url), tiny_llama, smol_tokenizer, records, "tiny@x", "tiny",
                                model_args, tmp_path)
        asked = len(seen["bodies"])
        # A second trial on the same weights and records reads the answers from the cache: the endpoint is not
        # asked again (not even the probe), and the trial logs the check those answers passed.
        cached = GenerationStage(_stage_config(url), tiny_llama, smol_tokenizer, records, "tiny@x", "tiny",
                                 model_args, tmp_path)
        assert len(seen["bodies"]) == asked
    finally:
        server.shutdown()
    assert stage.step0_metrics == {"gen/unedited_backend_agreement": 1.0}
    assert len(stage.step0_tables["tables/generations/unedited_backend_probe.json"]) == 4
    assert cached.step0_metrics == stage.step0_metrics and cached.step0_tables == stage.step0_tables
    assert cached.pre_answers == stage.pre_answers
    prompts = list(stage.pre_answers)
    assert stage.pre_answers == dict(zip(prompts, generate_answers(tiny_llama, smol_tokenizer, prompts,
                                                                   stage.settings)))


def test_endpoint_down_names_the_generation_endpoint():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAICompletionsAnswers(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, max_retries=0)
    with pytest.raises(EndpointUnavailable, match=r"generation endpoint http://127\.0\.0\.1:\d+/v1/completions"):
        backend.continuations(["q"], 4, ("\n",))


def test_in_process_backend_returns_raw_text_that_the_protocol_cuts(smollm2):
    prompts = _prompts(1)[:2]
    raw = InProcessAnswers(smollm2.model, smollm2.tokenizer).continuations(prompts, 50, (".", "\n"))
    cut = generate_answers(smollm2.model, smollm2.tokenizer, prompts, GenerationSettings())
    assert [g.text for g in generate_greedy(smollm2.model, smollm2.tokenizer, prompts, 50, (".", "\n"))] == cut
    assert all(r.strip().startswith(c) for r, c in zip(raw, cut))
