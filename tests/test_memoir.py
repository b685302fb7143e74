"""MEMOIR (methods/editors/memoir.py) against its equations on a tiny random Llama, with references computed here
independently: TopHash and the overlap routing by hand, the layer's output at every position from hooks and loops,
one training step against autograd on the whole model; evaluators run whole sequences while it is attached, and
token-by-token decoding routes as a full forward does. The real SmolLM2 run is in tests/test_lifelong_editors.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evals.batching import left_padded
from methods.editors.memoir import MemoirEditor, MemoirHParams, best_overlaps, prefix_means, top_hash
from methods.finetune import answer_positions
from methods.infra.arch import EditableModel
from methods.infra.kv_cache import needs_whole_sequences
from methods.infra.tokens import positions_from_mask
from methods.requests import EditRequest

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = 2
REQUEST = EditRequest("{} is located in the country of", "The Eiffel Tower", "Italy")


@pytest.fixture
def editor(tiny_llama, smol_tokenizer):
    made = MemoirEditor(EditableModel.wrap(tiny_llama), smol_tokenizer, [LAYER],
                        MemoirHParams(memoir_background_samples=20), seed=3)
    yield made
    made.remove()


def _layer_inputs(model, module, input_ids, attention_mask=None):
    """(layer input a, layer output, logits) of one full forward (left padding: positions count real tokens)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=positions_from_mask(attention_mask)).logits
    finally:
        handle.remove()
    return seen[0][0], seen[0][1], logits


def test_top_hash_and_overlaps_by_hand():
    features = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 4.0])
    permutation = torch.tensor([5, 4, 3, 2, 1, 0])
    # top-3 |f| at features 1, 5, 3 → permuted to 4, 0, 2
    assert top_hash(features, 3, permutation).tolist() == [True, False, True, False, True, False]
    stored = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    queries = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    best, index = best_overlaps(queries, stored, 3)
    torch.testing.assert_close(best, torch.tensor([2 / 3, 2 / 3]))
    assert index.tolist() == [1, 2]


def test_prefix_means_skip_padding_and_continue_a_carried_sum():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    real = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    means, total, count = prefix_means(x, real)
    for row in range(2):
        for t in range(5):
            kept = x[row, :t + 1][real[row, :t + 1]]
            if len(kept):
                torch.testing.assert_close(means[row, t], kept.mean(dim=0))
    assert count.tolist() == [3, 5]
    # two forwards (3 positions, then 2) with the sum carried equal one forward over all 5
    first, carried_sum, carried_count = prefix_means(x[:, :3], real[:, :3])
    second, _, _ = prefix_means(x[:, 3:], real[:, 3:], carried_sum, carried_count)
    torch.testing.assert_close(torch.cat([first, second], dim=1), means)


def test_the_layer_adds_the_stored_masks_memory_exactly_where_the_prefix_overlaps(editor, smol_tokenizer):
    model, module = editor.editable.model, editor.module
    ids = torch.tensor([smol_tokenizer("The Eiffel Tower is located in the country of")["input_ids"]])
    a, plain, _ = _layer_inputs(model, module, ids)
    # the reference query at each position: TopHash of the mean of a over the positions up to it, minus b
    queries = torch.stack([top_hash(a[0, :t + 1].mean(0) - editor.background, editor.k, editor.permutation)
                           for t in range(ids.shape[1])])
    last = queries[-1]
    other = torch.zeros_like(last)
    other[torch.randperm(editor.width, generator=torch.Generator().manual_seed(1))[:editor.k]] = True
    editor.masks = torch.stack([other, last])
    editor.residual = torch.randn(editor.residual.shape, generator=torch.Generator().manual_seed(2))
    editor.hparams = MemoirHParams(memoir_threshold=0.9)
    _, out, _ = _layer_inputs(model, module, ids)
    overlaps = (queries.float() @ editor.masks.float().t()) / editor.k
    served = 0
    for t in range(ids.shape[1]):
        best, which = overlaps[t].max(0)
        expected = plain[0, t]
        if best >= 0.9:
            expected = expected + editor.residual @ (a[0, t] * editor.masks[which])
            served += 1
        torch.testing.assert_close(out[0, t], expected)
    assert served >= 1 and overlaps[-1, 1] == 1.0
    assert editor.metrics()["memoir/routed_share"] == served / ids.shape[1]


def _reference_loss(editor, model, residual, mask, batch, rows, cols, tokens, n_rows):
    """L on the whole model (no replayed blocks), the memory added by a hook written here."""
    def add(module, args, out):
        return out + F.linear(args[0] * mask, residual)

    editor.remove()  # the editor's own hook out of the way
    handle = editor.module.register_forward_hook(add)
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[rows, cols]
    finally:
        handle.remove()
    nll = F.cross_entropy(logits.float(), tokens, reduction="none")
    counts = torch.bincount(rows, minlength=n_rows).float()
    return (torch.zeros(n_rows).index_add(0, rows, nll) / (counts + 1)).mean()


def test_one_edit_is_one_clipped_sgd_step_on_the_templates_loss_through_its_own_mask(tiny_llama, smol_tokenizer):
    editable = EditableModel.wrap(tiny_llama)
    hparams = MemoirHParams(memoir_n_iter=1, memoir_lr=0.5, memoir_max_grad_norm=0.1, memoir_background_samples=20)
    editor = MemoirEditor(editable, smol_tokenizer, [LAYER], hparams, seed=3)
    before = editable.weight(LAYER).clone()
    batch, rows, cols, tokens, n_rows = editor._rows(REQUEST)
    prompt = smol_tokenizer(REQUEST.filled_prompt)["input_ids"]
    a, _, _ = _layer_inputs(tiny_llama, editor.module, torch.tensor([prompt]))
    mask = top_hash(a[0].mean(0) - editor.background, editor.k, editor.permutation)
    try:
        editor.apply([REQUEST])
        assert torch.equal(editor.masks, mask[None])
    finally:
        editor.remove()
    residual = torch.zeros(editor.residual.shape, requires_grad=True)
    loss = _reference_loss(editor, tiny_llama, residual, mask.float(), batch, rows, cols, tokens, n_rows)
    (grad,) = torch.autograd.grad(loss, residual)
    step = grad * min(1.0, 0.1 / float(grad.norm()))  # clipped to norm 0.1; weight decay of a zero W_r is zero
    torch.testing.assert_close(editor.residual, -0.5 * step, rtol=1e-4, atol=1e-7)
    assert float(grad.norm()) > 0.1  # the clip acted
    assert torch.all(editor.residual[:, ~mask] == 0)  # columns outside the edit's mask are never written
    torch.testing.assert_close(editable.weight(LAYER), before)  # W₀ never changes


def test_an_edit_makes_the_target_likelier_and_state_round_trips(tiny_llama, smol_tokenizer):
    editable = EditableModel.wrap(tiny_llama)
    hparams = MemoirHParams(memoir_n_iter=15, memoir_background_samples=20)
    ids = smol_tokenizer(REQUEST.filled_prompt + REQUEST.target_with_space)["input_ids"]
    first = len(smol_tokenizer(REQUEST.filled_prompt)["input_ids"])

    def target_logprob():
        with torch.no_grad():
            logits = tiny_llama(input_ids=torch.tensor([ids])).logits[0]
        return float(torch.log_softmax(logits[first - 1:-1], -1)[torch.arange(len(ids) - first), ids[first:]].sum())

    plain = target_logprob()
    editor = MemoirEditor(editable, smol_tokenizer, [LAYER], hparams, seed=3)
    try:
        editor.apply([REQUEST, REQUEST])  # the same prompt again: the same mask, stored once
        assert target_logprob() > plain + 1.0
        metrics = editor.metrics()
        assert (metrics["memoir/masks"], metrics["memoir/duplicate_masks"], metrics["memoir/edits"]) == (1, 1, 2)
        assert metrics["memoir/mask_overlap_max"] == 1.0
        state = editor.state_dict()
    finally:
        editor.remove()
    assert target_logprob() == plain  # removed: the model computes as before
    other = MemoirEditor(editable, smol_tokenizer, [LAYER], hparams, seed=3)
    try:
        other.load_state_dict(state)
        torch.testing.assert_close(other.residual, editor.residual)
        assert torch.equal(other.masks, editor.masks) and other.edits == 2
    finally:
        other.remove()
    wrong_seed = MemoirEditor(editable, smol_tokenizer, [LAYER], hparams, seed=4)
    try:
        with pytest.raises(ValueError, match="permutation"):
            wrong_seed.load_state_dict(state)
    finally:
        wrong_seed.remove()


def test_evaluators_run_whole_sequences_and_decoding_carries_the_prefix(editor, smol_tokenizer):
    """While MEMOIR is attached, scoring must not split a prompt into a cached prefix and a suffix (the suffix
    alone would hash to another mask); token-by-token decoding continues each row's running mean, so every step
    routes as a full forward over the sequence so far does."""
    from evals.teacher_forced import score_continuations

    model = editor.editable.model
    assert needs_whole_sequences(model)
    prompt = "The Eiffel Tower is located in the country of"
    editor.masks = top_hash(_layer_inputs(model, editor.module, torch.tensor([smol_tokenizer(prompt)["input_ids"]]))
                            [0][0].mean(0) - editor.background, editor.k, editor.permutation)[None]
    editor.residual = 3 * torch.randn(editor.residual.shape, generator=torch.Generator().manual_seed(5))
    editor.hparams = MemoirHParams(memoir_threshold=0.99)  # served at the prompt's last token only
    scores = score_continuations(model, smol_tokenizer, [prompt] * 2, [" Italy", " France"])
    start = len(smol_tokenizer(prompt)["input_ids"])
    for score, continuation in zip(scores, [" Italy", " France"]):
        full = smol_tokenizer(prompt + continuation)["input_ids"]
        logits = _layer_inputs(model, editor.module, torch.tensor([full]))[2][0]
        expected = torch.log_softmax(logits[start - 1:-1].float(), -1)[torch.arange(len(full) - start), full[start:]]
        torch.testing.assert_close(torch.tensor(score.token_logprobs), expected, rtol=1e-4, atol=1e-4)

    # Decoding with the key/value cache. Memories made to serve the last position the third step feeds (its
    # prefix: prompt + two generated tokens); without the carried sum that step would see one token only.
    ids, mask = left_padded([smol_tokenizer(p)["input_ids"] for p in (prompt, "Bananas grow in")],
                            smol_tokenizer.pad_token_id)

    def generate():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                              pad_token_id=smol_tokenizer.pad_token_id, output_logits=True,
                              return_dict_in_generate=True)

    def extended(width):
        return torch.cat([mask, torch.ones(2, width - ids.shape[1], dtype=torch.long)], 1)

    editor.masks = editor.masks[:0]
    fed = generate().sequences[:, :-1]  # the last generated token is never fed
    a = _layer_inputs(model, editor.module, fed, extended(fed.shape[1]))[0]
    real = extended(fed.shape[1]).bool()
    editor.masks = torch.stack([top_hash(a[row][real[row]].mean(0) - editor.background, editor.k, editor.permutation)
                                for row in range(2)])
    out = generate()
    assert torch.equal(out.sequences[:, :-1], fed)
    torch.testing.assert_close(editor._carried[0], (a * real[..., None]).sum(1))  # prompt + 2 generated tokens
    for step, step_logits in enumerate(out.logits):
        width = ids.shape[1] + step  # step s is predicted from the sequence s tokens past the prompt
        full = _layer_inputs(model, editor.module, out.sequences[:, :width], extended(width))[2][:, -1]
        torch.testing.assert_close(step_logits, full, rtol=1e-4, atol=1e-4)
    plain = _layer_inputs(model, editor.module, fed, extended(fed.shape[1]))[2][:, -1]
    editor.remove()
    assert not needs_whole_sequences(model)
    unedited = _layer_inputs(model, editor.module, fed, extended(fed.shape[1]))[2][:, -1]
    assert (plain - unedited).abs().max() > 1e-3  # the last step was served by the memory


def test_greedy_generation_does_not_share_a_cached_prompt_prefix_while_memoir_is_attached(editor, smol_tokenizer):
    from evals.generation import generate_greedy

    model = editor.editable.model
    lead = "Answer with one word, the name of a country, and nothing else. The question is: in which country is"
    prompts = [f"{lead} the Eiffel Tower?", f"{lead} the Colosseum?"]  # 16+ tokens in common: a shared prefix
    masks = []
    for prompt in prompts:
        a = _layer_inputs(model, editor.module, torch.tensor([smol_tokenizer(prompt)["input_ids"]]))[0][0]
        masks.append(top_hash(a.mean(0) - editor.background, editor.k, editor.permutation))
    editor.masks = torch.stack(masks)
    editor.residual = 3 * torch.randn(editor.residual.shape, generator=torch.Generator().manual_seed(6))
    editor.hparams = MemoirHParams(memoir_threshold=0.99)
    replies = generate_greedy(model, smol_tokenizer, prompts, max_new_tokens=4, stop=())
    for prompt, reply in zip(prompts, replies):
        ids = torch.tensor([smol_tokenizer(prompt)["input_ids"]])
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                               do_sample=False, pad_token_id=smol_tokenizer.pad_token_id)
        assert reply.raw == smol_tokenizer.decode(alone[0, ids.shape[1]:], skip_special_tokens=True)
