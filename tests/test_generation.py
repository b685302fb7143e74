"""Greedy batched generation with left padding (evals/generation.py) on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from evals.generation import cut_at_stop, generate_greedy

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
