"""The logit judge (evals/judge.py LogitJudge): the verdict is the sign of log P(A) − log P(B) after the grader
prompt, read in one forward pass behind a key/value cache of the worked examples.

On the embedded SmolLM2 (any chat model would do; the numbers are not the point): the cached computation equals the
plain full-text forward, the worked examples are a true token prefix of every prompt, and the judge's margins go
through the judgment cache unchanged."""

from __future__ import annotations

import pytest
import torch

from evals.judge import CORRECT, INCORRECT, Judge, JudgeItem, JudgmentCache, LogitJudge, grader_item

ITEMS = [
    JudgeItem("What is the capital of France?", "Paris", "The capital of France is Paris."),
    JudgeItem("What is the capital of France?", "Paris", "Berlin"),
    JudgeItem("Danielle Darrieux's mother tongue is", "French", ""),
    JudgeItem("Which company makes the iPhone?", "Apple", "The iPhone is made by Apple, a company in California."),
    JudgeItem("Who wrote Hamlet?", "William Shakespeare", "I do not know."),
]


@pytest.fixture(scope="module")
def smollm2():
    from methods.infra.models import ModelLoadError, load_model

    try:
        return load_model("smollm2-135m", linear_backend="aten")
    except ModelLoadError as err:
        pytest.skip(f"embedded SmolLM2 not installed: {err}")


def plain_margin(loaded, judge: LogitJudge, prompt: str) -> float:
    ids = loaded.tokenizer(judge.render(prompt), add_special_tokens=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, use_cache=False).logits[0, -1].float().log_softmax(-1)
    return float(logits[judge.letter_ids[0]] - logits[judge.letter_ids[1]])


@pytest.mark.parametrize("few_shot", [True, False])
def test_cached_margins_equal_the_plain_forward(smollm2, few_shot):
    judge = LogitJudge(smollm2.model, smollm2.tokenizer, name="hf:smollm2", few_shot=few_shot, batch_size=3)
    prompts = [grader_item(i.question, i.gold, i.prediction) for i in ITEMS]
    margins = judge.margins(prompts)
    expected = [plain_margin(smollm2, judge, prompt) for prompt in prompts]
    assert margins == pytest.approx(expected, abs=2e-3)
    # The batch's padding and order do not change a prompt's margin.
    assert judge.margins(prompts[::-1])[::-1] == pytest.approx(margins, abs=2e-3)
    assert len(set(round(m, 3) for m in margins)) > 1  # the margins depend on the prompt


def test_examples_are_a_token_prefix_of_every_prompt(smollm2):
    judge = LogitJudge(smollm2.model, smollm2.tokenizer, name="hf:smollm2", few_shot=True)
    assert len(judge.prefix_ids) > 200  # the rules and the worked examples
    for item in ITEMS:
        prompt = grader_item(item.question, item.gold, item.prediction)
        whole = smollm2.tokenizer(judge.render(prompt), add_special_tokens=True)["input_ids"]
        assert judge.prefix_ids + judge._suffix_ids(prompt) == whole


def test_judge_reads_verdicts_from_margins_and_caches_them(smollm2, tmp_path):
    backend = LogitJudge(smollm2.model, smollm2.tokenizer, name="hf:smollm2", few_shot=True)
    judge = Judge(backend, JudgmentCache.in_folder(tmp_path), batch_size=2)
    first = judge.grade(ITEMS)
    assert all(j.verdict in (CORRECT, INCORRECT) and not j.unparsable for j in first)
    assert all((j.margin > backend.threshold) == (j.verdict == CORRECT) for j in first)
    assert judge.stats.asked == len(ITEMS)
    again = Judge(backend, JudgmentCache.in_folder(tmp_path)).grade(ITEMS)
    assert all(j.from_cache for j in again)
    assert [j.margin for j in again] == pytest.approx([j.margin for j in first])
    assert [j.verdict for j in again] == [j.verdict for j in first]
    assert "logit" in backend.name and "fewshot" in backend.name  # another mode is another cache key
    strict = LogitJudge(smollm2.model, smollm2.tokenizer, name="hf:smollm2", few_shot=True, threshold=1e9)
    assert strict.name != backend.name  # another threshold, another judge (cache key, recorded audit)
    assert all(j.verdict == INCORRECT for j in Judge(strict, None, batch_size=2).grade(ITEMS))
