"""Second-moment statistics and their corpus: exactness against a brute-force computation, invariance to
batching (one length per batch), the on-disk cache (content keys, one build under concurrency), and corpus parsing."""

from __future__ import annotations

import json
import multiprocessing
import random
import shutil
from pathlib import Path

import pytest
import torch

from methods.infra.arch import EditableModel
from methods.corpus import CorpusError, corpus_identity, iter_corpus_texts, parse_corpus
from methods.stats import (GramAccumulator, StatsError, add_gram_upper, count_repeats, pack_batches,
                           second_moments, upper_to_full)

WORDS = ("the river city museum scientists found that a new study of water music law novel population war history "
         "students morning government company announced football album patient climate president first time "
         "people think reason recipe university mathematics computer science born said").split()
MAX_LENGTH = 48


def write_text_corpus(path: Path, lines: int = 70, seed: int = 0) -> Path:
    """Lines of 3 to 90 words: some are cut at MAX_LENGTH tokens, so truncation is exercised too."""
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 90))).capitalize() + "."
                              for _ in range(lines)) + "\n", encoding="utf-8")
    return path


def brute_force_moment(model, editable, tokenizer, path: Path, layer: int, num_tokens: int) -> tuple[torch.Tensor, int]:
    """Each document alone (no padding, full forward), every key kept, then the mean of the outer products."""
    sequences, total = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or total >= num_tokens:
            continue
        ids = tokenizer(line.strip(), truncation=True, max_length=MAX_LENGTH)["input_ids"][:num_tokens - total]
        sequences.append(ids)
        total += len(ids)
    keys = []
    handle = editable.mlp_out(layer).register_forward_pre_hook(lambda module, args: keys.append(args[0][0].double()))
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    stacked = torch.cat(keys)
    return stacked.T @ stacked / stacked.shape[0], stacked.shape[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP threads that wait for
    each other make these tests many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def tiny_model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def text_corpus(tmp_path):
    return write_text_corpus(tmp_path / "corpus.txt")


def test_moments_match_brute_force_and_are_symmetric_psd(tiny_model, smol_tokenizer, text_corpus, tmp_path):
    editable = EditableModel.wrap(tiny_model)
    num_tokens = 1500  # fewer than the file holds: the last document is cut to make the count exact
    result = second_moments(editable, smol_tokenizer, [0, 2], parse_corpus(str(text_corpus)), num_tokens, "tiny",
                            cache_dir=tmp_path / "cache", batch_tokens=256, max_length=MAX_LENGTH, progress=False)
    assert result.tokens == num_tokens
    assert result.from_cache == {0: False, 2: False}
    for layer in (0, 2):
        moment = result.moments[layer]
        assert moment.dtype == torch.float64 and moment.device.type == "cpu"
        assert moment.shape == (editable.key_dim(layer),) * 2
        expected, counted = brute_force_moment(tiny_model, editable, smol_tokenizer, text_corpus, layer, num_tokens)
        assert counted == num_tokens
        assert relative_error(moment, expected) < 1e-6
        assert torch.equal(moment, moment.T)
        eigenvalues = torch.linalg.eigvalsh(moment)
        assert eigenvalues.min() >= -1e-12 * eigenvalues.max()


def test_short_corpus_uses_every_token_and_warns(tiny_llama, smol_tokenizer, text_corpus, tmp_path):
    editable = EditableModel.wrap(tiny_llama)
    with pytest.warns(UserWarning, match="holds only"):
        result = second_moments(editable, smol_tokenizer, [1], parse_corpus(str(text_corpus)), 10**6, "tiny",
                                cache_dir=tmp_path, max_length=MAX_LENGTH, progress=False)
    expected, counted = brute_force_moment(tiny_llama, editable, smol_tokenizer, text_corpus, 1, 10**6)
    assert result.tokens == counted
    assert relative_error(result.moments[1], expected) < 1e-6


def test_batch_size_does_not_change_the_result(tiny_model, smol_tokenizer, text_corpus, tmp_path):
    editable = EditableModel.wrap(tiny_model)
    corpus = parse_corpus(str(text_corpus))
    runs = []
    for index, batch_tokens in enumerate([4096, 97, 1]):
        runs.append(second_moments(editable, smol_tokenizer, [1, 3], corpus, 2000, "tiny",
                                   cache_dir=tmp_path / f"run{index}", batch_tokens=batch_tokens,
                                   max_length=MAX_LENGTH, progress=False))
    for run in runs[1:]:
        assert run.tokens == runs[0].tokens == 2000
        for layer in (1, 3):
            assert relative_error(run.moments[layer], runs[0].moments[layer]) < 1e-6


def test_batches_hold_one_length_within_the_token_budget():
    lengths = [5, 3, 5, 9, 3, 3, 5, 12, 1]
    batches = pack_batches(lengths, batch_tokens=10)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len({lengths[i] for i in batch}) == 1
        assert len(batch) == 1 or len(batch) * lengths[batch[0]] <= 10
    assert [lengths[batch[0]] for batch in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    assert [len(b) for b in batches if lengths[b[0]] == 3] == [3]


def test_gram_upper_triangle_matches_a_full_product():
    rows = torch.randn(50, 13)
    total = torch.zeros(13, 13, dtype=torch.float64)
    add_gram_upper(total, rows)
    add_gram_upper(total, rows[:7])
    expected = rows.double().T @ rows.double() + rows[:7].double().T @ rows[:7].double()
    assert torch.allclose(upper_to_full(total), expected, rtol=1e-5, atol=1e-5)


def test_gram_accumulator_buffers_rows_and_weights_them():
    torch.manual_seed(0)
    rows, weights = torch.randn(23, 9), torch.tensor([1.0, 3.0, 2.0] * 7 + [1.0, 5.0])
    expected = (rows.double() * weights.double()[:, None]).T @ rows.double()
    for buffer_rows in (1, 4, 7, 64):  # smaller than, across and larger than the chunks added
        gram = GramAccumulator(9, torch.float64, "cpu", buffer_rows=buffer_rows)
        for start, stop in ((0, 5), (5, 6), (6, 6), (6, 23)):
            gram.add(rows[start:stop], weights[start:stop].sqrt())
        assert torch.allclose(gram.mean(4), expected / 4, rtol=1e-5, atol=1e-6)
    unweighted = GramAccumulator(9, torch.float64, "cpu", buffer_rows=10)
    unweighted.add(rows.to(torch.bfloat16))  # lower-precision keys are widened to float32 in the buffer
    assert torch.allclose(unweighted.mean(1), rows.to(torch.bfloat16).double().T @ rows.to(torch.bfloat16).double(),
                          rtol=1e-5, atol=1e-5)


def test_count_repeats_keeps_first_occurrences_in_order():
    unique, counts = count_repeats([[1, 2], [3], [1, 2], [1], [3], [1, 2]])
    assert unique == [[1, 2], [3], [1]] and counts == [3, 2, 1]


def test_repeated_documents_run_once_and_count_with_their_multiplicity(tiny_model, smol_tokenizer, tmp_path):
    lines = write_text_corpus(tmp_path / "distinct.txt", lines=12).read_text(encoding="utf-8").splitlines()
    repeated = [lines[0]] * 3 + lines[1:6] + [lines[2], lines[4]] + lines[6:] + [lines[0]]
    corpus_path = tmp_path / "repeated.txt"
    corpus_path.write_text("\n".join(repeated) + "\n", encoding="utf-8")
    editable = EditableModel.wrap(tiny_model)
    rows_run = []
    handle = editable.mlp_out(0).register_forward_pre_hook(
        lambda module, args: rows_run.append(args[0].shape[:2].numel()))
    try:
        with pytest.warns(UserWarning, match="holds only"):  # every token of the corpus is asked for
            result = second_moments(editable, smol_tokenizer, [0, 1], parse_corpus(str(corpus_path)), 10**6, "tiny",
                                    cache_dir=tmp_path / "cache", batch_tokens=64, max_length=MAX_LENGTH, progress=False)
    finally:
        handle.remove()
    token_lengths = [len(smol_tokenizer(line, truncation=True, max_length=MAX_LENGTH)["input_ids"])
                     for line in lines]
    assert sum(rows_run) == sum(token_lengths)  # each distinct document went through the model once
    assert result.tokens_run == sum(token_lengths)
    for layer in (0, 1):
        expected, counted = brute_force_moment(tiny_model, editable, smol_tokenizer, corpus_path, layer, 10**6)
        assert result.tokens == counted > sum(token_lengths)  # the mean still counts every occurrence
        assert relative_error(result.moments[layer], expected) < 1e-6


def test_forward_stops_after_the_deepest_requested_layer(tiny_llama, smol_tokenizer, text_corpus, tmp_path):
    editable = EditableModel.wrap(tiny_llama)
    calls = []
    handle = editable.block(2).register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        second_moments(editable, smol_tokenizer, [0, 1], parse_corpus(str(text_corpus)), 500, "tiny",
                       cache_dir=tmp_path, max_length=MAX_LENGTH, progress=False)
    finally:
        handle.remove()
    assert calls == []


def test_second_call_reads_the_cache(tiny_llama, smol_tokenizer, text_corpus, tmp_path):
    editable = EditableModel.wrap(tiny_llama)
    corpus = parse_corpus(str(text_corpus))
    arguments = dict(cache_dir=tmp_path, max_length=MAX_LENGTH, progress=False)
    first = second_moments(editable, smol_tokenizer, [1, 2], corpus, 1200, "tiny", **arguments)
    second = second_moments(editable, smol_tokenizer, [2, 1], corpus, 1200, "tiny", **arguments)
    assert first.seconds > 0 and second.seconds == 0.0
    assert second.from_cache == {1: True, 2: True} and second.tokens == first.tokens == 1200
    assert first.tokens_run == 1200 and second.tokens_run == 0  # the test corpus repeats no document
    for layer in (1, 2):
        assert torch.equal(first.moments[layer], second.moments[layer])
        sidecar = json.loads(first.paths[layer].with_suffix(".json").read_text())
        assert sidecar["tokens"] == 1200 and sidecar["description"]["layer"] == layer
    # A superset computes only the missing layer, in a pass that still matches the cached ones' setting.
    third = second_moments(editable, smol_tokenizer, [1, 2, 3], corpus, 1200, "tiny", **arguments)
    assert third.from_cache == {1: True, 2: True, 3: False}
    # Anything in the key changes the entry: token count, truncation, model key, accumulation dtype.
    for changed in (dict(num_tokens=1100), dict(max_length=40), dict(model_key="other"),
                    dict(accumulate_dtype=torch.float32)):
        options = dict(num_tokens=1200, model_key="tiny", **arguments) | changed
        assert second_moments(editable, smol_tokenizer, [1], corpus, **options).from_cache == {1: False}


def test_lower_precision_forward_is_close_keyed_apart_and_opt_in(tiny_llama, smol_tokenizer, text_corpus, tmp_path):
    editable = EditableModel.wrap(tiny_llama)
    corpus = parse_corpus(str(text_corpus))
    arguments = dict(cache_dir=tmp_path, max_length=MAX_LENGTH, progress=False)
    exact = second_moments(editable, smol_tokenizer, [1, 3], corpus, 1500, "tiny", **arguments)
    lowered = second_moments(editable, smol_tokenizer, [1, 3], corpus, 1500, "tiny", forward_dtype=torch.bfloat16,
                             **arguments)
    assert lowered.from_cache == {1: False, 3: False}  # its own cache entries
    for layer in (1, 3):
        error = relative_error(lowered.moments[layer], exact.moments[layer])
        assert 1e-5 < error < 3e-2, error  # the bfloat16 forward really ran, and moved C by a few per mille
        assert lowered.moments[layer].dtype == torch.float64 and torch.equal(lowered.moments[layer],
                                                                              lowered.moments[layer].T)
        description = json.loads(lowered.paths[layer].with_suffix(".json").read_text())["description"]
        assert description["forward_dtype"] == "bfloat16"
        assert "forward_dtype" not in json.loads(exact.paths[layer].with_suffix(".json").read_text())["description"]
    with pytest.raises(StatsError, match="forward_dtype"):
        second_moments(editable, smol_tokenizer, [1], corpus, 1500, "tiny", forward_dtype=torch.float64, **arguments)


def test_corpus_identity_follows_file_content_not_path(tiny_llama, smol_tokenizer, tmp_path):
    editable = EditableModel.wrap(tiny_llama)
    original = write_text_corpus(tmp_path / "a.txt", seed=1)
    moved = tmp_path / "elsewhere" / "b.txt"
    moved.parent.mkdir()
    shutil.copy(original, moved)
    arguments = dict(cache_dir=tmp_path / "cache", max_length=MAX_LENGTH, progress=False)
    first = second_moments(editable, smol_tokenizer, [1], parse_corpus(str(original)), 800, "tiny", **arguments)
    same_text = second_moments(editable, smol_tokenizer, [1], parse_corpus(str(moved)), 800, "tiny", **arguments)
    assert same_text.from_cache == {1: True} and same_text.corpus == first.corpus
    write_text_corpus(original, seed=2)  # same path, new content
    changed = second_moments(editable, smol_tokenizer, [1], parse_corpus(str(original)), 800, "tiny", **arguments)
    assert changed.from_cache == {1: False} and changed.corpus != first.corpus
    assert not torch.equal(changed.moments[1], first.moments[1])


def _concurrent_worker(model, tokenizer, corpus_path, cache_dir, barrier, result_path):
    """Runs in a spawned process: wait for the sibling, then ask for the same statistics at the same moment."""
    import os
    torch.set_num_threads(1)
    editable = EditableModel.wrap(model)
    barrier.wait(timeout=120)
    result = second_moments(editable, tokenizer, [1, 3], parse_corpus(corpus_path), 3000, "tiny",
                            cache_dir=cache_dir, max_length=MAX_LENGTH, batch_tokens=64, progress=False)
    torch.save({"pid": os.getpid(), "from_cache": result.from_cache, "moments": result.moments}, result_path)


def test_two_processes_compute_the_statistics_once(tiny_llama, smol_tokenizer, tmp_path):
    corpus_path = write_text_corpus(tmp_path / "corpus.txt", lines=200)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    outputs = [tmp_path / f"worker{i}.pt" for i in range(2)]
    workers = [context.Process(target=_concurrent_worker, args=(tiny_llama, smol_tokenizer, str(corpus_path),
                                                                str(tmp_path / "cache"), barrier, str(output)))
               for output in outputs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    results = [torch.load(output, weights_only=True) for output in outputs]
    builders = [result for result in results if not any(result["from_cache"].values())]
    readers = [result for result in results if all(result["from_cache"].values())]
    assert len(builders) == 1 and len(readers) == 1, [result["from_cache"] for result in results]
    for layer in (1, 3):
        assert torch.equal(results[0]["moments"][layer], results[1]["moments"][layer])
    sidecars = list((tmp_path / "cache" / "stats").glob("*.json"))
    assert len(sidecars) == 2
    assert {json.loads(path.read_text())["built_by_pid"] for path in sidecars} == {builders[0]["pid"]}


def test_model_samples_are_deterministic_and_counted_exactly(tiny_llama, smol_tokenizer, tmp_path):
    editable = EditableModel.wrap(tiny_llama)
    corpus = parse_corpus("model-samples:new_tokens=24,batch=16")  # ~400 tokens a chunk: 900 need several
    rng_before = torch.get_rng_state()
    runs = [second_moments(editable, smol_tokenizer, [1], corpus, 900, "tiny-weights", cache_dir=tmp_path / name,
                           max_length=MAX_LENGTH, progress=False) for name in ("a", "b")]
    assert torch.equal(torch.get_rng_state(), rng_before)  # sampling must not disturb the caller's RNG
    assert runs[0].tokens == runs[1].tokens == 900
    assert torch.equal(runs[0].moments[1], runs[1].moments[1])
    assert runs[0].corpus["kind"] == "model-samples" and runs[0].corpus["model"] == "tiny-weights"
    chunk_files = sorted((tmp_path / "a" / "corpus").glob("*.json"))
    assert len(chunk_files) > 1 and all(json.loads(p.read_text())["generated_tokens"] > 0 for p in chunk_files)

    def first_texts(seed, cache):
        texts = iter_corpus_texts(corpus, tiny_llama, smol_tokenizer, seed=seed, model_fingerprint="tiny-weights",
                                  cache_dir=cache, progress=False)
        return [next(texts) for _ in range(12)]

    assert first_texts(0, tmp_path / "a") == first_texts(0, tmp_path / "b")
    assert first_texts(0, tmp_path / "a") != first_texts(1, tmp_path / "a")
    assert corpus_identity(corpus, "tiny-weights", seed=0) != corpus_identity(corpus, "tiny-weights", seed=1)


def test_parse_corpus_errors_and_forms(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(CorpusError, match=str(missing)):
        parse_corpus(str(missing))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="data.csv"):
        parse_corpus(str(tmp_path / "data.csv"))
    with pytest.raises(CorpusError, match="matches no"):
        parse_corpus(str(tmp_path / "*.jsonl"))
    with pytest.raises(CorpusError, match="bogus"):
        parse_corpus("model-samples:bogus=3")
    with pytest.raises(CorpusError, match="empty"):
        parse_corpus("")

    hub = parse_corpus("hf:wikitext:wikitext-103-raw-v1::body")
    assert (hub.hf_name, hub.hf_config, hub.hf_split, hub.hf_text_field) == ("wikitext", "wikitext-103-raw-v1",
                                                                             "train", "body")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match="HF_HUB_OFFLINE"):
        next(iter_corpus_texts(hub))

    assert parse_corpus("model-samples:top_k=5,temperature=0.7").sampling.top_k == 5
    with pytest.raises(CorpusError, match="model"):
        corpus_identity(parse_corpus("model-samples"))


def test_jsonl_documents_directories_and_globs(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    records = [{"sentence": "A sentence that is comfortably longer than twenty characters.", "label": 1,
                "idx": "short id"},
               {"question": "Which river flows through the city of Paris?", "subject": "geography",
                "answer": "The Seine river flows through Paris."}]
    (folder / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (folder / "a.txt").write_text("first line of plain text\n\nsecond line\nthird line\n")
    texts = list(iter_corpus_texts(parse_corpus(str(folder))))
    assert texts == ["first line of plain text", "A sentence that is comfortably longer than twenty characters.",
                     "second line", "Which river flows through the city of Paris?\nThe Seine river flows through Paris.",
                     "third line"]  # the files' documents in turn
    assert corpus_identity(parse_corpus(str(folder))) == corpus_identity(parse_corpus(str(folder / "*")))
    (folder / "c.jsonl").write_text('{"text": "fine and long enough to be kept here"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl, line 2"):
        list(iter_corpus_texts(parse_corpus(str(folder / "c.jsonl"))))


def test_shared_general_data_reads_as_a_corpus(shared_data):
    corpus = parse_corpus(str(shared_data / "general" / "*.jsonl"))
    assert len(corpus.files) == 6
    texts = iter_corpus_texts(corpus)
    assert all(len(next(texts)) > 20 for _ in range(50))


def test_bad_arguments_are_named(tiny_llama, smol_tokenizer, text_corpus, tmp_path):
    editable = EditableModel.wrap(tiny_llama)
    corpus = parse_corpus(str(text_corpus))
    with pytest.raises(StatsError, match="out of range"):
        second_moments(editable, smol_tokenizer, [7], corpus, 100, "tiny", cache_dir=tmp_path)
    with pytest.raises(StatsError, match="num_tokens"):
        second_moments(editable, smol_tokenizer, [1], corpus, 0, "tiny", cache_dir=tmp_path)
