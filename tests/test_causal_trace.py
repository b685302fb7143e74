"""Causal tracing on tiny random models: exactness properties, not the SmolLM2 numbers."""

from __future__ import annotations

import pytest
import torch

from evals.causal_trace import (HIDDEN, MLP, CausalTracer, TracedPrompt, TracingError, bootstrap_peak_frequencies,
                                eligible_centres, embedding_noise_std, prepare_prompt, recommend_edit_layers,
                                select_known_facts, subject_token_span, summarise, window_layers)
from methods.infra.arch import EditableModel

MID_PROMPT = ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "French")
END_PROMPT = ("The capital city of France", "France", "Paris")  # one-token subject that ends the prompt


def make_tracer(model, noise_multiple=3.0, **kwargs) -> CausalTracer:
    return CausalTracer(EditableModel.wrap(model), noise_std=embedding_noise_std(model, noise_multiple),
                        num_samples=kwargs.pop("num_samples", 3), **kwargs)


def test_subject_span_comes_from_character_offsets(smol_tokenizer):
    prompt, subject, _ = MID_PROMPT
    ids, first, last = subject_token_span(smol_tokenizer, prompt, subject)
    assert smol_tokenizer.decode(ids[first:last + 1]).strip() == subject
    assert smol_tokenizer.decode(ids[last + 1:]).strip() == "is"
    with pytest.raises(TracingError):
        subject_token_span(smol_tokenizer, prompt, "Edwin of Northumbria")


def test_answer_token_is_the_first_token_after_the_prompt(smol_tokenizer):
    traced = prepare_prompt(smol_tokenizer, *MID_PROMPT)
    assert smol_tokenizer.decode([traced.answer_id]) == " French"


def test_window_layers_are_centred_and_clipped():
    assert window_layers(3, 1, 30) == (3,)
    assert window_layers(10, 5, 30) == (8, 9, 10, 11, 12)
    assert window_layers(0, 5, 30) == (0, 1, 2)
    assert window_layers(29, 5, 30) == (27, 28, 29)
    assert window_layers(10, 6, 30) == (7, 8, 9, 10, 11, 12)


def test_recommended_layers_end_at_the_peak():
    curve = [0.0] * 30
    curve[9] = 0.2
    assert recommend_edit_layers(curve) == (9, (5, 6, 7, 8, 9))
    curve[9], curve[2] = 0.0, 0.2
    assert recommend_edit_layers(curve) == (2, (0, 1, 2, 3, 4))  # too close to the input: first five layers


def test_min_layer_keeps_low_windows_out_of_the_peak_search():
    assert eligible_centres(30, restore_window=5, min_layer=1) == list(range(3, 30))
    curve = [0.0] * 30
    curve[0:3] = [0.3, 0.4, 0.5]  # windows that hold layer 0
    curve[7] = 0.1
    assert recommend_edit_layers(curve, restore_window=5) == (2, (0, 1, 2, 3, 4))
    assert recommend_edit_layers(curve, restore_window=5, min_layer=1) == (7, (3, 4, 5, 6, 7))
    curve[7], curve[3] = 0.0, 0.1
    assert recommend_edit_layers(curve, restore_window=5, min_layer=1) == (3, (1, 2, 3, 4, 5))


def test_bootstrap_peak_frequencies_follow_the_facts():
    effects = torch.zeros(4, 6)
    effects[:, 4] = 1.0  # every fact peaks at layer 4
    effects[:, 1] = 2.0  # but layer 1 is not a candidate
    shares = bootstrap_peak_frequencies(effects, centres=[2, 3, 4, 5], resamples=50)
    assert shares == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_trace_shapes_and_ranges(tiny_llama, smol_tokenizer):
    tracer = make_tracer(tiny_llama, max_batch_rows=8)  # several chunks per fact
    traced = prepare_prompt(smol_tokenizer, *MID_PROMPT)
    trace = tracer.trace(traced, {MLP: [1, 3], HIDDEN: [1]}, fact_seed=0)
    assert set(trace.restored) == {(MLP, 1), (MLP, 3), (HIDDEN, 1)}
    for values in trace.restored.values():
        assert values.shape == (tiny_llama.config.num_hidden_layers,)
        assert ((values >= 0) & (values <= 1)).all()
    assert 0 < trace.p_clean < 1 and 0 < trace.p_corrupted < 1
    summary = summarise([trace, trace])
    assert summary.num_facts == 2
    assert summary.average_effect[(MLP, 3)] == pytest.approx(trace.indirect_effect(MLP, 3).tolist())
    assert summary.standard_error[(MLP, 3)] == pytest.approx([0.0] * 4)


def test_zero_noise_gives_zero_effects(tiny_llama, smol_tokenizer):
    tracer = make_tracer(tiny_llama, noise_multiple=0.0)
    trace = tracer.trace(prepare_prompt(smol_tokenizer, *MID_PROMPT), {MLP: [1, 3], HIDDEN: [1]}, fact_seed=0)
    assert trace.p_corrupted == pytest.approx(trace.p_clean, rel=1e-5)
    for key in trace.restored:
        assert trace.indirect_effect(*key).abs().max() <= 1e-5 * trace.p_clean


def test_restoring_the_hidden_state_recovers_the_clean_probability(tiny_llama, smol_tokenizer):
    # Only the last position is noised, so a clean block output there makes every later layer clean again.
    traced = prepare_prompt(smol_tokenizer, *END_PROMPT)
    assert traced.subject_start == traced.subject_last == len(traced.input_ids) - 1
    trace = make_tracer(tiny_llama).trace(traced, {HIDDEN: [1]}, fact_seed=0)
    assert abs(trace.total_effect) > 1e-3 * trace.p_clean  # the noise did change the prediction
    restored = trace.restored[(HIDDEN, 1)]
    assert torch.allclose(restored, torch.full_like(restored, trace.p_clean), rtol=1e-5, atol=0)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_prefix_reuse_matches_whole_prompt_runs(fixture, request, smol_tokenizer):
    model = request.getfixturevalue(fixture)
    traced = prepare_prompt(smol_tokenizer, *MID_PROMPT)
    windows = {MLP: [1, 3], HIDDEN: [1]}
    fast = make_tracer(model, reuse_prefix=True).trace(traced, windows, fact_seed=7)
    reference = make_tracer(model, reuse_prefix=False).trace(traced, windows, fact_seed=7)
    assert fast.p_corrupted == pytest.approx(reference.p_corrupted, rel=1e-4)
    for key in windows_keys(windows):
        assert torch.allclose(fast.restored[key], reference.restored[key], rtol=1e-4, atol=0)


def windows_keys(windows):
    return [(kind, window) for kind, sizes in windows.items() for window in sizes]


def test_known_facts_are_those_whose_answer_is_the_argmax(tiny_llama, smol_tokenizer):
    prompts = [prepare_prompt(smol_tokenizer, *MID_PROMPT), prepare_prompt(smol_tokenizer, *END_PROMPT)]
    with torch.no_grad():
        top = [int(tiny_llama(input_ids=torch.tensor([p.input_ids])).logits[0, -1].argmax()) for p in prompts]
    as_known = TracedPrompt(prompts[0].input_ids, prompts[0].subject_start, prompts[0].subject_last, top[0])
    as_unknown = TracedPrompt(prompts[1].input_ids, prompts[1].subject_start, prompts[1].subject_last, top[1] + 1)
    assert select_known_facts(tiny_llama, [as_known, as_unknown]) == [True, False]
