"""Second-moment statistics C = E[k kᵀ] of the MLP keys (docs/methods.md, "Shared locate-then-edit
machinery"), cached on disk per layer.

k is the input of a layer's MLP output projection; the mean runs over every non-pad token of the corpus text.
All requested layers are measured in one pass over the corpus, and each forward pass stops right after the
deepest requested layer's keys were read (the layers above it are never run). A document that occurs more
than once is run once, its keys weighted by its count, and key rows are gathered into full buffers before
each Gram product (GramAccumulator).

Cache: one entry per layer, ``<cache_dir>/stats/<key>.pt`` (``torch.save`` of {"moment", "tokens",
"description"}) plus ``<key>.json`` describing it for humans. The key hashes everything the numbers depend on: the
caller's model key (id + weights fingerprint), the weights' dtype, layer, module path, corpus identity, token
count, truncation length, accumulation dtype and a lowered forward dtype if one is set. The batch size is left
out: it does not change the result. Missing layers are computed while holding every missing entry's lock (taken
in a fixed order), so two processes asking for the same statistics never compute them twice: the second waits,
then reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from methods.infra.arch import EditableModel
from methods.infra.cache import content_key, default_cache_dir
from methods.corpus import CorpusSpec, corpus_identity, iter_corpus_texts

STATS_VERSION = 1  # bump when the computation changes in a way that changes the numbers
ACCUMULATE_DTYPES = {torch.float64: "float64", torch.float32: "float32"}
# A forward pass in lower precision than the weights (autocast; the Gram and its sum stay float32/float64). On the
# 2-core CPU VM bfloat16 is 1.7× faster (AMD host; 2× with the Intel host's AMX) and moves C by 0.2–0.5 %
# (relative Frobenius), far below the 30 % by which C differs between two disjoint 32k-token halves of the
# reference corpus: an opt-in, never a default.
FORWARD_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
FORWARD_DTYPE_BY_NAME = {name: dtype for dtype, name in FORWARD_DTYPES.items()}
TOKENIZE_GROUP = 64  # texts tokenized per tokenizer call (fast tokenizers are much quicker on lists)


class StatsError(ValueError):
    """Bad arguments for the statistics, or a cache entry that does not match its key."""


class _DeepestLayerDone(Exception):
    """Raised from the deepest requested layer's hook: the rest of the forward pass is not needed."""


@dataclass
class StatsResult:
    """Per-layer C (m×m, on CPU, in the accumulation dtype: float64 by default; callers cast as they need).

    ``tokens``: non-pad tokens averaged over. ``seconds``: time spent computing in this call (reading or sampling
    the corpus included; ~0 when every layer came from the cache), of which ``corpus_seconds`` went to the corpus.
    ``corpus``: the corpus identity that entered the cache keys. ``paths``: the cache file of each layer.
    ``tokens_run``: tokens put through the model in this call (fewer than ``tokens`` when documents repeat, since
    each distinct document runs once; 0 when every layer came from the cache).
    """

    moments: dict[int, torch.Tensor]
    tokens: int
    seconds: float
    from_cache: dict[int, bool]
    corpus: dict
    corpus_seconds: float = 0.0
    paths: dict[int, Path] = field(default_factory=dict)
    tokens_run: int = 0


def stats_description(editable: EditableModel, layer: int, corpus: dict, model_key: str, num_tokens: int,
                      max_length: int, accumulate_dtype: torch.dtype, forward_dtype: torch.dtype | None = None) -> dict:
    """Everything one layer's C depends on; its hash is the cache key (forward_dtype only when set, so entries
    computed at the weights' precision keep their keys)."""
    lowered = {"forward_dtype": FORWARD_DTYPES[forward_dtype]} if forward_dtype is not None else {}
    return {**lowered, "what": "second moment E[k k^T] at the MLP output projection's input", "version": STATS_VERSION,
            "model": model_key, "weights_dtype": str(next(editable.model.parameters()).dtype).replace("torch.", ""),
            "layer": int(layer), "module": editable.mlp_out_name(layer), "corpus": corpus,
            "num_tokens": int(num_tokens), "max_length": int(max_length),
            "accumulate_dtype": ACCUMULATE_DTYPES[accumulate_dtype]}


def second_moments(editable: EditableModel, tokenizer, layers: Iterable[int], corpus: CorpusSpec, num_tokens: int,
                   model_key: str, cache_dir: Path | None = None, batch_tokens: int = 4096, max_length: int = 256,
                   accumulate_dtype: torch.dtype = torch.float64, progress: bool = True, corpus_seed: int = 0,
                   forward_dtype: torch.dtype | None = None) -> StatsResult:
    """C = E[k kᵀ] per requested layer, from the cache where present, the rest computed in one corpus pass.

    ``num_tokens`` tokens are read from the start of the corpus (documents truncated to ``max_length`` tokens, the
    last one cut so the count is exact; fewer, with a warning, if the corpus is shorter). Batches hold documents
    of one length, at most ``batch_tokens`` tokens each (a single longer document gets a batch of its own).
    ``forward_dtype`` (bfloat16/float16; None = the weights' dtype) runs the forward pass under autocast.
    """
    layers = sorted({int(layer) for layer in layers})
    _check_arguments(editable, layers, num_tokens, batch_tokens, max_length, accumulate_dtype, forward_dtype,
                     model_key)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stats_dir = cache_root / "stats"
    identity = corpus_identity(corpus, model_fingerprint=model_key, seed=corpus_seed)
    descriptions = {layer: stats_description(editable, layer, identity, model_key, num_tokens, max_length,
                                             accumulate_dtype, forward_dtype) for layer in layers}
    paths = {layer: stats_dir / f"{content_key(descriptions[layer])}.pt" for layer in layers}

    moments, tokens_by_layer, from_cache = {}, {}, {}
    seconds = corpus_seconds = 0.0
    tokens_run = 0

    def load_present(candidates):
        for layer in candidates:
            if paths[layer].exists():
                moments[layer], tokens_by_layer[layer] = _load_entry(paths[layer], descriptions[layer])
                from_cache[layer] = True

    load_present(layers)
    missing = [layer for layer in layers if layer not in moments]
    if missing:
        stats_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as locks:
            # A fixed global order (by path) keeps two processes with overlapping layer sets from deadlocking.
            for layer in sorted(missing, key=lambda layer: str(paths[layer])):
                locks.enter_context(FileLock(str(paths[layer]) + ".lock"))
            load_present(missing)  # another process may have built some while we waited
            missing = [layer for layer in missing if layer not in moments]
            if missing:
                started = time.perf_counter()
                computed, tokens, tokens_run, corpus_seconds = _compute(
                    editable, tokenizer, missing, corpus, num_tokens, model_key, cache_root, corpus_seed,
                    batch_tokens, max_length, accumulate_dtype, progress, forward_dtype)
                seconds = time.perf_counter() - started
                for layer in missing:
                    _save_entry(paths[layer], computed[layer], tokens, descriptions[layer], corpus.source, seconds)
                    moments[layer], tokens_by_layer[layer] = computed[layer], tokens
                    from_cache[layer] = False

    token_counts = set(tokens_by_layer.values())
    if len(token_counts) > 1:
        warnings.warn(f"second-moment cache entries for layers {layers} were averaged over different token counts "
                      f"{tokens_by_layer}; the corpus changed between runs")
    return StatsResult(moments={layer: moments[layer] for layer in layers}, tokens=max(token_counts),
                       seconds=seconds, from_cache={layer: from_cache[layer] for layer in layers}, corpus=identity,
                       corpus_seconds=corpus_seconds, paths=paths, tokens_run=tokens_run)


def _check_arguments(editable, layers, num_tokens, batch_tokens, max_length, accumulate_dtype, forward_dtype,
                     model_key):
    if not layers:
        raise StatsError("second_moments needs at least one layer")
    bad = [layer for layer in layers if not 0 <= layer < editable.num_layers]
    if bad:
        raise StatsError(f"layers {bad} are out of range: the model has {editable.num_layers} layers")
    for name, value in (("num_tokens", num_tokens), ("batch_tokens", batch_tokens), ("max_length", max_length)):
        if not isinstance(value, int) or value < 1:
            raise StatsError(f"{name} must be a positive integer, got {value!r}")
    if accumulate_dtype not in ACCUMULATE_DTYPES:
        raise StatsError(f"accumulate_dtype must be one of {list(ACCUMULATE_DTYPES.values())}, got {accumulate_dtype}")
    if forward_dtype is not None and forward_dtype not in FORWARD_DTYPES:
        raise StatsError(f"forward_dtype must be None or one of {list(FORWARD_DTYPES.values())}, got {forward_dtype}")
    if not model_key:
        raise StatsError("model_key (model id + weights fingerprint) must be non-empty: it keys the cache")


def _load_entry(path: Path, description: dict) -> tuple[torch.Tensor, int]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("description") != json.loads(json.dumps(description, default=str)):
        raise StatsError(f"statistics cache entry {path} was written for another description; delete it")
    return payload["moment"], int(payload["tokens"])


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _save_entry(path: Path, moment: torch.Tensor, tokens: int, description: dict, corpus_source: str,
                seconds: float) -> None:
    portable = json.loads(json.dumps(description, default=str))
    sidecar = {"description": portable, "tokens": tokens, "corpus_source": corpus_source,
               "compute_seconds": round(seconds, 3), "built_by_pid": os.getpid(),
               "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "trace": float(moment.trace())}
    # Sidecar first: whenever the .pt exists (the readers' signal), its description is there too.
    _atomic_write(path.with_suffix(".json"),
                  lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True), encoding="utf-8"))
    _atomic_write(path, lambda tmp: torch.save({"moment": moment, "tokens": tokens, "description": portable}, tmp))


# --- the computation -------------------------------------------------------------------------------------------


def collect_token_sequences(texts: Iterator[str], tokenizer, num_tokens: int, max_length: int,
                            progress: bool = True) -> list[list[int]]:
    """Token ids of the corpus' first documents, each truncated to ``max_length``, ``num_tokens`` in total."""
    sequences, total = [], 0
    bar = tqdm(total=num_tokens, desc="reading statistics corpus", unit="tok", disable=not progress, leave=False)
    try:
        group: list[str] = []
        for text in texts:
            group.append(text)
            if len(group) < TOKENIZE_GROUP:
                continue
            total = _add_tokenized(group, tokenizer, max_length, num_tokens, sequences, total, bar)
            group = []
            if total >= num_tokens:
                break
        if group and total < num_tokens:
            total = _add_tokenized(group, tokenizer, max_length, num_tokens, sequences, total, bar)
    finally:
        bar.close()
    return sequences


def _add_tokenized(group, tokenizer, max_length, num_tokens, sequences, total, bar) -> int:
    for ids in tokenizer(group, truncation=True, max_length=max_length)["input_ids"]:
        ids = list(ids[:num_tokens - total])  # the last document is cut so that the count is exact
        if ids:
            sequences.append(ids)
            total += len(ids)
            bar.update(len(ids))
        if total >= num_tokens:
            break
    return total


def pack_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of documents of one length each, at most ``batch_tokens`` tokens per batch.

    Equal lengths mean no padding at all: no wasted tokens, and an all-ones mask lets the model take its plain
    causal attention path (8 % faster on the statistics corpus than length-sorted padded batches). Longest first,
    so a memory problem shows at once.
    """
    by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(length, []).append(index)
    batches = []
    for length in sorted(by_length, reverse=True):
        indices = by_length[length]
        per_batch = max(1, batch_tokens // max(length, 1))
        batches.extend(indices[start:start + per_batch] for start in range(0, len(indices), per_batch))
    return batches


def _first_tensor(args, kwargs) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise StatsError("the MLP output projection was called without a tensor input")


GRAM_BUFFER_ROWS = 4096  # key rows per Gram product (GramAccumulator): enough to run the GEMM at full speed
GRAM_BLOCKS = 4  # column blocks of the Gram's upper block-triangle: (k+1)/2k of a full GEMM's FLOPs


def add_gram_upper(total: torch.Tensor, rows: torch.Tensor) -> None:
    """``total += XᵀX`` on and above the diagonal only, for a float32 [tokens, m] batch X.

    C is symmetric, so each block-row i of XᵀX is formed only from column block i rightwards: with 4 blocks that
    is 62.5 % of a full GEMM's FLOPs (measured 64 vs 100 ms for 4096×1536 here; the Gram is ~30 % of a
    statistics pass). Each block product is float32 (≤ batch_tokens terms) and is added in ``total``'s dtype.
    BLAS syrk would halve the FLOPs but, called through scipy, its OpenBLAS threads fight torch's OpenMP threads.
    """
    width = rows.shape[1]
    step = -(-width // GRAM_BLOCKS)
    for begin in range(0, width, step):
        end = min(begin + step, width)
        total[begin:end, begin:] += (rows[:, begin:end].T @ rows[:, begin:]).to(total.dtype)


def upper_to_full(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) ``matrix`` holds."""
    return matrix.triu() + matrix.triu(1).T


class GramAccumulator:
    """Σ w·k kᵀ over streamed key rows k (row weights w ≥ 0), kept as an upper triangle in the accumulation dtype.

    Rows are first copied into a float32 buffer of ``buffer_rows`` rows, and the Gram product runs when it is full.
    A statistics batch holds documents of a single length, so a rare length or a long document makes a batch of a
    few hundred rows; multiplied alone, such a batch runs the GEMM well below its speed and pays the float64 add
    over the whole upper triangle each time (on the reference corpus: 286 batches, of which 171 have ≤ 1,024 rows).
    A weight w enters as √w on its row, so that (√w k)(√w k)ᵀ = w k kᵀ.
    """

    def __init__(self, width: int, accumulate_dtype: torch.dtype, device: torch.device | str, buffer_rows: int):
        self.total = torch.zeros(width, width, dtype=accumulate_dtype, device=device)
        self._buffer = torch.empty(max(1, buffer_rows), width, dtype=torch.float32, device=device)
        self._filled = 0

    def add(self, rows: torch.Tensor, row_scales: torch.Tensor | None = None) -> None:
        """Adds ``rows`` [n, width] (any float dtype or device), each multiplied by ``row_scales`` [n] if given."""
        start = 0
        while start < rows.shape[0]:
            take = min(rows.shape[0] - start, self._buffer.shape[0] - self._filled)
            target = self._buffer[self._filled:self._filled + take]
            chunk = rows[start:start + take]
            if row_scales is None:
                target.copy_(chunk)
            else:
                torch.mul(chunk.to(target.device, torch.float32),
                          row_scales[start:start + take, None].to(target.device, torch.float32), out=target)
            self._filled += take
            start += take
            if self._filled == self._buffer.shape[0]:
                self._multiply_buffer()

    def _multiply_buffer(self) -> None:
        if self._filled:
            add_gram_upper(self.total, self._buffer[:self._filled])
            self._filled = 0

    def mean(self, count: int) -> torch.Tensor:
        """The full symmetric Σ w·k kᵀ / count (multiplies what is still buffered first)."""
        self._multiply_buffer()
        return upper_to_full(self.total / count)


def count_repeats(sequences: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Each distinct token sequence once (in first-seen order), with how often it occurs.

    A causal model gives a document's tokens the same keys wherever the document occurs, so a repeated document
    is run once and its keys weighted by its count: the same sum, fewer forward passes (the reference corpus
    repeats 3 % of its text, GLUE sentences that several tasks share).
    """
    index_of: dict[tuple[int, ...], int] = {}
    unique, counts = [], []
    for ids in sequences:
        key = tuple(ids)
        if key in index_of:
            counts[index_of[key]] += 1
        else:
            index_of[key] = len(unique)
            unique.append(ids)
            counts.append(1)
    return unique, counts


def _compute(editable, tokenizer, layers, corpus, num_tokens, model_key, cache_root, corpus_seed, batch_tokens,
             max_length, accumulate_dtype, progress, forward_dtype=None):
    model = editable.model
    device = editable.parameter_device()
    corpus_started = time.perf_counter()
    texts = iter_corpus_texts(corpus, model=model, tokenizer=tokenizer, seed=corpus_seed,
                              model_fingerprint=model_key, cache_dir=cache_root, progress=progress)
    sequences = collect_token_sequences(texts, tokenizer, num_tokens, max_length, progress)
    corpus_seconds = time.perf_counter() - corpus_started
    tokens = sum(len(ids) for ids in sequences)
    if tokens == 0:
        raise StatsError(f"corpus {corpus.source!r} yielded no tokens")
    if tokens < num_tokens:
        warnings.warn(f"corpus {corpus.source!r} holds only {tokens} tokens (at max_length {max_length}); "
                      f"the statistics average over those instead of the {num_tokens} asked for")
    sequences, counts = count_repeats(sequences)

    # Each sum lives beside its layer's weights (a model split over devices keeps its keys where they are).
    grams = {layer: GramAccumulator(editable.key_dim(layer), accumulate_dtype, editable.mlp_out(layer).weight.device,
                                    buffer_rows=GRAM_BUFFER_ROWS) for layer in layers}
    deepest = max(layers)
    batch_row_scales: list[torch.Tensor | None] = [None]  # √count per key row of the batch running now

    def make_hook(layer):
        def hook(module, args, kwargs):
            keys = _first_tensor(args, kwargs)  # batches have no padding: every position is a corpus token
            # Gram products in float32 (≤ GRAM_BUFFER_ROWS terms each, relative error ~1e-6), added to a running sum
            # in the accumulation dtype: float64 accuracy over the corpus at float32 GEMM speed (~3× float64's).
            grams[layer].add(keys.reshape(-1, keys.shape[-1]), batch_row_scales[0])
            if layer == deepest:
                raise _DeepestLayerDone
        return hook

    handles = [editable.mlp_out(layer).register_forward_pre_hook(make_hook(layer), with_kwargs=True)
               for layer in layers]
    was_training = model.training
    model.eval()  # dropout (GPT-2) would otherwise perturb the keys
    bar = tqdm(total=tokens, desc=f"second moments, layers {layers}", unit="tok", disable=not progress)
    try:
        lowered = torch.autocast(torch.device(device).type, dtype=forward_dtype, enabled=forward_dtype is not None)
        with torch.inference_mode(), lowered:
            for batch in pack_batches([len(ids) for ids in sequences], batch_tokens):
                input_ids = torch.tensor([sequences[i] for i in batch], dtype=torch.long, device=device)
                batch_counts = [counts[i] for i in batch]
                batch_row_scales[0] = (None if max(batch_counts) == 1 else
                                       torch.tensor(batch_counts, dtype=torch.float64).sqrt().float()
                                       .repeat_interleave(input_ids.shape[1]))
                try:
                    model(input_ids=input_ids, use_cache=False)
                except _DeepestLayerDone:
                    pass
                else:
                    raise StatsError(f"the forward pass never reached {editable.mlp_out_name(deepest)}")
                bar.update(sum(batch_counts) * input_ids.shape[1])
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    moments = {layer: grams[layer].mean(tokens).cpu() for layer in layers}
    return moments, tokens, sum(len(ids) for ids in sequences), corpus_seconds
