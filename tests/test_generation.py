"""Greedy batched generation with left padding (evals/generation.py) on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from evals.generation import MIN_SHARED_PREFIX_TOKENS, cut_at_stop, generate_greedy, shared_prefix_length

PROMPTS = ["The capital of France is", "Hello", "A much longer prompt about the mother tongue of Danielle Darrieux"]


def _one_by_one(model, tokenizer, prompt, max_new_tokens):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, -max_new_tokens:].tolist()


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_llama, smol_tokenizer):
    generations = generate_greedy(tiny_llama, smol_tokenizer, PROMPTS, max_new_tokens=6, stop=(), batch_size=3)
    for prompt, generation in zip(PROMPTS, generations):
        expected = _one_by_one(tiny_llama, smol_tokenizer, prompt, 6)
        assert generation.prompt == prompt
        if smol_tokenizer.eos_token_id in expected:
            expected = expected[:expected.index(smol_tokenizer.eos_token_id)]
        assert generation.raw == smol_tokenizer.decode(expected, skip_special_tokens=True)
        assert generation.new_tokens == len(expected)


def test_batch_size_does_not_change_the_generations(tiny_llama, smol_tokenizer):
    one = generate_greedy(tiny_llama, smol_tokenizer, PROMPTS, max_new_tokens=5, stop=(), batch_size=1)
    three = generate_greedy(tiny_llama, smol_tokenizer, PROMPTS, max_new_tokens=5, stop=(), batch_size=3)
    assert [g.raw for g in one] == [g.raw for g in three]


# Few-shot prompts: the same instruction and examples, then questions of different lengths (so a batch pads between
# the shared prefix and each row's own tokens).
SHARED = ("Answer with one word.\nQ: What is the capital of Norway? A: Oslo\nQ: Which river flows through Vienna? "
          "A: Danube\nQ: ")
FEW_SHOT = [SHARED + q for q in ("Where was Marie Curie born? A:", "Capital of France? A:",
                                 "What language did the people of ancient Rome mostly speak at home? A:")]


@pytest.mark.parametrize("sequences, expected", [
    ([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]], 2),
    ([[1, 2, 3], [1, 2, 3, 4]], 2),  # the shorter one keeps its last token
    ([[7, 8], [9, 8]], 0),
    ([[5, 6, 7]], 2),
    ([], 0),
])
def test_shared_prefix_length(sequences, expected):
    assert shared_prefix_length(sequences) == expected


def test_a_shared_prefix_is_run_once_and_changes_no_generation(tiny_llama, smol_tokenizer):
    encoded = [smol_tokenizer(p)["input_ids"] for p in FEW_SHOT]
    prefix = shared_prefix_length(encoded)
    assert prefix >= MIN_SHARED_PREFIX_TOKENS
    widths: list[int] = []
    hook = tiny_llama.model.embed_tokens.register_forward_hook(lambda m, inputs, out: widths.append(inputs[0].shape[1]))
    try:
        shared = generate_greedy(tiny_llama, smol_tokenizer, FEW_SHOT, max_new_tokens=5, stop=(), batch_size=2)
    finally:
        hook.remove()
    # the prefix alone once, then per batch only the rows' own tokens (longest first), then one token per step
    own = sorted((len(ids) - prefix for ids in encoded), reverse=True)
    assert widths[0] == prefix
    assert widths[1] == max(own[:2]) and widths.count(own[2]) >= 1 and max(widths[1:]) < min(map(len, encoded))
    unshared = generate_greedy(tiny_llama, smol_tokenizer, FEW_SHOT, max_new_tokens=5, stop=(), batch_size=2,
                               share_prefix=False)
    assert [g.raw for g in shared] == [g.raw for g in unshared]
    for prompt, generation in zip(FEW_SHOT, shared):
        expected = _one_by_one(tiny_llama, smol_tokenizer, prompt, 5)
        if smol_tokenizer.eos_token_id in expected:
            expected = expected[:expected.index(smol_tokenizer.eos_token_id)]
        assert generation.raw == smol_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("raw, stop, expected", [
    ("Paris.\nThe next line", ("\n",), "Paris."),
    (" Paris. It is big", ("\n", "."), "Paris"),
    ("\nParis\nmore", ("\n",), "Paris"),  # a reply that starts with the stop string is not empty
    ("no stop here", ("\n",), "no stop here"),
    ("  spaced  ", (), "spaced"),
])
def test_cut_at_stop(raw, stop, expected):
    assert cut_at_stop(raw, stop) == expected


def test_bad_arguments(tiny_llama, smol_tokenizer):
    assert generate_greedy(tiny_llama, smol_tokenizer, []) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(tiny_llama, smol_tokenizer, ["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        generate_greedy(tiny_llama, smol_tokenizer, ["x"], batch_size=0)


@pytest.mark.slow
def test_smollm2_completes_a_known_fact(smollm2):
    (generation,) = generate_greedy(smollm2.model, smollm2.tokenizer, ["The capital of France is"],
                                    max_new_tokens=10, stop=("\n", "."))
    assert generation.text.startswith("Paris")
