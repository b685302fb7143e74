"""The unedited model's answers generated on vLLM for real (``make test-vllm``): the offline engine and the
OpenAI-compatible completions endpoint of vLLM's API server both answer the protocol's prompts like the in-process
transformers model on the same weights (the check a trial runs before using them), and a server serving other
weights is caught by that check. Prints answers per second of each backend."""

from __future__ import annotations

import time

import pytest
from conftest import MODEL, SERVED_NAME  # tests_vllm/ is on sys.path (pytest prepend import mode)

from evals.answer_backends import OpenAICompletionsAnswers, VllmAnswers
from evals.autoregressive import GenerationSettings, agreement_with_in_process, generate_answers

PROMPTS = ["The mother tongue of Danielle Darrieux is", "The capital of France is", "Hamlet was written by",
           "The largest planet of the solar system is", "Toko Yasuda, the", "Autonomous University of Madrid, which is "
           "located in", "The official language of Brazil is", "The Eiffel Tower is located in",
           "Apple was founded by", "The Mona Lisa was painted by", "Mount Everest lies in", "The currency of Japan is",
           "Albert Einstein was born in", "The Amazon river flows through", "Python was created by",
           "The chemical symbol for gold is"]
MIN_AGREEMENT = 0.9  # same weights, other kernels: a rare greedy near-tie may flip


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype="float32").eval()
    return model, tokenizer


def _timed_answers(backend, tokenizer, label: str) -> list[str]:
    started = time.perf_counter()
    answers = generate_answers(None, tokenizer, PROMPTS, GenerationSettings(), backend=backend)
    seconds = time.perf_counter() - started
    print(f"\n[{label}] {len(PROMPTS)} answers in {seconds:.2f} s = {len(PROMPTS) / seconds:.1f} answers/s")
    return answers


@pytest.mark.parametrize("where", ["offline engine", "openai completions endpoint"])
def test_vllm_answers_like_the_in_process_model(where, request, hf_model):
    model, tokenizer = hf_model
    if where == "offline engine":
        backend = VllmAnswers(MODEL, engine=request.getfixturevalue("engine"))
    else:
        backend = OpenAICompletionsAnswers(request.getfixturevalue("vllm_server"), SERVED_NAME, api_key_env=None)
    answers = _timed_answers(backend, tokenizer, where)
    agreement = agreement_with_in_process(backend, model, tokenizer, PROMPTS, GenerationSettings())
    differing = [r for r in agreement.rows if not r["same"]]
    print(f"[{where}] {agreement.share:.0%} of {len(PROMPTS)} answers equal the in-process model's; differing: "
          f"{differing}")
    assert agreement.share >= MIN_AGREEMENT
    assert [r["backend"] for r in agreement.rows] == answers  # temperature 0: the same answers again
    assert sum(bool(a) for a in answers) >= len(PROMPTS) // 2 and not any("\n" in a for a in answers)


def test_other_weights_are_caught(vllm_server, hf_model):
    from transformers import AutoModelForCausalLM

    model, tokenizer = hf_model
    other = AutoModelForCausalLM.from_config(model.config).eval()  # random weights, same architecture
    backend = OpenAICompletionsAnswers(vllm_server, SERVED_NAME, api_key_env=None)
    agreement = agreement_with_in_process(backend, other, tokenizer, PROMPTS, GenerationSettings())
    assert agreement.share < 0.5
