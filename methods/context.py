"""Context templates (ROME/MEMIT; docs/methods.md): short model-generated prefixes that make keys and targets robust to
what precedes the prompt. Generated once per model and trial with a fixed seed."""

from __future__ import annotations

import torch

DEFAULT_STARTERS = ("The", "Therefore", "Because", "I", "You")


def generate_context_templates(model, tokenizer, seed: int = 0, starters=DEFAULT_STARTERS, length: int = 10,
                               top_k: int = 5) -> list[list[str]]:
    """``[["{}"], [g1 + ". {}", …]]`` with one continuation of ``length`` tokens (top-k sampling) per starter."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    try:
        batch = tokenizer(list(starters), return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    new_tokens = max(1, length - batch["input_ids"].shape[1])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, top_k=top_k, max_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, temperature=1.0, top_p=1.0)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    # Braces would clash with the "{}" placeholder; newlines would split the prompt from its context.
    cleaned = [" ".join(t.replace("{", " ").replace("}", " ").split()) for t in texts]
    return [["{}"], [c + ". {}" for c in cleaned]]


def flatten_templates(groups: list[list[str]]) -> tuple[list[str], list[int]]:
    """All templates in one list, and the group index of each (keys are averaged within, then across groups)."""
    flat, group_of = [], []
    for g, group in enumerate(groups):
        for template in group:
            flat.append(template)
            group_of.append(g)
    return flat, group_of
