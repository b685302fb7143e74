"""Likelihood-scored general abilities (evals/abilities.py): the scoring math on models whose log-probabilities are
known exactly, the rolling perplexity against a plain forward pass, lm-evaluation-harness' own numbers on the same
items, the unedited model's cache, the task files' and the configuration's checks, a tiny trial that logs the
abilities at step 0 and a checkpoint, and (slow) SmolLM2 well above chance."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from evals.abilities import (COST_SECONDS, AbilitiesEvaluator, AbilitySettings, AbilityTaskError, choice_requests,
                             choose, evaluate_abilities, lambada_request, load_abilities,
                             prefix_token_id, rolling_perplexity, rolling_token_logprobs, rolling_windows,
                             task_metrics, wikitext_excerpt)
from grid.config import ConfigError, expand_trials, load_config

HIT = 10.0  # the logit a bigram model gives its one predicted next token (every other logit is 0)


# The closed forms below are float64; the model's float32 log-softmax over 49,152 logits is off by ~5e-6 per token
# depending on the CPU's kernel (an AVX2 host: 3.6e-4 over a 36-token sum, 1.9e-5 relative). A scoring mistake
# (a wrong or missing token) moves a sum by ≥ 0.5 nats, far outside this.
FLOAT32_SUM_REL = 5e-5


class BigramModel(torch.nn.Module):
    """A causal LM whose next-token distribution depends only on the current token: logit ``HIT`` on
    ``next_id[token]``, 0 elsewhere. So every log-probability is known in closed form."""

    def __init__(self, vocab_size: int, next_id: dict[int, int]):
        super().__init__()
        self.vocab_size = vocab_size
        table = torch.zeros(vocab_size, dtype=torch.long)  # unmapped tokens predict token 0
        for token, following in next_id.items():
            table[token] = following
        self.register_buffer("table", table)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits.scatter_(-1, self.table[input_ids][..., None], HIT)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    def logprob(self, hit: bool) -> float:
        return (HIT if hit else 0.0) - math.log(math.exp(HIT) + self.vocab_size - 1)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _tiny_folder(folder):
    """A small abilities folder: 3 ARC-Easy items, 2 WinoGrande items, 2 LAMBADA passages and a WikiText excerpt."""
    folder.mkdir(exist_ok=True)
    _write_jsonl(folder / "arc_easy.jsonl", [
        {"id": "a1", "context": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"],
         "answer": 1},
        {"id": "a2", "context": "What is frozen water called?", "choices": ["ice", "steam", "sand", "salt"],
         "answer": 0},
        {"id": "a3", "context": "Which planet is closest to the Sun?", "choices": ["Venus", "Mercury"], "answer": 1}])
    _write_jsonl(folder / "winogrande.jsonl", [
        {"id": "w1", "context": "The cup did not fit in the box because _ was too big.", "choices": ["the cup",
                                                                                                  "the box"],
         "answer": 0},
        {"id": "w2", "context": "Anna helped Maria because _ was kind.", "choices": ["Anna", "Maria"], "answer": 0}])
    _write_jsonl(folder / "lambada.jsonl", [
        {"id": "l1", "text": "She opened the door and saw her old friend standing in the rain"},
        {"id": "l2", "text": "He put the milk back into the fridge"}])
    (folder / "wikitext2_test.txt").write_text(" \n = Valkyrie = \n \n The Valkyrie is a ship . It sailed in 1901 "
                                               ", carrying coal @-@ fired engines .\n \n")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Scoring math
# ----------------------------------------------------------------------------------------------------------------

def test_queries_follow_lm_eval_formats():
    arc = {"id": "x", "context": "What melts ice?", "choices": ["heat", "cold"], "answer": 0}
    assert choice_requests("arc_easy", arc) == [("Question: What melts ice?\nAnswer:", " heat"),
                                                ("Question: What melts ice?\nAnswer:", " cold")]
    assert choice_requests("piqa", {**arc, "context": "Open a jar"})[1] == ("Question: Open a jar\nAnswer:", " cold")
    assert choice_requests("hellaswag", {**arc, "context": "Cooking: a man"})[0] == ("Cooking: a man", " heat")
    assert choice_requests("openbookqa", arc)[0] == ("What melts ice?", " heat")
    assert choice_requests("boolq", {**arc, "context": "Passage: p\nQuestion: q?", "choices": ["no", "yes"]}) == [
        ("Passage: p\nQuestion: q?\nAnswer:", " no"), ("Passage: p\nQuestion: q?\nAnswer:", " yes")]
    # WinoGrande, partial scoring: each option fills the blank; the rest of the sentence is the one continuation.
    wino = {"id": "w", "context": "Tom beat Ann because _ trained more .", "choices": ["Tom", "Ann"], "answer": 0}
    assert choice_requests("winogrande", wino) == [("Tom beat Ann because Tom", " trained more ."),
                                                   ("Tom beat Ann because Ann", " trained more .")]
    assert lambada_request({"text": "He drank a glass of cold water"}) == ("He drank a glass of cold", " water")
    assert task_metrics("winogrande") == ("abilities/winogrande/acc",)
    assert task_metrics("arc_easy") == ("abilities/arc_easy/acc", "abilities/arc_easy/acc_norm")
    assert task_metrics("lambada") == ("abilities/lambada/acc", "abilities/lambada/perplexity")


def test_acc_takes_the_summed_loglikelihood_and_acc_norm_divides_by_characters():
    # -6 over 2 characters = -3 per character; -9 over 10 characters = -0.9: acc and acc_norm disagree.
    assert choose([-6.0, -9.0], ["ab", "abcdefghij"]) == (0, 1)
    # Characters of the choice itself, not of " " + choice: with the space, -1.0 > -1.17 would win instead.
    assert choose([-2.0, -3.5], ["a", "ab"]) == (0, 1)
    assert choose([-3.0, -3.0], ["abc", "abc"]) == (0, 0)  # ties go to the first choice, like numpy's argmax
    assert choose([-1.0, -2.0, -0.5], ["a", "bb", "ccc"]) == (2, 2)


def test_choice_task_on_a_model_with_known_logprobs(tmp_path, smol_tokenizer):
    """The long gold choice is predicted token by token (each token ≈ −0.5 nats), the short wrong one is not
    (≈ −10 nats for its single token): the sum prefers the short one, the per-character mean the long one."""
    tok = smol_tokenizer
    query = "Question: Name some letters of the Greek alphabet.\nAnswer:"
    long_choice = "alpha beta gamma delta epsilon zeta theta iota kappa lambda omicron sigma"
    chain = _ids(tok, " " + long_choice)
    query_ids = _ids(tok, query)
    assert _ids(tok, query + " " + long_choice) == query_ids + chain  # the pair tokenises as its parts
    assert len(chain) >= 12 and len(set(chain)) == len(chain) and query_ids[-1] not in chain
    next_id = {query_ids[-1]: chain[0], **{a: b for a, b in zip(chain, chain[1:])}}
    model = BigramModel(len(tok), next_id)
    item = {"id": "g1", "context": "Name some letters of the Greek alphabet.", "choices": ["x", long_choice],
            "answer": 1}
    _write_jsonl(tmp_path / "arc_easy.jsonl", [item])
    result = evaluate_abilities(model, tok, load_abilities(tmp_path, ["arc_easy"], 5, 100), batch_size=4)
    short_ll = sum(model.logprob(False) for _ in _ids(tok, " x"))
    long_ll = len(chain) * model.logprob(True)
    (row,) = result.rows
    assert row["loglikelihoods"] == pytest.approx([short_ll, long_ll], rel=FLOAT32_SUM_REL, abs=1e-4)
    assert short_ll > long_ll and short_ll / 1 < long_ll / len(long_choice)
    assert (row["pred"], row["pred_norm"]) == (0, 1)
    assert result.metrics == {"abilities/arc_easy/acc": 0.0, "abilities/arc_easy/acc_norm": 1.0}


def test_lambada_counts_a_word_only_when_every_target_token_is_the_greedy_one(tmp_path, smol_tokenizer):
    tok = smol_tokenizer
    passages = {"one": "We flew from Rome to Paris",  # one-token target, predicted
                "first_only": "The old wizard muttered Xanthippe",  # several tokens, only the first predicted
                "chain": "The quiet scholar studied Zarathustra"}  # several tokens, every one predicted
    next_id, expected_greedy, expected_ll = {}, {}, {}
    model_vocab = len(tok)
    for name, text in passages.items():
        context, target = lambada_request({"text": text})
        ctx_ids, tgt_ids = _ids(tok, context), _ids(tok, target)
        assert _ids(tok, text) == ctx_ids + tgt_ids
        assert (len(tgt_ids) == 1) == (name == "one")
        assert ctx_ids[-1] not in next_id and not set(tgt_ids) & set(next_id)
        next_id[ctx_ids[-1]] = tgt_ids[0]
        if name == "chain":
            next_id.update(zip(tgt_ids, tgt_ids[1:]))
        hits = [True] + [name == "chain"] * (len(tgt_ids) - 1)
        expected_greedy[name] = all(hits)
        expected_ll[name] = hits
    model = BigramModel(model_vocab, next_id)
    _write_jsonl(tmp_path / "lambada.jsonl", [{"id": name, "text": text} for name, text in passages.items()])
    result = evaluate_abilities(model, tok, load_abilities(tmp_path, ["lambada"], 10, 100), batch_size=2)
    lls = {name: sum(model.logprob(h) for h in hits) for name, hits in expected_ll.items()}
    assert {r["id"]: r["greedy"] for r in result.rows} == expected_greedy == {"one": True, "first_only": False,
                                                                             "chain": True}
    assert {r["id"]: r["loglikelihood"] for r in result.rows} == pytest.approx(lls, rel=FLOAT32_SUM_REL, abs=1e-4)
    assert result.metrics["abilities/lambada/acc"] == pytest.approx(2 / 3)
    # exp(−mean): its relative error is the summed log-likelihoods' absolute error over 3 (≈ 1e-4 on an AVX2 host)
    assert result.metrics["abilities/lambada/perplexity"] == pytest.approx(math.exp(-sum(lls.values()) / 3),
                                                                           rel=5e-4)


def test_rolling_windows_score_every_token_once_as_lm_eval_does():
    # lm-eval's get_rolling_token_windows(tokens, prefix, max_seq_len=4, context_len=1) on 10 tokens gives the inputs
    # [prefix]+t[0:3], t[3:7], t[5:9] predicting t[0:4], t[4:8], t[8:10]: over [prefix]+tokens, inputs [0,4), [4,8),
    # [6,10).
    assert rolling_windows(10, 4) == [(0, 0, 4), (4, 4, 8), (6, 8, 10)]
    assert rolling_windows(3, 8) == [(0, 0, 3)]
    for n, length in ((1, 1), (17, 5), (40, 40), (41, 40)):
        windows = rolling_windows(n, length)
        assert [j for _, p, e in windows for j in range(p, e)] == list(range(n))
        assert all(e - a <= length and a <= p for a, p, e in windows)
    with pytest.raises(ValueError):
        rolling_windows(5, 0)


def test_rolling_perplexity_equals_exp_mean_nll_of_a_plain_forward(tiny_llama, smol_tokenizer):
    tok = smol_tokenizer
    text = ("The river Seine flows through Paris and reaches the sea at Le Havre . Its basin covers much of "
            "northern France , and boats have carried goods along it for centuries .")
    tokens = _ids(tok, text)
    sequence = torch.tensor([[prefix_token_id(tok), *tokens]])
    with torch.no_grad():
        log_probs = torch.log_softmax(tiny_llama(input_ids=sequence).logits[0, :-1].float(), dim=-1)
    plain = log_probs.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    nll = -plain.sum().item()
    result = rolling_perplexity(tiny_llama, tok, text, max_length=len(tokens) + 5)
    assert result["tokens"] == len(tokens)
    assert result["token_perplexity"] == pytest.approx(math.exp(nll / len(tokens)), rel=1e-5)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / len(text.encode()) / math.log(2), rel=1e-5)

    # Short windows (batched, left-padded): each token scored once, from exactly its window's inputs.
    length = 7
    windowed = rolling_token_logprobs(tiny_llama, tok, text, max_length=length)
    full = [prefix_token_id(tok), *tokens]
    expected = []
    for a, p, e in rolling_windows(len(tokens), length):
        with torch.no_grad():
            window = torch.log_softmax(tiny_llama(input_ids=torch.tensor([full[a:e]])).logits[0].float(), dim=-1)
        expected += [window[j - a, tokens[j]].item() for j in range(p, e)]
    assert windowed == pytest.approx(expected, abs=1e-4)
    assert windowed != pytest.approx(plain.tolist(), abs=1e-3)  # less context than one pass: other numbers


def test_wikitext_excerpt_ends_at_a_whole_line():
    text = "one\ntwo two\nthree three three\n"
    assert wikitext_excerpt(text, 100) == text
    assert wikitext_excerpt(text, 12) == "one\ntwo two\n"
    assert wikitext_excerpt(text, 11) == "one\n"
    assert wikitext_excerpt("no newline here", 5) == "no ne"


def test_numbers_equal_lm_evaluation_harness_on_the_same_items(tmp_path, tiny_llama, smol_tokenizer):
    """Local lm-eval tasks over the same files, written with lm-eval's own ARC, lambada_openai and rolling-
    perplexity definitions, on the same in-memory model: the harness' acc, acc_norm, LAMBADA accuracy and
    perplexity, and word perplexity equal ours."""
    pytest.importorskip("lm_eval")
    import lm_eval
    import yaml
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = _tiny_folder(tmp_path / "abilities")
    text = (folder / "wikitext2_test.txt").read_text() * 12  # about 400 tokens: several windows of 64
    (folder / "wikitext2_test.txt").write_text(text)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    _write_jsonl(tmp_path / "page.jsonl", [{"page": text}])

    def write(name: str, **task) -> None:
        (tasks_dir / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, "dataset_path": "json",
                                                                "test_split": "test", **task}, sort_keys=False))

    write("eg_arc", dataset_kwargs={"data_files": {"test": str(folder / "arc_easy.jsonl")}},
          output_type="multiple_choice", doc_to_text="Question: {{context}}\nAnswer:", doc_to_target="answer",
          doc_to_choice="{{choices}}", metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    write("eg_lambada", dataset_kwargs={"data_files": {"test": str(folder / "lambada.jsonl")}},
          output_type="loglikelihood", doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
          doc_to_target="{{' '+text.split(' ')[-1]}}",
          metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                       {"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    write("eg_wiki", dataset_kwargs={"data_files": {"test": str(tmp_path / "page.jsonl")}},
          output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{page}}",
          metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}])
    harness = HFLM(pretrained=tiny_llama, tokenizer=smol_tokenizer, batch_size=4, max_length=64)
    output = lm_eval.simple_evaluate(model=harness, tasks=["eg_arc", "eg_lambada", "eg_wiki"],
                                     task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=False,
                                     bootstrap_iters=0)["results"]

    data = load_abilities(folder, ["arc_easy", "lambada", "wikitext2"], 10, len(text))
    ours = evaluate_abilities(tiny_llama, smol_tokenizer, data, batch_size=4, max_length=64).metrics
    assert ours["abilities/arc_easy/acc"] == output["eg_arc"]["acc,none"]
    assert ours["abilities/arc_easy/acc_norm"] == output["eg_arc"]["acc_norm,none"]
    assert ours["abilities/lambada/acc"] == output["eg_lambada"]["acc,none"]
    assert ours["abilities/lambada/perplexity"] == pytest.approx(output["eg_lambada"]["perplexity,none"], rel=1e-4)
    assert ours["abilities/wikitext2/word_perplexity"] == pytest.approx(output["eg_wiki"]["word_perplexity,none"],
                                                                        rel=1e-4)
    assert ours["abilities/wikitext2/bits_per_byte"] == pytest.approx(output["eg_wiki"]["bits_per_byte,none"],
                                                                      rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Files, cache, configuration
# ----------------------------------------------------------------------------------------------------------------

def test_malformed_task_files_are_named_with_line_and_field(tmp_path):
    good = {"id": "a", "context": "Q?", "choices": ["x", "y"], "answer": 1}
    with pytest.raises(AbilityTaskError, match=r"arc_easy.jsonl: file not found"):
        load_abilities(tmp_path, ["arc_easy"], 5, 100)
    cases = [
        ("arc_easy", [good, {**good, "answer": 2}], r"arc_easy.jsonl:2: field 'answer' must be an index into choices"),
        ("arc_easy", [good, {k: v for k, v in good.items() if k != "choices"}], r"arc_easy.jsonl:2: field 'choices' "
                                                                              r"is missing"),
        ("piqa", [{**good, "choices": ["only one"]}], r"piqa.jsonl:1: field 'choices' must be a list of at least 2"),
        ("hellaswag", [{**good, "answer": True}], r"hellaswag.jsonl:1: field 'answer'"),
        ("winogrande", [{**good, "context": "no blank here"}], r"winogrande.jsonl:1: field 'context' has no blank"),
        ("lambada", [{"id": "l", "text": "single"}], r"lambada.jsonl:1: field 'text' must be a passage"),
    ]
    for task, rows, message in cases:
        _write_jsonl(tmp_path / f"{task}.jsonl", rows)
        with pytest.raises(AbilityTaskError, match=message):
            load_abilities(tmp_path, [task], 5, 100)
    (tmp_path / "openbookqa.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(AbilityTaskError, match=r"openbookqa.jsonl:2: not JSON"):
        load_abilities(tmp_path, ["openbookqa"], 5, 100)
    assert len(load_abilities(tmp_path, ["openbookqa"], 1, 100).items["openbookqa"]) == 1  # first N only
    (tmp_path / "wikitext2_test.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(AbilityTaskError, match=r"wikitext2_test.txt: not UTF-8"):
        load_abilities(tmp_path, ["wikitext2"], 5, 100)


def test_unedited_results_come_from_the_cache_without_running_the_model(tmp_path, tiny_llama, smol_tokenizer):
    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, *args, **kwargs):
            raise AssertionError("the model ran")

    folder = _tiny_folder(tmp_path / "abilities")
    settings = AbilitySettings(path=str(folder), tasks=("arc_easy", "winogrande", "lambada", "wikitext2"),
                               n_items=3, wikitext_chars=1000, max_length=16, batch_size=4)
    cache = tmp_path / "cache"
    first = AbilitiesEvaluator(settings, tiny_llama, smol_tokenizer, "tiny@abc", cache).evaluate(0)
    assert not first.from_cache and first.metrics[COST_SECONDS] > 0
    assert sorted(first.metrics) == sorted([COST_SECONDS, *(m for task in settings.tasks for m in task_metrics(task))])
    assert first.metrics["abilities/wikitext2/token_perplexity"] > 1000  # a random model is close to uniform

    again = AbilitiesEvaluator(settings, Exploding(), smol_tokenizer, "tiny@abc", cache).evaluate(0)
    assert again.from_cache and again.rows == first.rows
    assert {k: v for k, v in again.metrics.items() if k != COST_SECONDS} == \
        {k: v for k, v in first.metrics.items() if k != COST_SECONDS}
    with pytest.raises(AssertionError, match="the model ran"):  # after edits the model is scored again
        AbilitiesEvaluator(settings, Exploding(), smol_tokenizer, "tiny@abc", cache).evaluate(10)
    # Other weights, other items, or a changed file: another entry, computed afresh.
    for other_settings, key in ((settings, "tiny@other"), (AbilitySettings(**{**settings.__dict__, "n_items": 2}),
                                                             "tiny@abc")):
        with pytest.raises(AssertionError, match="the model ran"):
            AbilitiesEvaluator(other_settings, Exploding(), smol_tokenizer, key, cache).evaluate(0)
    lines = (folder / "arc_easy.jsonl").read_text().splitlines()
    (folder / "arc_easy.jsonl").write_text("\n".join([lines[0].replace("oxygen", "nitrogen"), *lines[1:]]) + "\n")
    with pytest.raises(AssertionError, match="the model ran"):
        AbilitiesEvaluator(settings, Exploding(), smol_tokenizer, "tiny@abc", cache).evaluate(0)


def test_the_shared_task_files_load(shared_data):
    data = load_abilities(shared_data / "abilities", ["arc_easy", "arc_challenge", "piqa", "hellaswag", "openbookqa",
                                                      "winogrande", "boolq", "lambada", "wikitext2"], 1000, 10**7)
    counts = {task: len(items) for task, items in data.items.items()}
    assert counts == {"arc_easy": 1000, "arc_challenge": 1000, "piqa": 1000, "hellaswag": 1000, "openbookqa": 500,
                      "winogrande": 1000, "boolq": 1000, "lambada": 1000}
    assert len(data.wikitext.encode()) == 296_870 and data.wikitext.startswith(" \n = Robert Boulter = \n")
    assert sum(len(item["choices"]) for item in data.items["arc_easy"]) == 995 * 4 + 4 * 3 + 5  # README's counts


def _expand(*overrides):
    cfg, source = load_config(None, list(overrides))
    return expand_trials(cfg, source)


def test_abilities_section_is_validated_with_every_problem_listed(tmp_path):
    folder = tmp_path / "abilities"
    folder.mkdir()
    _write_jsonl(folder / "arc_easy.jsonl", [])
    with pytest.raises(ConfigError) as info:
        _expand("eval.abilities.enabled=true", f"eval.abilities.path={folder}",
                "eval.abilities.tasks=[arc_easy, lambada]", "eval.abilities.n_items=0",
                "eval.abilities.max_length=-3", "eval.abilities.steps=[3]", "edits.checkpoints=[2]")
    text = str(info.value)
    for expected in (f"eval.abilities.path: {folder} has no lambada.jsonl",
                     "eval.abilities.n_items: 0 must be an integer >= 1",
                     "eval.abilities.max_length: -3 must be an integer >= 1",
                     "eval.abilities.steps: [3] must be null or a list of 0 and edits.checkpoints values [0, 2]"):
        assert expected in text, text
    with pytest.raises(ConfigError) as info:
        _expand("eval.abilities.enabled=1", "eval.abilities.tasks=[arc_easy, poetry]")
    assert "eval.abilities.enabled: 1 must be true or false" in str(info.value)
    assert "eval.abilities.tasks: ['arc_easy', 'poetry'] must be a non-empty list of distinct names" in str(info.value)
    with pytest.raises(ConfigError, match=r"eval.abilities.path: None must be a folder"):
        _expand("eval.abilities.enabled=true")
    (trial,) = _expand("method=memit", "eval.abilities.enabled=true", f"eval.abilities.path={folder}",
                       "eval.abilities.tasks=[arc_easy]")
    settings = AbilitySettings.from_config(trial.config["eval"]["abilities"], trial.config["eval"]["batch_size"])
    assert settings.tasks == ("arc_easy",) and settings.n_items == 200 and settings.steps is None


# ----------------------------------------------------------------------------------------------------------------
# In a trial
# ----------------------------------------------------------------------------------------------------------------

def test_trial_logs_abilities_at_step_0_and_checkpoints_with_step_0_cached(tmp_path, tiny_llama_dir, small_corpus):
    from mlflow import MlflowClient

    from grid.launch import main

    folder = _tiny_folder(tmp_path / "abilities")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [f"model={tiny_llama_dir}", "method=memit", "data.limit=2", "edits.checkpoints=[1, 2]",
            f"stats.corpus={small_corpus}", "stats.num_tokens=2000", "hparams.layers=[1, 2]",
            "hparams.v_num_grad_steps=3", "eval.scr_latency_queries=0", f"cache_dir={tmp_path / 'cache'}",
            "eval.abilities.enabled=true", f"eval.abilities.path={folder}", "eval.abilities.steps=[0, 2]",
            "eval.abilities.tasks=[arc_easy, winogrande, lambada, wikitext2]", "eval.abilities.max_length=16",
            "grid={seed: [0, 1]}"]
    assert main(["--no-ray", "--no-progress", "--tracking-uri", uri, *[x for s in sets for x in ("--set", s)]]) == 0
    client = MlflowClient(uri)
    runs = sorted((r for r in client.search_runs([client.get_experiment_by_name("editgrid-default").experiment_id])
                   if r.data.tags.get("editgrid.role") == "trial"), key=lambda r: r.info.start_time)
    assert len(runs) == 2
    assert [r.data.tags["editgrid.abilities_from_cache"] for r in runs] == ["False", "True"]
    step0 = []
    for run in runs:
        def history(key):
            return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

        for key in ("abilities/arc_easy/acc", "abilities/arc_easy/acc_norm", "abilities/winogrande/acc",
                    "abilities/lambada/acc", "abilities/lambada/perplexity", "abilities/wikitext2/token_perplexity",
                    COST_SECONDS):
            values = history(key)
            assert sorted(values) == [0, 2] and all(math.isfinite(v) for v in values.values()), (key, values)
        step0.append({key: history(key)[0] for key in ("abilities/arc_easy/acc", "abilities/lambada/perplexity",
                                                        "abilities/wikitext2/token_perplexity")})
        tables = {a.path for a in client.list_artifacts(run.info.run_id, "tables/abilities")}
        assert {"tables/abilities/step_000000.json", "tables/abilities/step_000002.json"} <= tables
        assert any(a.path == "plots/abilities_vs_edits.png" for a in client.list_artifacts(run.info.run_id, "plots"))
    assert step0[0] == step0[1]  # the second trial read the first one's unedited results


def test_baseline_script_writes_its_table_and_json(tmp_path, tiny_llama_dir, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "abilities_baseline.py"
    spec = importlib.util.spec_from_file_location("abilities_baseline", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = _tiny_folder(tmp_path / "abilities")
    (folder / "arc_challenge.jsonl").write_text((folder / "arc_easy.jsonl").read_text())
    out = tmp_path / "baseline.json"
    assert module.main(["--data", str(folder), "--model", str(tiny_llama_dir), "--n-items", "2", "--max-length", "16",
                        "--tasks", "arc_easy,arc_challenge,lambada,wikitext2", "--json-out", str(out), "--quiet",
                        "--cache-dir", str(tmp_path / "cache")]) == 0
    report = json.loads(out.read_text())
    assert report["items"] == {"arc_easy": 2, "arc_challenge": 2, "lambada": 2}
    assert set(report["metrics"]) == {m for t in ("arc_easy", "arc_challenge", "lambada", "wikitext2")
                                      for m in task_metrics(t)}
    (arc,) = report["comparison"]  # only ARC has all of its tasks measured
    assert arc["benchmark"].startswith("ARC") and (arc["published_base"], arc["published_instruct"]) == (43.9, 37.3)
    metrics = report["metrics"]
    mean = 50 * (metrics["abilities/arc_easy/acc_norm"] + metrics["abilities/arc_challenge/acc_norm"])
    assert arc["ours"] == pytest.approx(mean)
    assert "| ARC (avg of easy, challenge) | acc_norm |" in capsys.readouterr().out
    assert report["machine"]["cpu_model"] and report["settings"]["n_items"] == 2


# ----------------------------------------------------------------------------------------------------------------
# The real model (slow)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_is_well_above_chance_on_piqa_and_reads_wikitext(shared_data, smollm2):
    """About 35 s on one core. Measured on the embedded model (docs/abilities.md): the first 100 PIQA items give
    acc 0.65, acc_norm 0.69 (chance 0.5; 0.60 is two binomial standard deviations above it); the first 4,000
    characters of WikiText a token perplexity of 13.1."""
    data = load_abilities(shared_data / "abilities", ["piqa", "wikitext2"], 100, 4000)
    metrics = evaluate_abilities(smollm2.model, smollm2.tokenizer, data, batch_size=32, max_length=1024).metrics
    assert metrics["abilities/piqa/acc"] > 0.58, metrics
    assert metrics["abilities/piqa/acc_norm"] > 0.60, metrics
    assert metrics["abilities/wikitext2/token_perplexity"] < 30, metrics  # a uniform guess: 49,152
