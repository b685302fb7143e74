"""Teacher-forced scoring and the edit metrics built on it (evals/teacher_forced.py)."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch

from evals.records import EditRecord, PromptCase
from evals.teacher_forced import (
    PreEditReference,
    compute_reference,
    evaluate_records,
    score_continuations,
)

PROMPTS = [
    "The capital of France is",
    "Hi",
    "The Eiffel Tower stands in the middle of a city called",
    "The capital of France is ",  # ends with a space: the continuation token straddles the boundary
]
CONTINUATIONS = [" Paris", " there, my old friend", " Paris, France.", "Paris"]


def _unbatched_scores(model, tokenizer, prompt: str, continuation: str, n_continuation_tokens: int):
    """Straightforward reference: one unpadded sequence, full logits, log-softmax at the predicting positions."""
    ids = tokenizer(prompt + continuation)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    start = len(ids) - n_continuation_tokens
    targets = ids[start:]
    token_log_probs = [log_probs[p - 1, t].item() for p, t in zip(range(start, len(ids)), targets)]
    argmax_ids = [logits[p - 1].argmax().item() for p in range(start, len(ids))]
    return targets, token_log_probs, argmax_ids


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_unbatched_reference(request, monkeypatch, smol_tokenizer, model_name, padding_side, batch_size):
    model = request.getfixturevalue(model_name)
    monkeypatch.setattr(smol_tokenizer, "padding_side", padding_side)
    scores = score_continuations(model, smol_tokenizer, PROMPTS, CONTINUATIONS, batch_size=batch_size)
    assert len(scores) == len(PROMPTS)
    for score, prompt, continuation in zip(scores, PROMPTS, CONTINUATIONS):
        assert (score.prompt, score.continuation) == (prompt, continuation)
        targets, log_probs, argmax_ids = _unbatched_scores(model, smol_tokenizer, prompt, continuation,
                                                           len(score.token_ids))
        assert list(score.token_ids) == targets
        assert score.token_logprobs == pytest.approx(log_probs, abs=1e-4)
        assert score.mean_nll == pytest.approx(-sum(log_probs) / len(log_probs), abs=1e-4)
        assert list(score.argmax_ids) == argmax_ids
        assert list(score.is_argmax) == [a == t for a, t in zip(argmax_ids, targets)]


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_padding_side_does_not_change_numbers(request, monkeypatch, smol_tokenizer, model_name):
    model = request.getfixturevalue(model_name)
    results = {}
    for side in ("left", "right"):
        monkeypatch.setattr(smol_tokenizer, "padding_side", side)
        results[side] = score_continuations(model, smol_tokenizer, PROMPTS, CONTINUATIONS, batch_size=4)
    for left, right in zip(results["left"], results["right"]):
        assert left.token_ids == right.token_ids
        assert left.token_logprobs == pytest.approx(right.token_logprobs, abs=1e-5)
        assert left.argmax_ids == right.argmax_ids


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: the scorer must slice full logits itself."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


def test_models_without_logits_to_keep(tiny_llama, smol_tokenizer):
    direct = score_continuations(tiny_llama, smol_tokenizer, PROMPTS, CONTINUATIONS, batch_size=4)
    wrapped = score_continuations(_NoLogitsToKeep(tiny_llama), smol_tokenizer, PROMPTS, CONTINUATIONS, batch_size=4)
    for a, b in zip(direct, wrapped):
        assert a.token_ids == b.token_ids and a.argmax_ids == b.argmax_ids
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)


def test_continuation_tokens_found_in_context(tiny_llama, smol_tokenizer):
    paris = smol_tokenizer(" Paris")["input_ids"]
    without_space, with_space, long_tail = score_continuations(
        tiny_llama, smol_tokenizer,
        ["The capital of France is", "The capital of France is ", "Hi"],
        [" Paris", "Paris", " there, my old friend"])
    # Either way the continuation is the single token " Paris", predicted from the same prompt tokens.
    assert list(without_space.token_ids) == paris
    assert list(with_space.token_ids) == paris
    assert with_space.token_logprobs == pytest.approx(without_space.token_logprobs, abs=1e-6)
    assert smol_tokenizer.decode(list(long_tail.token_ids)) == " there, my old friend"


def test_empty_and_bad_inputs(tiny_llama, smol_tokenizer):
    assert score_continuations(tiny_llama, smol_tokenizer, [], []) == []
    with pytest.raises(ValueError, match="prompts but"):
        score_continuations(tiny_llama, smol_tokenizer, ["a"], [" b", " c"])
    with pytest.raises(ValueError, match="empty continuation"):
        score_continuations(tiny_llama, smol_tokenizer, ["a"], [""])
    with pytest.raises(ValueError, match="precedes"):
        score_continuations(tiny_llama, smol_tokenizer, [""], ["Paris"])  # SmolLM2 adds no BOS
    with pytest.raises(ValueError, match="batch_size"):
        score_continuations(tiny_llama, smol_tokenizer, ["a"], [" b"], batch_size=0)


# ----------------------------------------------------------------------------------------------------------------
# evaluate_records
# ----------------------------------------------------------------------------------------------------------------

def _counterfact_record(case_id: str = "cf-1") -> EditRecord:
    return EditRecord(
        case_id=case_id, source="counterfact", protocol="probability",
        prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
        target_new="English", target_true="French",
        paraphrase_prompts=("Danielle Darrieux grew up speaking", "Where Danielle Darrieux is from, people speak"),
        neighborhood=(PromptCase("Michel Rocard is a native speaker of", ("French",)),
                      PromptCase("The native language of Jean Gabin is", ("French",))),
    )


def _zsre_record(case_id: str = "zsre-1") -> EditRecord:
    return EditRecord(
        case_id=case_id, source="knowedit-zsre", protocol="token_accuracy",
        prompt="Which river does the Danube flow into?", subject="Danube", target_new="the North Sea",
        paraphrase_prompts=("Into which body of water does the Danube empty?",),
        neighborhood=(PromptCase("Who wrote Hamlet?", ("William Shakespeare", "Shakespeare")),),
        portability={
            "reasoning": (PromptCase("Which sea does the Danube reach?", ("North Sea", "the North Sea")),
                          PromptCase("Is the Danube's mouth in the Baltic?", ("no",))),
            "subject_aliasing": (PromptCase("Into what does the Donau flow?", ("the North Sea",)),),
        },
        locality={
            "relation_specificity": (PromptCase("The Danube's length is", ("2850 km",)),
                                     PromptCase("The Danube flows through", ("Vienna",))),
            "forgetfulness": (PromptCase("Who painted the Mona Lisa?", ("Leonardo da Vinci",)),),
        },
    )


def _score_of(model, tokenizer, prompt: str, continuation: str):
    return score_continuations(model, tokenizer, [prompt], [continuation])[0]


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_probability_protocol_matches_hand_computation(request, smol_tokenizer, model_name):
    model = request.getfixturevalue(model_name)
    record = _counterfact_record()
    result = evaluate_records(model, smol_tokenizer, [record], batch_size=5)

    def nll_pair(prompt):
        return (_score_of(model, smol_tokenizer, prompt, " English").mean_nll,
                _score_of(model, smol_tokenizer, prompt, " French").mean_nll)

    rewrite_new, rewrite_true = nll_pair(record.prompt)
    paraphrases = [nll_pair(p) for p in record.paraphrase_prompts]
    neighbours = [nll_pair(case.prompt) for case in record.neighborhood]
    expected = {
        "edit/efficacy": float(rewrite_new < rewrite_true),
        "edit/generalization": sum(new < true for new, true in paraphrases) / len(paraphrases),
        "edit/specificity": sum(true < new for new, true in neighbours) / len(neighbours),
        "edit/efficacy_prob_gap": math.exp(-rewrite_new) - math.exp(-rewrite_true),
        "edit/generalization_prob_gap": sum(math.exp(-n) - math.exp(-t) for n, t in paraphrases) / len(paraphrases),
        "edit/specificity_prob_gap": sum(math.exp(-t) - math.exp(-n) for n, t in neighbours) / len(neighbours),
        "eval/num_records": 1.0,
    }
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-6), name
    parts = [expected[f"edit/{n}"] for n in ("efficacy", "generalization", "specificity")]
    expected_score = 0.0 if min(parts) == 0 else 3 / sum(1 / p for p in parts)
    assert result.metrics["edit/score"] == pytest.approx(expected_score)
    # CounterFact records carry no locality/portability: those metrics are omitted, not zero.
    assert "edit/locality" not in result.metrics and "edit/portability" not in result.metrics
    row = result.per_record[0]
    assert row["case_id"] == "cf-1"
    assert row["p_new"] == pytest.approx(math.exp(-rewrite_new), rel=1e-5)
    assert row["p_true"] == pytest.approx(math.exp(-rewrite_true), rel=1e-5)


def test_probability_efficacy_follows_the_preferred_target(tiny_llama, smol_tokenizer):
    prompt = "The mother tongue of Danielle Darrieux is"
    english = _score_of(tiny_llama, smol_tokenizer, prompt, " English").mean_nll
    french = _score_of(tiny_llama, smol_tokenizer, prompt, " French").mean_nll
    preferred, other = ("English", "French") if english < french else ("French", "English")
    towards = EditRecord(case_id="a", source="builtin", protocol="probability", prompt=prompt,
                         subject="Danielle Darrieux", target_new=preferred, target_true=other)
    away = EditRecord(case_id="b", source="builtin", protocol="probability", prompt=prompt,
                      subject="Danielle Darrieux", target_new=other, target_true=preferred)
    assert evaluate_records(tiny_llama, smol_tokenizer, [towards]).metrics["edit/efficacy"] == 1.0
    assert evaluate_records(tiny_llama, smol_tokenizer, [away]).metrics["edit/efficacy"] == 0.0
    both = evaluate_records(tiny_llama, smol_tokenizer, [towards, away])
    assert both.metrics["edit/efficacy"] == 0.5
    assert [row["efficacy"] for row in both.per_record] == [1.0, 0.0]
    # No paraphrases or neighbours: generalization, specificity and the score are omitted.
    assert set(both.metrics) == {"edit/efficacy", "edit/efficacy_prob_gap", "eval/num_records"}


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_token_accuracy_protocol_matches_hand_computation(request, smol_tokenizer, model_name):
    model = request.getfixturevalue(model_name)
    record = _zsre_record()
    result = evaluate_records(model, smol_tokenizer, [record], batch_size=4)

    def accuracy(prompt, answer):
        return _score_of(model, smol_tokenizer, prompt, " " + answer).token_accuracy

    reasoning = [max(accuracy(c.prompt, a) for a in c.answers) for c in record.portability["reasoning"]]
    aliasing = [max(accuracy(c.prompt, a) for a in c.answers) for c in record.portability["subject_aliasing"]]
    expected = {
        "edit/efficacy": accuracy(record.prompt, "the North Sea"),
        "edit/generalization": accuracy(record.paraphrase_prompts[0], "the North Sea"),
        "edit/specificity": accuracy("Who wrote Hamlet?", "William Shakespeare"),
        "edit/portability": (sum(reasoning) / 2 + sum(aliasing) / 1) / 2,
    }
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-9), name
    parts = [expected[f"edit/{n}"] for n in ("efficacy", "generalization", "specificity")]
    expected_score = 0.0 if min(parts) == 0 else 3 / sum(1 / p for p in parts)
    assert result.metrics["edit/score"] == pytest.approx(expected_score)
    # No reference: locality is not reported; token accuracy has no probability gaps.
    assert "edit/locality" not in result.metrics
    assert not any(name.endswith("_prob_gap") for name in result.metrics)


def test_token_accuracy_is_one_on_the_models_own_greedy_answer(tiny_llama, smol_tokenizer):
    prompt = "Which river does the Danube flow into?"
    ids = smol_tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(3):
            ids.append(tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item())
    greedy = smol_tokenizer.decode(ids[-3:])
    # Only meaningful when the greedy tokens re-tokenise to themselves in context.
    if smol_tokenizer(prompt + greedy)["input_ids"] != ids or not greedy.startswith(" ") or not greedy.strip():
        pytest.skip("greedy continuation does not round-trip through the tokenizer")
    record = EditRecord(case_id="g", source="zsre", protocol="token_accuracy", prompt=prompt, subject="Danube",
                        target_new=greedy[1:])
    assert evaluate_records(tiny_llama, smol_tokenizer, [record]).metrics["edit/efficacy"] == 1.0


def test_mixed_protocols_weighted_by_record_count(tiny_llama, smol_tokenizer):
    counterfact = [_counterfact_record("cf-1"), _counterfact_record("cf-2")]
    zsre = [_zsre_record("zsre-1")]
    alone_cf = evaluate_records(tiny_llama, smol_tokenizer, counterfact).metrics
    alone_zsre = evaluate_records(tiny_llama, smol_tokenizer, zsre).metrics
    mixed = evaluate_records(tiny_llama, smol_tokenizer, counterfact + zsre)
    for name in ("edit/efficacy", "edit/generalization", "edit/specificity"):
        assert mixed.metrics[name] == pytest.approx((2 * alone_cf[name] + alone_zsre[name]) / 3)
    assert mixed.metrics["edit/portability"] == pytest.approx(alone_zsre["edit/portability"])
    assert mixed.metrics["edit/efficacy_prob_gap"] == pytest.approx(alone_cf["edit/efficacy_prob_gap"])
    assert mixed.metrics["eval/num_records"] == 3.0
    assert [row["case_id"] for row in mixed.per_record] == ["cf-1", "cf-2", "zsre-1"]


def test_locality_against_pre_edit_reference(tiny_llama, smol_tokenizer):
    model = copy.deepcopy(tiny_llama)  # perturbed below; the session fixture stays untouched
    records = [_zsre_record("zsre-1"), _zsre_record("zsre-2")]
    reference = compute_reference(model, smol_tokenizer, records, batch_size=2)

    # Plain nested lists: survives pickle and JSON (a trial caches it).
    assert pickle.loads(pickle.dumps(reference)) == reference
    assert PreEditReference.from_dict(json.loads(json.dumps(reference.to_dict()))) == reference

    unchanged = evaluate_records(model, smol_tokenizer, records, reference=reference)
    assert unchanged.metrics["edit/locality"] == 1.0
    assert all(row["locality"] == 1.0 for row in unchanged.per_record)

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std().clamp(min=0.05))
    perturbed = evaluate_records(model, smol_tokenizer, records, reference=reference)
    assert perturbed.metrics["edit/locality"] < 1.0


def test_locality_reference_mismatch_is_reported(tiny_llama, smol_tokenizer):
    reference = compute_reference(tiny_llama, smol_tokenizer, [_zsre_record("zsre-1")])
    with pytest.raises(ValueError, match="no locality entry"):
        evaluate_records(tiny_llama, smol_tokenizer, [_zsre_record("other")], reference=reference)
    with pytest.raises(ValueError, match="duplicate case_id"):
        compute_reference(tiny_llama, smol_tokenizer, [_zsre_record("x"), _zsre_record("x")])


def test_bad_records_are_rejected(tiny_llama, smol_tokenizer):
    no_true = EditRecord(case_id="x", source="counterfact", protocol="probability", prompt="A is", subject="A",
                         target_new="B")
    with pytest.raises(ValueError, match="needs target_true"):
        evaluate_records(tiny_llama, smol_tokenizer, [no_true])
    no_answer = EditRecord(case_id="y", source="zsre", protocol="token_accuracy", prompt="A is", subject="A",
                           target_new="B", neighborhood=(PromptCase("C is", ()),))
    with pytest.raises(ValueError, match="no answer"):
        evaluate_records(tiny_llama, smol_tokenizer, [no_answer])
    with pytest.raises(TypeError):
        evaluate_records(tiny_llama, smol_tokenizer, [{"case_id": "z"}])
    empty = evaluate_records(tiny_llama, smol_tokenizer, [])
    assert empty.metrics == {"eval/num_records": 0.0} and empty.per_record == []


@pytest.mark.slow
def test_smollm2_prefers_paris(smollm2):
    prompt = "The capital of France is"
    record = EditRecord(case_id="france", source="builtin", protocol="probability", prompt=prompt, subject="France",
                        target_new="Rome", target_true="Paris",
                        neighborhood=(PromptCase(prompt, ("Paris",)),))
    result = evaluate_records(smollm2.model, smollm2.tokenizer, [record])
    assert result.metrics["edit/efficacy"] == 0.0
    assert result.metrics["edit/specificity"] == 1.0
    assert result.per_record[0]["p_true"] > result.per_record[0]["p_new"]


def test_prompt_builder_scores_the_shown_prompt_against_the_same_targets(tiny_llama, smol_tokenizer):
    record = _counterfact_record()
    prefix = "Fact: The mother tongue of Danielle Darrieux is English.\n"
    seen = []

    def builder(prompts):
        seen.append(list(prompts))
        return [prefix + p if p == record.prompt else p for p in prompts]

    plain = evaluate_records(tiny_llama, smol_tokenizer, [record])
    identity = evaluate_records(tiny_llama, smol_tokenizer, [record], prompt_builder=lambda ps: list(ps))
    assert identity.metrics == plain.metrics
    built = evaluate_records(tiny_llama, smol_tokenizer, [record], prompt_builder=builder)
    # One call with the distinct prompts, each once (every prompt is scored with two targets).
    assert len(seen) == 1 and len(seen[0]) == len(set(seen[0]))
    assert set(seen[0]) == {record.prompt, *record.paraphrase_prompts, *(c.prompt for c in record.neighborhood)}
    shown_new = _score_of(tiny_llama, smol_tokenizer, prefix + record.prompt, " English")
    assert built.per_record[0]["p_new"] == pytest.approx(shown_new.mean_prob, rel=1e-5)
    assert built.metrics["edit/generalization"] == plain.metrics["edit/generalization"]  # untouched prompts
    with pytest.raises(ValueError, match="prompt_builder returned 1 prompts"):
        evaluate_records(tiny_llama, smol_tokenizer, [record], prompt_builder=lambda ps: ps[:1])


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_prompts_shared_by_continuations_are_run_once(request, smol_tokenizer, model_name):
    """Two continuations after the same prompt (CounterFact's new and true targets) cost one pass over the prompt:
    the distinct prompts go through the model once, then all continuations on their cached keys/values — with the
    same numbers as whole unpadded pairs."""
    model = request.getfixturevalue(model_name)
    prompts = ["The capital of France is"] * 2 + ["Hi"] * 2 + ["The Eiffel Tower stands in"]
    continuations = [" Paris", " Rome, of course", " there", " you", " Paris"]
    shapes = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    try:
        scores = score_continuations(model, smol_tokenizer, prompts, continuations, batch_size=8)
    finally:
        handle.remove()
    assert [rows for rows, _ in shapes] == [3, 5]  # 3 distinct prompts, then 5 continuations
    for score, prompt, continuation in zip(scores, prompts, continuations):
        n = len(score.token_ids)
        targets, log_probs, argmax = _unbatched_scores(model, smol_tokenizer, prompt, continuation, n)
        assert list(score.token_ids) == targets and list(score.argmax_ids) == argmax
        assert list(score.token_logprobs) == pytest.approx(log_probs, abs=1e-5)
