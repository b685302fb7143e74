"""Text the training-based memory editors (WISE, MEMOIR) make with the model itself, once per editor.

Both originals train each edit on the request under 11 *context templates*: the plain prompt ``"{}"`` and the
model's greedy 5- and 10-token continuations of five starters, each followed by the prompt. The greedy continuation
is deterministic, so the templates are the same on every run of the same model.
"""

from __future__ import annotations

import torch

TEMPLATE_STARTERS = ("I", "You", "Because", "Yes", "Q: ")
TEMPLATE_LENGTHS = (5, 10)


def greedy_continuations(model, tokenizer, starters, length: int) -> list[str]:
    """Each starter followed by the model's greedy ``length``-token continuation, on one line, without braces
    (the texts become ``str.format`` templates)."""
    return greedy_continuations_at(model, tokenizer, starters, (length,))[0]


def greedy_continuations_at(model, tokenizer, starters, lengths) -> list[list[str]]:
    """``greedy_continuations`` at several lengths from one generation of the longest: a greedy continuation's
    first n tokens are the n-token greedy continuation. One list of texts per length, in the order given."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(starters), return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=max(lengths),
                             pad_token_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    texts = [tokenizer.batch_decode(out[:, :width + length], skip_special_tokens=True) for length in lengths]
    return [[" ".join(t.replace("{", " ").replace("}", " ").split()) for t in group] for group in texts]


def context_templates(model, tokenizer) -> list[str]:
    """``"{}"`` and the 10 ``"<continuation> {}"`` templates."""
    groups = greedy_continuations_at(model, tokenizer, TEMPLATE_STARTERS, TEMPLATE_LENGTHS)
    return ["{}"] + [f"{text} {{}}" for group in groups for text in group]
