"""Padded batches that know where the subject's last token and the answer tokens are.

Positions are found from the fast tokenizer's character offsets of the *whole* string, so they are right however
BPE merges tokens around the subject (re-tokenising pieces separately can disagree with the full string). Padding
follows ``tokenizer.padding_side``; position ids are derived from the attention mask so that left padding does
not shift rotary / learned positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class TokenizationError(ValueError):
    pass


@dataclass
class TextSpan:
    """A text, the character span of its subject, and optionally where an answer continuation starts."""

    text: str
    start: int
    end: int
    answer_start: int | None = None


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    span_last: torch.Tensor  # [B] index (padded coordinates) of the subject's last token
    answer_first: torch.Tensor  # [B] index (padded coordinates) of the first answer token, -1 when no answer
    lengths: torch.Tensor  # [B] number of real tokens

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def to(self, device) -> "EncodedBatch":
        return EncodedBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                      self.span_last, self.answer_first, self.lengths)))


def _last_token_before(offsets: Sequence[tuple[int, int]], end: int, text: str) -> int:
    """Index of the last real token that begins before character ``end`` (special tokens have empty offsets)."""
    candidates = [i for i, (s, e) in enumerate(offsets) if e > s and s < end]
    if not candidates:
        raise TokenizationError(f"no token covers the characters before {end} of {text!r}")
    return candidates[-1]


def _first_token_after(offsets: Sequence[tuple[int, int]], start: int, text: str) -> int:
    """Index of the first real token that ends after character ``start`` (the answer's first token)."""
    candidates = [i for i, (s, e) in enumerate(offsets) if e > s and e > start]
    if not candidates:
        raise TokenizationError(f"no token starts at or after character {start} of {text!r}")
    return candidates[0]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (0 on padding), so a left-padded row gets the positions it would
    have unpadded."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


def encode_spans(tokenizer, spans: Sequence[TextSpan], padding_side: str | None = None) -> EncodedBatch:
    """Tokenise ``spans`` into one padded batch and locate each span's subject last token and answer start."""
    if not getattr(tokenizer, "is_fast", True):
        raise TokenizationError("EditGrid needs a fast tokenizer (character offsets) to locate subject tokens")
    encoded = tokenizer([s.text for s in spans], add_special_tokens=True, return_offsets_mapping=True)
    rows, firsts, lasts = [], [], []
    for span, ids, offsets in zip(spans, encoded["input_ids"], encoded["offset_mapping"]):
        last = _last_token_before(offsets, span.end, span.text)
        first = -1 if span.answer_start is None else _first_token_after(offsets, span.answer_start, span.text)
        if first == 0:
            raise TokenizationError(f"the answer of {span.text!r} starts at its first token; nothing precedes it")
        rows.append(ids)
        firsts.append(first)
        lasts.append(last)
    side = padding_side or tokenizer.padding_side
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    shift = []
    for b, ids in enumerate(rows):
        offset = width - len(ids) if side == "left" else 0
        input_ids[b, offset:offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[b, offset:offset + len(ids)] = 1
        shift.append(offset)
    shift_t = torch.tensor(shift, dtype=torch.long)
    firsts_t = torch.tensor(firsts, dtype=torch.long)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return EncodedBatch(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                        span_last=torch.tensor(lasts, dtype=torch.long) + shift_t,
                        answer_first=torch.where(firsts_t >= 0, firsts_t + shift_t, firsts_t),
                        lengths=mask.sum(dim=1))


def subject_span(template: str, subject: str) -> TextSpan:
    """Fill the single ``{}`` of ``template`` with ``subject`` and return the text with the subject's span."""
    at = template.find("{}")
    if at < 0:
        raise TokenizationError(f"template {template!r} has no '{{}}' for the subject")
    text = template[:at] + subject + template[at + 2:]
    return TextSpan(text=text, start=at, end=at + len(subject))
