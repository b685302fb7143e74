"""Teacher-forced evaluation of edits (docs/methods.md, "Evaluation protocols").

``score_continuations`` is the one place that runs the model: batched forward passes over ``prompt +
continuation`` pairs (each distinct prompt run once, its continuations on top of its cached keys/values),
returning per continuation token its log-probability and whether it is the argmax of the next-token
distribution. ``evaluate_records`` turns those scores into the edit metrics of both protocols:

* ``probability`` (CounterFact): a prompt counts as edited when the mean per-token NLL of the new target is below
  that of the true target (specificity: the reverse, on neighbourhood prompts).
* ``token_accuracy`` (zsRE, KnowEdit): share of answer tokens that are the argmax given the prompt and the
  previous gold answer tokens.

Locality (KnowEdit) compares the edited model's argmax tokens with the unedited model's, stored once per run in a
``PreEditReference`` by ``compute_reference``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from evals.batching import left_padded, model_device, positions_from_mask
from evals.records import EditRecord, PromptCase
from evals.metric_names import EDIT_RATES as METRIC_ORDER, EDIT_SCORE, EVAL_NUM_RECORDS, SCORE_PARTS, edit_metric
from methods.infra.kv_cache import cache_argument, needs_whole_sequences, with_cache

GAP_METRICS = ("efficacy_prob_gap", "generalization_prob_gap", "specificity_prob_gap")
PROTOCOLS = ("probability", "token_accuracy")


# ----------------------------------------------------------------------------------------------------------------
# Scoring continuations
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContinuationScore:
    """Teacher-forced scores of one continuation given its prompt (one entry per continuation token)."""

    prompt: str
    continuation: str
    token_ids: tuple[int, ...]  # the continuation's tokens as tokenised in context
    token_logprobs: tuple[float, ...]  # log P(token | prompt, previous continuation tokens)
    argmax_ids: tuple[int, ...]  # argmax of the next-token distribution at each continuation position
    is_argmax: tuple[bool, ...]
    mean_nll: float  # mean over continuation tokens of -log P

    @property
    def token_accuracy(self) -> float:
        return sum(self.is_argmax) / len(self.is_argmax)

    @property
    def mean_prob(self) -> float:
        """exp(-mean NLL): the per-token geometric-mean probability (what CounterFact's probability gaps use)."""
        return math.exp(-self.mean_nll)


@dataclass(frozen=True)
class _TokenisedPair:
    input_ids: list[int]
    continuation_start: int  # index in input_ids of the first continuation token


def _tokenise_pair(tokenizer, prompt: str, continuation: str) -> _TokenisedPair:
    """Tokenise ``prompt + continuation`` as one string and find where the continuation's tokens begin.

    The continuation starts at the first token whose character span reaches past the end of the prompt, so a
    token that straddles the boundary (prompt "is ", continuation "Paris" -> token " Paris") belongs to the
    continuation. Tokenising the prompt alone would get such merges wrong.
    """
    if not isinstance(prompt, str) or not isinstance(continuation, str):
        raise TypeError(f"prompt and continuation must be strings, got {type(prompt).__name__} and "
                        f"{type(continuation).__name__}")
    if not continuation:
        raise ValueError(f"empty continuation for prompt {prompt!r}")
    text = prompt + continuation
    try:
        encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True,
                             return_special_tokens_mask=True)
    except NotImplementedError as err:
        raise TypeError("score_continuations needs a fast tokenizer (offset mappings locate the continuation)") from err
    ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    special = encoding["special_tokens_mask"]
    content = [i for i, flag in enumerate(special) if not flag]
    if not content:
        raise ValueError(f"{text!r} tokenises to special tokens only")
    end = content[-1] + 1  # drop special tokens a tokenizer appends (e.g. EOS): they are not the continuation
    boundary = len(prompt)
    start = next((i for i in content if offsets[i][1] > boundary), None)
    if start is None:
        raise ValueError(f"no token of continuation {continuation!r} found after prompt {prompt!r}")
    if start == 0:
        raise ValueError(f"continuation {continuation!r} starts the sequence (prompt {prompt!r}): no token "
                         "precedes it to predict it from")
    return _TokenisedPair(input_ids=ids[:end], continuation_start=start)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _target_log_probs(pair: _TokenisedPair, log_probs: torch.Tensor) -> list[float]:
    """The log-probs of the pair's continuation tokens from the [n, vocab] rows that predict them, as Python floats.

    Only these n numbers are kept, and not as tensors. Holding a view of the batch's full-vocabulary log-probs kept
    every batch's logits alive (O(pairs × vocab), ~19 GB at 10,000 CounterFact records). Holding them as small
    tensors kept the memory of the batches' freed temporaries resident: a tensor's few bytes sit on the C heap
    between the next batch's multi-MB temporaries, and the heap shrinks only from its top (~7 MB/s of growth
    on 10,000 records; benchmarks/RESULTS.md, "Evaluation memory"). Python floats live in Python's own arenas."""
    targets = torch.tensor(pair.input_ids[pair.continuation_start:], dtype=torch.long, device=log_probs.device)
    return log_probs.gather(-1, targets[:, None])[:, 0].tolist()


def _score(pair: _TokenisedPair, token_log_probs: list[float], argmax_ids: list[int], prompt: str,
           continuation: str) -> ContinuationScore:
    """The score of one pair from its continuation tokens' log-probs and the argmax of the rows predicting them."""
    targets = pair.input_ids[pair.continuation_start:]
    return ContinuationScore(prompt=prompt, continuation=continuation, token_ids=tuple(targets),
                             token_logprobs=tuple(token_log_probs), argmax_ids=tuple(argmax_ids),
                             is_argmax=tuple(a == t for a, t in zip(argmax_ids, targets)),
                             mean_nll=-sum(token_log_probs) / len(targets))


@torch.inference_mode()
def score_continuations(model: torch.nn.Module, tokenizer, prompts: list[str], continuations: list[str],
                        batch_size: int = 32, progress: str | None = None) -> list[ContinuationScore]:
    """Teacher-forced log-probs of each ``continuation`` after its ``prompt`` (same order as the inputs).

    ``continuation`` carries its own separating space (e.g. ``" Paris"``). Each pair is tokenised whole
    (``prompt + continuation``). Pairs whose prompt tokens agree (CounterFact's new and true target after the same
    prompt; MMLU's four choices) share one pass over the prompt: its keys/values are cached and only each
    continuation is run on top (``_score_shared_prompts``). Models whose forward takes no key/value cache get
    one pass per pair. Batches are left-padded with explicit position ids, so the tokenizer's ``padding_side``
    does not change the numbers.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    pairs = [_tokenise_pair(tokenizer, p, c) for p, c in zip(prompts, continuations)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out; any id works
    # An editor that routes by the whole sequence (WISE, MEMOIR) must see each pair in one forward.
    if cache_argument(model) is not None and hasattr(model, "base_model") and not needs_whole_sequences(model):
        scored = _score_shared_prompts(model, pairs, pad_id, batch_size, progress)
    else:
        scored = _score_whole_pairs(model, pairs, pad_id, batch_size, progress)
    return [_score(pairs[i], log_probs, argmax, prompts[i], continuations[i])
            for i, (log_probs, argmax) in enumerate(scored)]


def _score_whole_pairs(model, pairs: list[_TokenisedPair], pad_id: int, batch_size: int, progress):
    """(log-probs, argmax) rows per pair, one forward over each whole pair. Left padding puts every continuation
    at the end of its row, so only the last few positions go through the LM head (``logits_to_keep`` where the
    model supports it)."""
    device = model_device(model)
    use_logits_to_keep = _accepts_logits_to_keep(model)
    # Longest first, so running out of memory shows up on the first batch.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids), reverse=True)
    results: list = [None] * len(pairs)
    starts = range(0, len(order), batch_size)
    for batch_start in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
        batch = order[batch_start:batch_start + batch_size]
        input_ids, attention_mask = left_padded([pairs[i].input_ids for i in batch], pad_id)
        position_ids = positions_from_mask(attention_mask)
        # The last `kept` positions hold every prediction of a continuation token (plus the final, unused one).
        kept = 1 + max(len(pairs[i].input_ids) - pairs[i].continuation_start for i in batch)
        extra = {"logits_to_keep": kept} if use_logits_to_keep else {}
        output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       position_ids=position_ids.to(device), use_cache=False, **extra)
        logits = output.logits[:, -kept:, :].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        argmax = logits.argmax(dim=-1).cpu()
        for row, index in enumerate(batch):
            n_targets = len(pairs[index].input_ids) - pairs[index].continuation_start
            # Token at padded position p is predicted at p - 1; kept index = position - (width - kept).
            first = kept - 1 - n_targets
            results[index] = (_target_log_probs(pairs[index], log_probs[row, first:first + n_targets]),
                              argmax[row, first:first + n_targets].tolist())
    return results


def _score_shared_prompts(model, pairs: list[_TokenisedPair], pad_id: int, batch_size: int, progress):
    """(log-probs, argmax) rows per pair, each distinct prompt run once.

    A pair's tokens split into a shared prefix (the prompt without its last token) and a suffix (the prompt's last
    token + the continuation without its last token), whose outputs predict exactly the continuation tokens. Per
    batch: the distinct prefixes, left-padded, in one forward that fills a key/value cache; the cache rows are
    repeated per pair; then every pair's suffix, right-padded after it, in a second forward.
    """
    from transformers import DynamicCache

    device = model_device(model)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, pair in enumerate(pairs):
        groups.setdefault(tuple(pair.input_ids[:pair.continuation_start - 1]), []).append(index)
    # Longest prefix first (memory problems show on the first batch); about batch_size pairs per batch.
    prefixes = sorted(groups, key=len, reverse=True)
    batches, current, count = [], [], 0
    for prefix in prefixes:
        if current and count + len(groups[prefix]) > batch_size:
            batches.append(current)
            current, count = [], 0
        current.append(prefix)
        count += len(groups[prefix])
    batches.append(current)

    results: list = [None] * len(pairs)
    for batch in tqdm(batches, desc=progress, unit="batch", leave=False, disable=progress is None):
        members = [index for prefix in batch for index in groups[prefix]]
        prefix_row = torch.tensor([row for row, prefix in enumerate(batch) for _ in groups[prefix]])
        width = max(len(prefix) for prefix in batch)
        cache = None
        if width:
            prefix_ids, prefix_mask = left_padded([list(prefix) for prefix in batch], pad_id)
            cache = DynamicCache()
            model.base_model(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
                             position_ids=positions_from_mask(prefix_mask).to(device),
                             **with_cache(model.base_model, cache))
            cache.reorder_cache(prefix_row.to(device))  # one cache row per pair
            prefix_mask = prefix_mask[prefix_row]
        else:
            prefix_mask = torch.zeros((len(members), 0), dtype=torch.long)
        suffixes = [pairs[i].input_ids[pairs[i].continuation_start - 1:-1] for i in members]
        suffix_width = max(len(suffix) for suffix in suffixes)
        suffix_ids = torch.full((len(members), suffix_width), pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((len(members), suffix_width), dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            suffix_ids[row, :len(suffix)] = torch.tensor(suffix, dtype=torch.long)
            suffix_mask[row, :len(suffix)] = 1
        mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        positions = positions_from_mask(mask)[:, width:]
        output = model(input_ids=suffix_ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), **with_cache(model, cache))
        logits = output.logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        argmax = logits.argmax(dim=-1).cpu()
        for row, (index, suffix) in enumerate(zip(members, suffixes)):
            results[index] = (_target_log_probs(pairs[index], log_probs[row, :len(suffix)]),
                              argmax[row, :len(suffix)].tolist())
    return results


def answer_continuation(prompt: str, answer: str) -> str:
    """The continuation that scores ``answer`` after ``prompt``: answers are stored without their separating
    space, so one is added unless the prompt already ends in whitespace."""
    if not answer:
        raise ValueError(f"empty answer for prompt {prompt!r}")
    return answer if prompt[-1:].isspace() else " " + answer


# ----------------------------------------------------------------------------------------------------------------
# Pre-edit reference (locality)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class PreEditReference:
    """The unedited model's argmax tokens on every locality case, from ``compute_reference``.

    Plain nested dicts and lists (case_id -> sub-key -> one list per locality case), so it pickles and
    round-trips through JSON (``to_dict`` / ``from_dict``) for a trial to cache. ``answer_token_ids`` records
    the scored tokens, to catch a reference computed with another tokenizer or other records.
    """

    argmax_ids: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)
    answer_token_ids: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"argmax_ids": self.argmax_ids, "answer_token_ids": self.answer_token_ids}

    @classmethod
    def from_dict(cls, data: dict) -> PreEditReference:
        missing = {"argmax_ids", "answer_token_ids"} - set(data)
        if missing:
            raise ValueError(f"pre-edit reference lacks {sorted(missing)}")
        return cls(argmax_ids=data["argmax_ids"], answer_token_ids=data["answer_token_ids"])


def _locality_query(case: PromptCase, case_id: str, sub_key: str) -> tuple[str, str]:
    if not case.answers:
        raise ValueError(f"record {case_id}: locality case {case.prompt!r} ({sub_key}) has no answer")
    return case.prompt, answer_continuation(case.prompt, case.answers[0])


def compute_reference(model: torch.nn.Module, tokenizer, records: list[EditRecord],
                      batch_size: int = 32) -> PreEditReference:
    """Run the *unedited* model once over every locality case of ``records`` and keep its argmax tokens."""
    seen: set[str] = set()
    queries: list[tuple[str, str]] = []
    layout: list[tuple[str, str, int]] = []  # (case_id, sub_key, number of cases) in query order
    for record in records:
        if record.case_id in seen:
            raise ValueError(f"duplicate case_id {record.case_id!r}: the reference is keyed by case_id")
        seen.add(record.case_id)
        for sub_key, cases in record.locality.items():
            queries.extend(_locality_query(case, record.case_id, sub_key) for case in cases)
            layout.append((record.case_id, sub_key, len(cases)))
    scores = score_continuations(model, tokenizer, [q[0] for q in queries], [q[1] for q in queries], batch_size)
    reference = PreEditReference()
    cursor = 0
    for case_id, sub_key, count in layout:
        chunk = scores[cursor:cursor + count]
        cursor += count
        reference.argmax_ids.setdefault(case_id, {})[sub_key] = [list(s.argmax_ids) for s in chunk]
        reference.answer_token_ids.setdefault(case_id, {})[sub_key] = [list(s.token_ids) for s in chunk]
    return reference


# ----------------------------------------------------------------------------------------------------------------
# Evaluating records
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """``metrics``: flat MLflow names (``edit/...``, ``eval/num_records``); ``per_record``: one row per record."""

    metrics: dict[str, float]
    per_record: list[dict]


class _QueryBook:
    """Collects (prompt, continuation) pairs from all records, once each, for one batched scoring call."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []
        self._index: dict[tuple[str, str], int] = {}

    def add(self, prompt: str, continuation: str) -> int:
        key = (prompt, continuation)
        if key not in self._index:
            self._index[key] = len(self.pairs)
            self.pairs.append(key)
        return self._index[key]


@dataclass
class _RecordPlan:
    """Query indices of one record, grouped by what they measure."""

    record: EditRecord
    # probability protocol: (index of new target, index of true target) per prompt
    rewrite_pairs: list[tuple[int, int]] = field(default_factory=list)
    paraphrase_pairs: list[tuple[int, int]] = field(default_factory=list)
    neighborhood_pairs: list[tuple[int, int]] = field(default_factory=list)
    # token_accuracy protocol: one index per prompt
    rewrite: list[int] = field(default_factory=list)
    paraphrase: list[int] = field(default_factory=list)
    neighborhood: list[int] = field(default_factory=list)
    # both protocols: sub-key -> per case, one index per accepted answer (portability) / the first (locality)
    portability: dict[str, list[list[int]]] = field(default_factory=dict)
    locality: dict[str, list[int]] = field(default_factory=dict)


def _plan_record(record: EditRecord, book: _QueryBook, with_locality: bool) -> _RecordPlan:
    plan = _RecordPlan(record=record)
    if record.protocol not in PROTOCOLS:
        raise ValueError(f"record {record.case_id}: unknown protocol {record.protocol!r} (expected one of {PROTOCOLS})")
    if not record.target_new:
        raise ValueError(f"record {record.case_id}: empty target_new")
    if record.protocol == "probability":
        if not record.target_true:
            raise ValueError(f"record {record.case_id}: protocol 'probability' needs target_true")

        def both(prompt: str) -> tuple[int, int]:
            return (book.add(prompt, answer_continuation(prompt, record.target_new)),
                    book.add(prompt, answer_continuation(prompt, record.target_true)))

        plan.rewrite_pairs = [both(record.prompt)]
        plan.paraphrase_pairs = [both(p) for p in record.paraphrase_prompts]
        # CounterFact scores neighbourhood prompts with the record's own targets (the true one should win).
        plan.neighborhood_pairs = [both(case.prompt) for case in record.neighborhood]
    else:
        plan.rewrite = [book.add(record.prompt, answer_continuation(record.prompt, record.target_new))]
        plan.paraphrase = [book.add(p, answer_continuation(p, record.target_new)) for p in record.paraphrase_prompts]
        for case in record.neighborhood:
            if not case.answers:
                raise ValueError(f"record {record.case_id}: neighbourhood case {case.prompt!r} has no answer")
            plan.neighborhood.append(book.add(case.prompt, answer_continuation(case.prompt, case.answers[0])))
    for sub_key, cases in record.portability.items():
        per_case = []
        for case in cases:
            if not case.answers:
                raise ValueError(f"record {record.case_id}: portability case {case.prompt!r} ({sub_key}) has no answer")
            per_case.append([book.add(case.prompt, answer_continuation(case.prompt, a)) for a in case.answers])
        if per_case:
            plan.portability[sub_key] = per_case
    if with_locality:
        for sub_key, cases in record.locality.items():
            if cases:
                plan.locality[sub_key] = [book.add(*_locality_query(c, record.case_id, sub_key)) for c in cases]
    return plan


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _reference_for(reference: PreEditReference, case_id: str, sub_key: str, count: int) -> tuple[list, list]:
    try:
        argmax_ids = reference.argmax_ids[case_id][sub_key]
        token_ids = reference.answer_token_ids[case_id][sub_key]
    except KeyError:
        raise ValueError(f"pre-edit reference has no locality entry for record {case_id!r}, sub-key {sub_key!r}; "
                         "compute it with compute_reference on the same records") from None
    if len(argmax_ids) != count:
        raise ValueError(f"pre-edit reference for record {case_id!r}, sub-key {sub_key!r} has {len(argmax_ids)} "
                         f"cases, the record {count}")
    return argmax_ids, token_ids


def _record_row(plan: _RecordPlan, scores: list[ContinuationScore],
                reference: PreEditReference | None) -> dict:
    record = plan.record
    row: dict = {"case_id": record.case_id, "source": record.source, "protocol": record.protocol}
    if record.protocol == "probability":
        def prefers_new(pair: tuple[int, int]) -> float:
            return float(scores[pair[0]].mean_nll < scores[pair[1]].mean_nll)

        def new_minus_true(pair: tuple[int, int]) -> float:
            return scores[pair[0]].mean_prob - scores[pair[1]].mean_prob

        new_index, true_index = plan.rewrite_pairs[0]
        row["p_new"] = scores[new_index].mean_prob
        row["p_true"] = scores[true_index].mean_prob
        row["efficacy"] = _mean(map(prefers_new, plan.rewrite_pairs))
        row["efficacy_prob_gap"] = _mean(map(new_minus_true, plan.rewrite_pairs))
        if plan.paraphrase_pairs:
            row["generalization"] = _mean(map(prefers_new, plan.paraphrase_pairs))
            row["generalization_prob_gap"] = _mean(map(new_minus_true, plan.paraphrase_pairs))
        if plan.neighborhood_pairs:
            row["specificity"] = _mean(1.0 - prefers_new(p) for p in plan.neighborhood_pairs)
            row["specificity_prob_gap"] = _mean(-new_minus_true(p) for p in plan.neighborhood_pairs)
    else:
        row["efficacy"] = _mean(scores[i].token_accuracy for i in plan.rewrite)
        if plan.paraphrase:
            row["generalization"] = _mean(scores[i].token_accuracy for i in plan.paraphrase)
        if plan.neighborhood:
            row["specificity"] = _mean(scores[i].token_accuracy for i in plan.neighborhood)
    if plan.portability:
        # A case counts its best-matching alias; cases are averaged within a sub-key, then sub-keys.
        row["portability"] = _mean(
            _mean(max(scores[i].token_accuracy for i in aliases) for aliases in per_case)
            for per_case in plan.portability.values())
    if plan.locality and reference is not None:
        per_sub_key = []
        for sub_key, indices in plan.locality.items():
            ref_argmax, ref_tokens = _reference_for(reference, record.case_id, sub_key, len(indices))
            agreement = []
            for index, before, tokens in zip(indices, ref_argmax, ref_tokens):
                score = scores[index]
                if list(score.token_ids) != list(tokens):
                    raise ValueError(f"record {record.case_id!r}, locality {sub_key!r}: the reference scored other "
                                     f"tokens ({tokens} vs {list(score.token_ids)}); recompute it")
                agreement.append(_mean(a == b for a, b in zip(score.argmax_ids, before)))
            per_sub_key.append(_mean(agreement))
        row["locality"] = _mean(per_sub_key)
    return row


def edit_score(metrics: dict[str, float]) -> dict[str, float]:
    """``edit/score``: the harmonic mean of efficacy, generalization and specificity, when all three are there."""
    if all(edit_metric(name) in metrics for name in SCORE_PARTS):
        return {EDIT_SCORE: _harmonic_mean([metrics[edit_metric(name)] for name in SCORE_PARTS])}
    return {}


def _harmonic_mean(values: list[float]) -> float:
    if any(v <= 0.0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def count_scored_pairs(records: list[EditRecord], with_locality: bool = False) -> int:
    """How many distinct (prompt, continuation) pairs ``evaluate_records`` scores for ``records`` (throughput)."""
    book = _QueryBook()
    for record in records:
        _plan_record(record, book, with_locality=with_locality)
    return len(book.pairs)


def evaluate_records(model: torch.nn.Module, tokenizer, records: list[EditRecord],
                     reference: PreEditReference | None = None, batch_size: int = 32,
                     progress: str | None = None,
                     prompt_builder: Callable[[list[str]], list[str]] | None = None) -> EvalResult:
    """Teacher-forced edit metrics of ``records`` on ``model`` (docs/methods.md).

    Per record, each metric is the mean over that record's prompts; a reported metric is the mean over the
    records that support it (records without paraphrases do not enter generalization, and so on; a metric no
    record supports is omitted, not reported as 0). With records of both protocols in one list each record
    contributes its own protocol's value, so the result is each protocol's mean weighted by its record count.

    Metrics (MLflow names): ``edit/efficacy``, ``edit/generalization``, ``edit/specificity``,
    ``edit/locality`` (only with a ``reference`` from ``compute_reference`` on the unedited model; without one,
    locality is not reported), ``edit/portability``, ``edit/score`` (harmonic mean of efficacy, generalization
    and specificity when all three exist), the probability protocol's ``edit/efficacy_prob_gap``,
    ``edit/generalization_prob_gap`` (mean of p_new - p_true) and ``edit/specificity_prob_gap``
    (p_true - p_new), with p = exp(-mean NLL); and ``eval/num_records``.

    All prompts of all records are scored in one batched ``score_continuations`` call.

    ``prompt_builder`` maps the distinct evaluation prompts to what the model is actually shown (SCR puts a
    retrieved fact in front, retrieval/scr.py); the continuations and the metrics are unchanged, so a retrieval
    method is scored on the same targets as a parametric one.
    """
    plans: list[_RecordPlan] = []
    book = _QueryBook()
    for record in records:
        if not isinstance(record, EditRecord):
            raise TypeError(f"evaluate_records expects EditRecord items, got {type(record).__name__}")
        plans.append(_plan_record(record, book, with_locality=reference is not None))
    prompts = [p for p, _ in book.pairs]
    if prompt_builder is not None:
        distinct = list(dict.fromkeys(prompts))
        built = prompt_builder(distinct)
        if len(built) != len(distinct):
            raise ValueError(f"prompt_builder returned {len(built)} prompts for {len(distinct)}")
        shown = dict(zip(distinct, built))
        prompts = [shown[p] for p in prompts]
    scores = score_continuations(model, tokenizer, prompts, [c for _, c in book.pairs], batch_size, progress=progress)
    rows = [_record_row(plan, scores, reference) for plan in plans]

    metrics: dict[str, float] = {}
    for name in METRIC_ORDER:
        values = [row[name] for row in rows if name in row]
        if values:
            metrics[edit_metric(name)] = _mean(values)
    metrics.update(edit_score(metrics))
    for name in GAP_METRICS:
        values = [row[name] for row in rows if name in row]
        if values:
            metrics[edit_metric(name)] = _mean(values)
    metrics[EVAL_NUM_RECORDS] = float(len(rows))
    return EvalResult(metrics=metrics, per_record=rows)
