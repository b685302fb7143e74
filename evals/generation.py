"""Greedy generation on the in-process model (docs/second_protocol.md), batched with left padding.

``generate_greedy`` works on the model exactly as it is in memory, so an edited model is generated from without
any copy. A reply is cut at the first stop string (newline by default) and stripped; the raw text is kept too.
Rows are sorted by prompt length so that padding stays small; the batch stops as soon as every row has produced
a stop string or ``max_new_tokens`` tokens.

Prompts that begin with the same tokens (SCR's selection prompts share their instruction and worked examples:
144 of their ~226 tokens on SmolLM2; few-shot task prompts likewise) have that prefix's key/value cache computed
once per call; each batch runs only its rows' remaining tokens after it, the padding between the prefix and each
row's own tokens masked, positions counted over real tokens only. The replies are those of the unshared batches
up to summation order (benchmarks/bench_generation.py measures the saving; tests/test_generation.py checks them
equal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from evals.batching import left_padded, model_device
from methods.infra.kv_cache import cache_argument, fork_cache, needs_whole_sequences, with_cache

# A shared prefix shorter than this is run with every row: one extra forward pass and a cache copy per batch cost
# more than the few tokens they save.
MIN_SHARED_PREFIX_TOKENS = 16


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str  # the reply up to (excluding) the first stop string, stripped
    raw: str  # everything generated, special tokens removed
    new_tokens: int


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to the earliest stop string; a stop string at position 0 is skipped over, because a reply that
    starts with a newline ("\\nParis.") would otherwise be empty."""
    body = text.lstrip()
    ends = [i for i in (body.find(s) for s in stop if s) if i > 0]
    return (body[:min(ends)] if ends else body).strip()


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens every sequence has in common, leaving at least one token of each sequence after it
    (the forward that continues from the shared cache needs an input in every row)."""
    if not sequences:
        return 0
    limit = min(len(ids) for ids in sequences) - 1
    first = sequences[0]
    length = 0
    while length < limit and all(ids[length] == first[length] for ids in sequences):
        length += 1
    return max(length, 0)


@torch.inference_mode()
def generate_greedy(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 50,
                    stop: tuple[str, ...] = ("\n",), batch_size: int = 16,
                    progress: str | None = None, share_prefix: bool = True) -> list[Generation]:
    """Greedy continuations of ``prompts`` (in input order), each cut at the first of ``stop``. ``share_prefix``:
    compute the prompts' common leading tokens once (module docstring); False runs every token in every row."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    device = model_device(model)
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[Generation | None] = [None] * len(prompts)
    stop_strings = [s for s in stop if s]
    cache_name = cache_argument(model)
    share_prefix = share_prefix and not needs_whole_sequences(model)  # an editor routes by the whole prompt
    prefix_len = shared_prefix_length(encoded) if share_prefix and len(prompts) > 1 and cache_name else 0
    prefix_len = prefix_len if prefix_len >= MIN_SHARED_PREFIX_TOKENS else 0
    prefix_ids, prefix_cache = None, None
    if prefix_len:
        from transformers import DynamicCache  # noqa: PLC0415

        prefix_ids, prefix_cache = torch.tensor([encoded[0][:prefix_len]], dtype=torch.long), DynamicCache()
        model(input_ids=prefix_ids.to(device), **with_cache(model, prefix_cache))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
        batch = order[start:start + batch_size]
        input_ids, attention_mask = left_padded([encoded[i][prefix_len:] for i in batch], pad_id)
        extra = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
        if prefix_len:
            # [shared prefix | padding | the row's own tokens]: generate runs only what the cache does not hold and
            # counts positions over the mask's ones, so each row sees the positions it has unpadded.
            input_ids = torch.cat([prefix_ids.expand(len(batch), -1), input_ids], dim=1)
            attention_mask = torch.cat([torch.ones((len(batch), prefix_len), dtype=torch.long), attention_mask], 1)
            extra[cache_name] = fork_cache(prefix_cache, torch.zeros(len(batch), dtype=torch.long, device=device))
        width = input_ids.shape[1]
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                num_beams=1, **extra)
        new = output[:, width:].cpu()
        for row, index in enumerate(batch):
            ids = new[row].tolist()
            # Positions after the row's own end (EOS, then padding) are not part of its reply.
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in ids:
                ids = ids[:ids.index(tokenizer.eos_token_id)]
            raw = tokenizer.decode(ids, skip_special_tokens=True)
            results[index] = Generation(prompt=prompts[index], text=cut_at_stop(raw, tuple(stop_strings)), raw=raw,
                                        new_tokens=len(ids))
    return results  # type: ignore[return-value]
