"""The locate-then-edit machinery against straightforward references (ALGORITHMS.md §1–§3).

* subject positions in padded batches (methods/infra/tokens.py) and keys (methods/keys.py) against a plain hook on one
  unpadded forward pass, on a Llama-style (nn.Linear) and a GPT-2-style (Conv1D) model;
* v* (methods/targets.py, prefix KV cache + suffix re-runs) against a reference that runs every whole rewriting
  prompt unpadded with δ added by a hook, step for step; batch independence, the clamp, and that it learns;
* the MEMIT and AlphaEdit solvers against their defining equations on random float64 problems;
* one editor step end to end: the residual is spread over the layers as §1 says, the targets get likelier, and
  nothing but the edited matrices changes.

Everything runs on the tiny random models of conftest.py; tests that edit weights work on deep copies.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from methods.infra.arch import EditableModel
from methods.infra import cpu_linear
from methods.infra.cpu_linear import onednn_available, route_linears
from methods.editor import LocateThenEditEditor
from methods.keys import compute_keys, compute_site_outputs, compute_keys_and_site_outputs
from methods.linalg import cholesky_factor, solve_gram_updated
from methods.requests import EditRequest
from methods.solvers.alphaedit import AlphaEditSolver, nullspace_projector
from methods.solvers.memit import MemitSolver
from methods import targets
from methods.targets import KL_PROMPT, TargetHParams, compute_target_values, plan_chunks
from methods.infra.tokens import TextSpan, encode_spans, subject_span

MODELS = ["tiny_llama", "tiny_gpt2"]

# Hand-written context templates (no generation: deterministic and fast); prefixes of different token lengths so
# that batches really are padded.
CONTEXT_GROUPS = [["{}"], ["The weather was nice today. {}", "I heard it. {}"]]

REQUESTS = [
    # Subject is the very first token of the plain prompt (and of the KL prompt): empty prefix.
    EditRequest(prompt="{} was founded by", subject="Apple", target="Steve Jobs"),
    # Multi-token subject in the middle; one-token target.
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target="English"),
    # Multi-token subject at the start; one-token target.
    EditRequest(prompt="{} plays the sport of", subject="Lionel Messi", target="basketball"),
]

# Subjects that end the prompt: the first target token is read right at the position where δ is added (and
# the v* suffix starts at the prompt's last token).
END_REQUESTS = [
    EditRequest(prompt="The city I like most is {}", subject="Paris", target="Rome"),
    EditRequest(prompt="My favourite football player is {}", subject="Lionel Messi", target="Pele"),
]
V_REQUESTS = REQUESTS + END_REQUESTS[:1]


# ---------------------------------------------------------------------------------------------------------------
# helpers: unpadded, hook-based references
# ---------------------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def _subject_last_position(tokenizer, text: str, subject_end: int) -> int:
    """Index of the subject's last token in the unpadded tokenisation of ``text``, found by tokenising the text up
    to the end of the subject (independent of the offsets logic under test)."""
    full, head = _ids(tokenizer, text), _ids(tokenizer, text[:subject_end])
    assert full[:len(head)] == head, f"the test text {text!r} tokenises differently when cut after the subject"
    return len(head) - 1


def _plain_hook_input(model, module, ids: list[int], position: int) -> torch.Tensor:
    """The input of ``module`` at ``position`` in one unpadded forward pass, read by a plain pre-hook."""
    seen = {}

    def hook(mod, inputs):
        seen["x"] = inputs[0][0, position].detach().clone()

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["x"].float()


def _reference_keys(editable, tokenizer, request: EditRequest, layer: int, groups) -> torch.Tensor:
    """k = mean over groups of (mean over the group's templates of the key at the subject's last token)."""
    group_means = []
    for group in groups:
        keys = []
        for template in group:
            filled_template = template.replace("{}", request.prompt, 1)
            at = filled_template.find("{}")
            text = filled_template.replace("{}", request.subject, 1)
            pos = _subject_last_position(tokenizer, text, at + len(request.subject))
            keys.append(_plain_hook_input(editable.model, editable.mlp_out(layer), _ids(tokenizer, text), pos))
        group_means.append(torch.stack(keys).mean(0))
    return torch.stack(group_means).mean(0)


def _forward_with_delta(model, site, ids: list[int], position: int, delta: torch.Tensor | None) -> torch.Tensor:
    """Logits [T, V] of one unpadded sequence, with ``delta`` added to ``site``'s output at ``position``."""

    def hook(mod, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        bump = torch.zeros_like(hidden)
        bump[0, position] = delta.to(hidden.dtype)
        hidden = hidden + bump
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handle = site.register_forward_hook(hook) if delta is not None else None
    try:
        return model(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        if handle is not None:
            handle.remove()


def _site_output(model, site, ids: list[int], position: int) -> torch.Tensor:
    seen = {}

    def hook(mod, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        seen["h"] = hidden[0, position].detach().clone()

    handle = site.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["h"].float()


def _reference_target(model, tokenizer, site, request: EditRequest, groups, hp: TargetHParams):
    """v* for one request, the slow obvious way (ALGORITHMS.md §1): every rewriting prompt
    ``template(prompt) + " " + target`` is run whole and unpadded, δ is added by a hook at the subject's last
    token, the loss is mean over prompts of the mean target-token NLL + kl_factor·KL(p_init ‖ p_now) on
    "{subject} is a" + v_weight_decay·‖δ‖/‖h‖²; Adam; clamp after each step; early stop below early_stop_loss.

    Returns (v*, h, loss per step, p(target) at the final δ)."""
    rewrites = []
    for template in [t for group in groups for t in group]:
        filled_template = template.replace("{}", request.prompt, 1)
        at = filled_template.find("{}")
        prompt = filled_template.replace("{}", request.subject, 1)
        full = prompt + request.target_with_space
        ids, prompt_ids = _ids(tokenizer, full), _ids(tokenizer, prompt)
        assert ids[:len(prompt_ids)] == prompt_ids
        position = _subject_last_position(tokenizer, full, at + len(request.subject))
        answer = list(range(len(prompt_ids), len(ids)))
        rewrites.append((ids, position, torch.tensor(answer), torch.tensor([ids[a] for a in answer])))
    kl_text = KL_PROMPT.replace("{}", request.subject, 1)
    kl_ids = _ids(tokenizer, kl_text)
    kl_position = _subject_last_position(tokenizer, kl_text, KL_PROMPT.find("{}") + len(request.subject))

    plain_ids, plain_position = rewrites[0][0], rewrites[0][1]  # group 0 is the bare "{}" template
    h = _site_output(model, site, plain_ids, plain_position)
    with torch.no_grad():
        kl_initial = F.log_softmax(_forward_with_delta(model, site, kl_ids, kl_position, None)[kl_position], -1)

    delta = torch.zeros_like(h, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * h.norm()
    losses, prob = [], None
    for step in range(hp.v_num_grad_steps):
        nlls = []
        for ids, position, answer, tokens in rewrites:
            logits = _forward_with_delta(model, site, ids, position, delta)
            log_probs = F.log_softmax(logits[answer - 1], dim=-1)
            nlls.append(-log_probs.gather(1, tokens[:, None]).mean())
        nlls = torch.stack(nlls)
        kl_now = F.log_softmax(_forward_with_delta(model, site, kl_ids, kl_position, delta)[kl_position], -1)
        kl = (kl_initial.exp() * (kl_initial - kl_now)).sum()
        loss = nlls.mean() + hp.kl_factor * kl + hp.v_weight_decay * delta.norm() / h.norm() ** 2
        losses.append(float(loss.detach()))
        prob = float(torch.exp(-nlls.detach()).mean())
        if losses[-1] < hp.early_stop_loss or step == hp.v_num_grad_steps - 1:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return (h + delta).detach(), h, losses, prob


def _sequence_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | prompt), one unpadded forward pass."""
    ids, prompt_ids = _ids(tokenizer, prompt + continuation), _ids(tokenizer, prompt)
    assert ids[:len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        log_probs = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return float(sum(log_probs[p - 1, ids[p]] for p in range(len(prompt_ids), len(ids))))


def _sharpened(model):
    """A deep copy whose next-token distributions are not almost uniform. The random tiny model's logits have a
    spread of ~0.2 nats, so p(target) ≈ 1/|V| whatever δ does, and with ‖h‖ ≈ 0.3 the ‖δ‖/‖h‖² decay term is all
    the loss there is. Scaling the final norm's gain by 10 gives logits a spread of a few nats."""
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.model.norm.weight.mul_(10.0)
    return sharp


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


# ---------------------------------------------------------------------------------------------------------------
# 1. subject positions and keys
# ---------------------------------------------------------------------------------------------------------------

SPAN_CASES = [
    ("{} was founded by", "Apple"),  # one-token subject at the start
    ("{} was born in", "Danielle Darrieux"),  # multi-token subject at the start
    ("The mother tongue of {} is", "Danielle Darrieux"),  # multi-token subject in the middle
    ("The headquarters of {} are in", "Google"),  # one-token subject in the middle
    ("The best city is {}", "Paris"),  # one-token subject at the end
    ("My favourite football player is {}", "Lionel Messi"),  # multi-token subject at the end
]


@pytest.mark.parametrize("side_from", ["tokenizer", "argument"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_encode_spans_finds_subject_last_token(monkeypatch, smol_tokenizer, padding_side, side_from):
    tok = smol_tokenizer
    other = "right" if padding_side == "left" else "left"
    monkeypatch.setattr(tok, "padding_side", padding_side if side_from == "tokenizer" else other)
    spans = [subject_span(template, subject) for template, subject in SPAN_CASES]
    for span, (template, subject) in zip(spans, SPAN_CASES):
        assert span.text == template.replace("{}", subject) and span.text[span.start:span.end] == subject
    batch = encode_spans(tok, spans, padding_side=padding_side if side_from == "argument" else None)
    width = batch.input_ids.shape[1]
    lengths = [len(_ids(tok, s.text)) for s in spans]
    assert width == max(lengths) and len(set(lengths)) > 1  # really padded
    for b, span in enumerate(spans):
        mask = batch.attention_mask[b].bool()
        real = batch.input_ids[b][mask].tolist()
        assert real == _ids(tok, span.text)
        assert int(batch.lengths[b]) == len(real)
        start = width - len(real) if padding_side == "left" else 0
        assert mask[start:start + len(real)].all() and int(mask.sum()) == len(real)  # contiguous, on the right side
        # position ids count real tokens only, so left padding does not shift positions
        assert batch.position_ids[b, start:start + len(real)].tolist() == list(range(len(real)))
        last = int(batch.span_last[b])
        assert bool(mask[last])
        assert last - start == _subject_last_position(tok, span.text, span.end)
        # Decoding everything up to and including span_last gives exactly the text up to the end of the subject,
        # and the token at span_last is the end of the subject.
        assert tok.decode(batch.input_ids[b, start:last + 1].tolist()) == span.text[:span.end]
        piece = tok.decode([int(batch.input_ids[b, last])]).strip()
        assert piece and span.text[span.start:span.end].endswith(piece)
        assert int(batch.answer_first[b]) == -1


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_encode_spans_answer_positions(smol_tokenizer, padding_side):
    tok = smol_tokenizer
    spans = []
    for template, subject in SPAN_CASES[:4]:
        span = subject_span(template, subject)
        spans.append(TextSpan(span.text + " Steve Jobs", span.start, span.end, answer_start=len(span.text)))
    batch = encode_spans(tok, spans, padding_side=padding_side)
    for b, span in enumerate(spans):
        first, last = int(batch.answer_first[b]), int(batch.span_last[b])
        end = int(batch.attention_mask[b].nonzero().max()) + 1
        assert tok.decode(batch.input_ids[b, first:end].tolist()) == " Steve Jobs"
        assert first > last
        assert batch.input_ids[b][batch.attention_mask[b].bool()].tolist() == _ids(tok, span.text)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_encode_spans_subject_ending_inside_a_token(smol_tokenizer, padding_side):
    """"America" in "Americana": BPE makes one token ' American' + 'a'; the subject's last token is the one that
    holds its last character, not the token before it."""
    tok = smol_tokenizer
    spans = [subject_span("She loves {}na music", "America"), subject_span("{} is long", "The river")]
    text = spans[0].text
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    holder = [i for i, (a, b) in enumerate(offsets) if a < spans[0].end <= b]
    assert len(holder) == 1 and offsets[holder[0]][1] > spans[0].end  # the test really straddles
    batch = encode_spans(tok, spans, padding_side=padding_side)
    start = int(batch.attention_mask[0].argmax()) if padding_side == "left" else 0
    assert int(batch.span_last[0]) - start == holder[0]
    assert "America" in tok.decode([int(batch.input_ids[0, int(batch.span_last[0])])])


@pytest.mark.parametrize("model_name", MODELS)
def test_edited_matrix_orientation(request, model_name):
    """W = weight(layer) is d×m, value = W·key (+ bias) reproduces the module, and W is a view of the parameter."""
    model = copy.deepcopy(request.getfixturevalue(model_name))
    editable = EditableModel.wrap(model)
    d = model.config.hidden_size
    layer = 1
    module = editable.mlp_out(layer)
    assert editable.is_transposed(layer) == (model_name == "tiny_gpt2")
    weight = editable.weight(layer)
    m = weight.shape[1]
    assert weight.shape == (d, m) and m != d
    assert editable.key_dim(layer) == m and editable.value_dim(layer) == d
    key = torch.randn(3, m, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(key)
    bias = module.bias if getattr(module, "bias", None) is not None else torch.zeros(d)
    torch.testing.assert_close(key @ weight.T + bias, expected, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[504, 3379, 10663, 282]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    change = torch.zeros(d, m)
    change[0, :] = 1.0  # adds sum(key) to output unit 0
    weight.add_(change)
    with torch.no_grad():
        torch.testing.assert_close(module(key), expected + key @ change.T)
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("model_name", MODELS)
def test_keys_ignore_padding_and_batch_mates(request, monkeypatch, smol_tokenizer, model_name):
    editable = EditableModel.wrap(request.getfixturevalue(model_name))
    layers = [0, 2]
    results = {}
    for side in ("left", "right"):
        monkeypatch.setattr(smol_tokenizer, "padding_side", side)
        together = compute_keys(editable, smol_tokenizer, V_REQUESTS, layers, CONTEXT_GROUPS)
        alone = [compute_keys(editable, smol_tokenizer, [r], layers, CONTEXT_GROUPS) for r in V_REQUESTS]
        for layer in layers:
            assert together[layer].shape == (editable.key_dim(layer), len(V_REQUESTS))
            assert together[layer].dtype == torch.float32
            for j, single in enumerate(alone):
                torch.testing.assert_close(together[layer][:, j], single[layer][:, 0], rtol=0, atol=1e-5)
        results[side] = together
    for layer in layers:
        torch.testing.assert_close(results["left"][layer], results["right"][layer], rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_keys_match_plain_hook_reference(request, monkeypatch, smol_tokenizer, model_name):
    """keys = ½·k("{}") + ½·mean_j k(g_j + ". {}") at the subject's last token, each read on one unpadded pass."""
    monkeypatch.setattr(smol_tokenizer, "padding_side", "left")
    editable = EditableModel.wrap(request.getfixturevalue(model_name))
    layers = [1, 3]
    keys = compute_keys(editable, smol_tokenizer, V_REQUESTS, layers, CONTEXT_GROUPS)
    for layer in layers:
        for j, req in enumerate(V_REQUESTS):
            expected = _reference_keys(editable, smol_tokenizer, req, layer, CONTEXT_GROUPS)
            torch.testing.assert_close(keys[layer][:, j], expected, rtol=0, atol=1e-5)
            # and it is the ½/½ average, not the mean over all three templates
            flat = _reference_keys(editable, smol_tokenizer, req, layer, [[t for g in CONTEXT_GROUPS for t in g]])
            assert (keys[layer][:, j] - flat).norm() > 1e-3
    # site outputs: the block output at the subject's last token of the plain prompt
    site = editable.block(2)
    outputs = compute_site_outputs(editable, smol_tokenizer, V_REQUESTS, site)
    for j, req in enumerate(V_REQUESTS):
        text = req.filled_prompt
        pos = _subject_last_position(smol_tokenizer, text, req.prompt.find("{}") + len(req.subject))
        torch.testing.assert_close(outputs[:, j], _site_output(editable.model, site, _ids(smol_tokenizer, text), pos),
                                   rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 2. target values v*
# ---------------------------------------------------------------------------------------------------------------

FEW_STEPS = TargetHParams(v_lr=0.5, v_num_grad_steps=4, clamp_norm_factor=0.75, kl_factor=0.0625,
                          v_weight_decay=0.5)  # 4 forward passes, 3 Adam steps


def _replay(editable: EditableModel, site_layer: int, replay: bool) -> dict:
    """compute_target_values' keywords that replay the blocks below the site (as the editor calls it), or none."""
    return {"blocks": editable.blocks, "site_layer": site_layer} if replay else {}


@pytest.mark.parametrize("chunk_tokens", [4096, 60, 1], ids=["one-chunk", "few-chunks", "row-by-row"])
@pytest.mark.parametrize("replay", [True, False], ids=["replayed-blocks", "every-block"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("model_name", MODELS)
def test_target_values_match_unpadded_reference(request, monkeypatch, smol_tokenizer, model_name, padding_side,
                                                replay, chunk_tokens):
    """(a) prefix cache + suffix re-runs (+ replayed lower blocks), in one chunk or several whose gradients
    accumulate, == whole unpadded prompts, step for step; (b) batch == alone; (c) clamp."""
    monkeypatch.setattr(smol_tokenizer, "padding_side", padding_side)
    model = request.getfixturevalue(model_name)
    editable = EditableModel.wrap(model)
    site = editable.block(2)
    blocks_before = list(editable.blocks)
    hp = TargetHParams(**{**FEW_STEPS.__dict__, "v_chunk_tokens": chunk_tokens})
    together = compute_target_values(model, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS, hp,
                                     **_replay(editable, 2, replay))
    rows = len(V_REQUESTS) * (1 + sum(len(group) for group in CONTEXT_GROUPS))
    assert together.chunks == {4096: 1, 1: rows}.get(chunk_tokens, together.chunks)
    if chunk_tokens == 60:
        assert 1 < together.chunks < rows
    assert list(editable.blocks) == blocks_before  # the stand-ins are gone again
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert together.values.shape == (len(V_REQUESTS), model.config.hidden_size)
    assert together.steps == FEW_STEPS.v_num_grad_steps
    # the loss trajectory: a run with s steps reports the loss of the s-th forward pass
    trajectory = [compute_target_values(model, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS,
                                        TargetHParams(**{**hp.__dict__, "v_num_grad_steps": s}),
                                        **_replay(editable, 2, replay)).final_loss
                  for s in (1, 2, 3)] + [together.final_loss]
    for j, req in enumerate(V_REQUESTS):
        v_star, h, losses, prob = _reference_target(model, smol_tokenizer, site, req, CONTEXT_GROUPS, FEW_STEPS)
        assert len(losses) == FEW_STEPS.v_num_grad_steps
        assert float((v_star - h).norm()) > 1e-2  # δ really moved
        torch.testing.assert_close(together.initial[j], h, rtol=0, atol=1e-5)
        torch.testing.assert_close(together.values[j], v_star, rtol=0, atol=1e-4)
        assert [float(t[j]) for t in trajectory] == pytest.approx(losses, abs=1e-4)
        assert float(together.target_prob[j]) == pytest.approx(prob, rel=1e-4, abs=1e-9)
        # (b) independence: the same request optimised alone gives the same v*
        alone = compute_target_values(model, smol_tokenizer, site, [req], CONTEXT_GROUPS, hp,
                                      **_replay(editable, 2, replay))
        torch.testing.assert_close(alone.values[0], together.values[j], rtol=0, atol=1e-4)
        # (c) the clamp
        assert float((together.values[j] - h).norm()) <= FEW_STEPS.clamp_norm_factor * float(h.norm()) * (1 + 1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_target_values_other_sites_and_no_prefix(request, monkeypatch, smol_tokenizer, model_name):
    """The MLP site (AdaEdit's FFN-only target: its own block runs live, those below are replayed), a batch in
    which no row has a prefix at all (bare template, one-token subject first: nothing is cached), and the first
    block as the site (only the site block itself is replayed)."""
    monkeypatch.setattr(smol_tokenizer, "padding_side", "left")
    model = request.getfixturevalue(model_name)
    editable = EditableModel.wrap(model)
    hp = TargetHParams(**{**FEW_STEPS.__dict__, "v_num_grad_steps": 3})
    cases = [(editable.mlp(1), REQUESTS[:2], CONTEXT_GROUPS, replay)
             for replay in (True, False)] + [(editable.block(1), REQUESTS[:1], [["{}"]], True),
                                             (editable.block(0), REQUESTS[:1], CONTEXT_GROUPS, True)]
    for site, requests, groups, replay in cases:
        site_layer = next(i for i, block in enumerate(editable.blocks) if any(m is site for m in block.modules()))
        result = compute_target_values(model, smol_tokenizer, site, requests, groups, hp,
                                       **_replay(editable, site_layer, replay))
        for j, req in enumerate(requests):
            v_star, h, losses, _ = _reference_target(model, smol_tokenizer, site, req, groups, hp)
            torch.testing.assert_close(result.initial[j], h, rtol=0, atol=1e-5)
            torch.testing.assert_close(result.values[j], v_star, rtol=0, atol=1e-4)
            assert float(result.final_loss[j]) == pytest.approx(losses[-1], abs=1e-4)


def test_target_kl_term_matches_reference(monkeypatch, smol_tokenizer, tiny_llama):
    """With a peaked model and a large kl_factor the KL term dominates the steps, so its direction
    (KL(p_initial ‖ p_now), as the reference code) and its position (the subject's last token of "{} is a") show."""
    monkeypatch.setattr(smol_tokenizer, "padding_side", "left")
    model = _sharpened(tiny_llama)
    editable = EditableModel.wrap(model)
    site = editable.block(1)
    hp = TargetHParams(v_lr=0.5, v_num_grad_steps=4, kl_factor=5.0)
    result = compute_target_values(model, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS, hp,
                                   **_replay(editable, 1, True))
    for j, req in enumerate(V_REQUESTS):
        v_star, h, losses, prob = _reference_target(model, smol_tokenizer, site, req, CONTEXT_GROUPS, hp)
        torch.testing.assert_close(result.values[j], v_star, rtol=0, atol=1e-4)
        assert float(result.final_loss[j]) == pytest.approx(losses[-1], rel=1e-5, abs=1e-4)
        assert float(result.target_prob[j]) == pytest.approx(prob, rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("chunk_tokens", [4096, 60], ids=["one-chunk", "few-chunks"])
@pytest.mark.parametrize("replay", [True, False], ids=["replayed-blocks", "every-block"])
def test_target_early_stop_per_request(monkeypatch, smol_tokenizer, tiny_llama, chunk_tokens, replay):
    """A request whose loss falls below early_stop_loss keeps its δ and leaves the batch (its rows, prefix cache
    and replayed output are dropped from every chunk) while the others go on; each equals the reference that
    simply stops there, and the batch equals each request alone."""
    monkeypatch.setattr(smol_tokenizer, "padding_side", "right")
    editable = EditableModel.wrap(tiny_llama)
    site = editable.block(2)
    probe = compute_target_values(tiny_llama, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS,
                                  TargetHParams(**{**FEW_STEPS.__dict__, "v_num_grad_steps": 1}))
    first_losses = sorted(float(x) for x in probe.final_loss)
    threshold = (first_losses[0] + first_losses[1]) / 2  # exactly one request is done after its first pass
    hp = TargetHParams(**{**FEW_STEPS.__dict__, "early_stop_loss": threshold, "v_chunk_tokens": chunk_tokens})
    result = compute_target_values(tiny_llama, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS, hp,
                                   **_replay(editable, 2, replay))
    assert result.steps > 1
    assert sorted(result.request_steps.tolist()) == [1] + [result.steps] * (len(V_REQUESTS) - 1)
    stopped = 0
    for j, req in enumerate(V_REQUESTS):
        v_star, h, losses, prob = _reference_target(tiny_llama, smol_tokenizer, site, req, CONTEXT_GROUPS, hp)
        torch.testing.assert_close(result.values[j], v_star, rtol=0, atol=1e-4)
        assert float(result.final_loss[j]) == pytest.approx(losses[-1], abs=1e-4)
        assert float(result.target_prob[j]) == pytest.approx(prob, rel=1e-4, abs=1e-9)
        if len(losses) == 1:
            stopped += 1
            torch.testing.assert_close(result.values[j], h, rtol=0, atol=0)
        alone = compute_target_values(tiny_llama, smol_tokenizer, site, [req], CONTEXT_GROUPS, hp,
                                      **_replay(editable, 2, replay))
        torch.testing.assert_close(alone.values[0], result.values[j], rtol=0, atol=1e-4)
    assert stopped == 1
    everything = compute_target_values(tiny_llama, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS,
                                       TargetHParams(**{**FEW_STEPS.__dict__, "early_stop_loss": 1e9}))
    assert everything.steps == 1
    torch.testing.assert_close(everything.values, everything.initial, rtol=0, atol=0)


@pytest.mark.parametrize("model_name", MODELS)
def test_target_clamp_binds(request, monkeypatch, smol_tokenizer, model_name):
    """A tight clamp with a large learning rate: ‖v* − h‖ ends exactly on the bound and never above it, matching
    the reference (whose clamp is the obvious one)."""
    monkeypatch.setattr(smol_tokenizer, "padding_side", "left")
    model = request.getfixturevalue(model_name)
    editable = EditableModel.wrap(model)
    site = editable.block(1)
    hp = TargetHParams(v_lr=2.0, v_num_grad_steps=4, clamp_norm_factor=0.05, kl_factor=0.0625, v_weight_decay=0.5)
    result = compute_target_values(model, smol_tokenizer, site, REQUESTS[:2], CONTEXT_GROUPS, hp,
                                   **_replay(editable, 1, True))
    for j, req in enumerate(REQUESTS[:2]):
        h = result.initial[j]
        norm = float((result.values[j] - h).norm())
        bound = hp.clamp_norm_factor * float(h.norm())
        assert norm <= bound * (1 + 1e-5)
        assert norm >= bound * (1 - 1e-4)  # the clamp was active
        v_star, _, _, _ = _reference_target(model, smol_tokenizer, site, req, CONTEXT_GROUPS, hp)
        torch.testing.assert_close(result.values[j], v_star, rtol=0, atol=1e-4)


def test_target_probability_rises(monkeypatch, smol_tokenizer, tiny_llama):
    monkeypatch.setattr(smol_tokenizer, "padding_side", "right")
    model = _sharpened(tiny_llama)
    site = EditableModel.wrap(model).block(1)
    many = TargetHParams(v_lr=0.5, v_num_grad_steps=25)
    initial = compute_target_values(model, smol_tokenizer, site, END_REQUESTS, CONTEXT_GROUPS,
                                    TargetHParams(**{**many.__dict__, "v_num_grad_steps": 1}))
    assert initial.steps == 1
    torch.testing.assert_close(initial.values, initial.initial)  # no step taken: v* = h
    result = compute_target_values(model, smol_tokenizer, site, END_REQUESTS, CONTEXT_GROUPS, many)
    assert result.steps == 25
    assert (result.final_loss < initial.final_loss - 1.0).all(), (initial.final_loss, result.final_loss)
    assert (result.target_prob > 10 * initial.target_prob).all(), (initial.target_prob, result.target_prob)
    norms = (result.values - result.initial).norm(dim=1)
    assert (norms <= many.clamp_norm_factor * result.initial.norm(dim=1) * (1 + 1e-5)).all()
    # the reported probability is the model's own at v*: add v* − h with a plain hook and score directly
    for j, req in enumerate(END_REQUESTS):
        full = req.filled_prompt + req.target_with_space
        ids, prompt_ids = _ids(smol_tokenizer, full), _ids(smol_tokenizer, req.filled_prompt)
        pos = _subject_last_position(smol_tokenizer, full, req.prompt.find("{}") + len(req.subject))
        assert pos == len(prompt_ids) - 1
        with torch.no_grad():
            logits = _forward_with_delta(model, site, ids, pos, result.values[j] - result.initial[j])
        log_probs = F.log_softmax(logits, -1)
        nll = -torch.stack([log_probs[p - 1, ids[p]] for p in range(len(prompt_ids), len(ids))]).mean()
        assert float(torch.exp(-nll)) > 10 * float(initial.target_prob[j])


def test_plan_chunks_sorts_by_length_and_keeps_to_the_budget():
    prefix = [5, 0, 12, 3, 7, 2, 9, 1]
    fed = [4, 1, 6, 1, 4, 9, 2, 1]
    chunks = plan_chunks(prefix, fed, chunk_tokens=30)
    assert sorted(r for chunk in chunks for r in chunk) == list(range(len(fed)))  # every row exactly once
    order = [r for chunk in chunks for r in chunk]
    assert order == sorted(order, key=lambda r: (fed[r], prefix[r], r))  # short rows together: little padding
    for chunk in chunks:
        padded = len(chunk) * (max(prefix[r] for r in chunk) + max(fed[r] for r in chunk))
        assert padded <= 30 or len(chunk) == 1
    assert plan_chunks(prefix, fed, chunk_tokens=10**6) == [order]
    assert [len(chunk) for chunk in plan_chunks(prefix, fed, chunk_tokens=1)] == [1] * len(fed)


def test_target_values_leave_the_prefix_cache_and_model_as_they_were(monkeypatch, smol_tokenizer, tiny_llama):
    """The per-step cache is a fork of the prefix cache (no copy): after any number of steps the prefix keys and
    values still hold only the prefix, so a second run from scratch gives identical values."""
    monkeypatch.setattr(smol_tokenizer, "padding_side", "left")
    editable = EditableModel.wrap(tiny_llama)
    site = editable.block(2)
    seen = []
    original_first_pass = targets._first_pass

    def spy(*args, **kwargs):
        out = original_first_pass(*args, **kwargs)
        chunk = args[2]
        seen.append((chunk, [(layer.keys.clone(), layer.values.clone()) for layer in chunk.cache.layers]))
        return out

    monkeypatch.setattr(targets, "_first_pass", spy)
    first = compute_target_values(tiny_llama, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS, FEW_STEPS,
                                  **_replay(editable, 2, True))
    assert seen
    for chunk, saved in seen:
        for layer, (keys, values) in zip(chunk.cache.layers, saved):
            assert layer.keys.shape[-2] == chunk.prefix_len
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    again = compute_target_values(tiny_llama, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS, FEW_STEPS,
                                  **_replay(editable, 2, True))
    assert torch.equal(first.values, again.values)


def test_target_values_under_bfloat16_autocast_are_opt_in_and_close(monkeypatch, smol_tokenizer, tiny_llama):
    """``v_autocast: bfloat16`` runs the steps in bf16 (the numbers change, a little) but h stays the model's own
    value in its dtype; an unknown name is refused."""
    monkeypatch.setattr(smol_tokenizer, "padding_side", "left")
    model = _sharpened(tiny_llama)
    editable = EditableModel.wrap(model)
    site = editable.block(1)
    exact = compute_target_values(model, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS, FEW_STEPS,
                                  **_replay(editable, 1, True))
    hp = TargetHParams(**{**FEW_STEPS.__dict__, "v_autocast": "bfloat16"})
    lowered = compute_target_values(model, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS, hp,
                                    **_replay(editable, 1, True))
    torch.testing.assert_close(lowered.initial, exact.initial, rtol=0, atol=1e-6)
    assert not torch.equal(lowered.values, exact.values)  # bf16 arithmetic really ran
    moved = (exact.values - exact.initial).norm(dim=1)
    assert ((lowered.values - exact.values).norm(dim=1) < 0.1 * moved).all()
    with pytest.raises(ValueError, match="v_autocast"):
        compute_target_values(model, smol_tokenizer, site, V_REQUESTS[:1], CONTEXT_GROUPS,
                              TargetHParams(**{**FEW_STEPS.__dict__, "v_autocast": "int8"}))


@pytest.mark.parametrize("model_name", MODELS)
def test_target_values_on_another_attention_kernel_are_the_same_and_the_model_keeps_its_own(
        request, monkeypatch, smol_tokenizer, model_name):
    """``v_attention: eager`` (the kernel that makes bf16 autocast pay on CPUs) changes nothing but summation order,
    and the model's own attention implementation is back afterwards."""
    monkeypatch.setattr(smol_tokenizer, "padding_side", "left")
    model = request.getfixturevalue(model_name)
    editable = EditableModel.wrap(model)
    site = editable.block(1)
    own = model.config._attn_implementation
    other = "eager" if own != "eager" else "sdpa"
    exact = compute_target_values(model, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS, FEW_STEPS,
                                  **_replay(editable, 1, True))
    seen = []
    original_first_pass = targets._first_pass

    def spy(model_arg, *args, **kwargs):
        seen.append(model_arg.config._attn_implementation)
        return original_first_pass(model_arg, *args, **kwargs)

    monkeypatch.setattr(targets, "_first_pass", spy)
    switched = compute_target_values(model, smol_tokenizer, site, V_REQUESTS, CONTEXT_GROUPS,
                                     TargetHParams(**{**FEW_STEPS.__dict__, "v_attention": other}),
                                     **_replay(editable, 1, True))
    assert seen and set(seen) == {other}
    assert model.config._attn_implementation == own
    torch.testing.assert_close(switched.values, exact.values, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="v_attention"):
        compute_target_values(model, smol_tokenizer, site, V_REQUESTS[:1], CONTEXT_GROUPS,
                              TargetHParams(**{**FEW_STEPS.__dict__, "v_attention": "flash"}))


# ---------------------------------------------------------------------------------------------------------------
# 3. MEMIT
# ---------------------------------------------------------------------------------------------------------------

def _random_spd(m: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(m, 3 * m, generator=generator, dtype=torch.float64)
    return a @ a.T / (3 * m) + 0.05 * torch.eye(m, dtype=torch.float64)


def test_memit_normal_equations_and_lambda():
    g = torch.Generator().manual_seed(1)
    m, d, n, layer = 24, 10, 6, 3
    c = _random_spd(m, g)
    keys = torch.randn(m, n, generator=g, dtype=torch.float64)
    residuals = torch.randn(d, n, generator=g, dtype=torch.float64)
    weight = torch.randn(d, m, generator=g, dtype=torch.float64)
    for solver, lam in [(MemitSolver(), 1.0 * m), (MemitSolver(mom2_update_weight_per_key_dim=0.25), 0.25 * m),
                        (MemitSolver(mom2_update_weight=7.5, mom2_update_weight_per_key_dim=0.25), 7.5)]:
        solver.prepare([layer], {layer: c}, {})
        assert solver.metrics()["memit/lambda"] == pytest.approx(lam, rel=1e-12)
        delta = solver.solve(layer, keys, residuals, weight)
        assert delta.shape == (d, m) and delta.dtype == torch.float64
        lhs = delta @ (lam * c + keys @ keys.T)
        assert _rel(lhs, residuals @ keys.T) <= 1e-8
        # the closed form agrees, and the weight does not enter MEMIT's Δ
        closed = residuals @ keys.T @ torch.linalg.inv(lam * c + keys @ keys.T)
        assert _rel(delta, closed) <= 1e-8
        torch.testing.assert_close(solver.solve(layer, keys, residuals, torch.zeros_like(weight)), delta)
    # float32 inputs are promoted: the answer is the float64 solve of the rounded inputs
    solver = MemitSolver()
    solver.prepare([layer], {layer: c.float()}, {})
    delta = solver.solve(layer, keys.float(), residuals.float(), weight.float())
    assert delta.dtype == torch.float64
    k32, r32, c32 = keys.float().double(), residuals.float().double(), c.float().double()
    assert _rel(delta @ (m * c32 + k32 @ k32.T), r32 @ k32.T) <= 1e-8


def test_gram_updated_solve_through_a_fixed_factor_equals_the_direct_solve(monkeypatch):
    import methods.linalg as linalg

    g = torch.Generator().manual_seed(5)
    m = 24
    a = 3.0 * _random_spd(m, g)
    factor = cholesky_factor(a)
    assert factor is not None
    direct_calls = []
    real_spd_solve = linalg.spd_solve
    monkeypatch.setattr(linalg, "spd_solve",
                        lambda x, b, what: direct_calls.append(x.shape) or real_spd_solve(x, b, what))
    for n in (1, 5, m // 2, m // 2 + 1, 2 * m):
        keys = torch.randn(m, n, generator=g, dtype=torch.float64)
        expected = torch.linalg.inv(a + keys @ keys.T) @ keys
        direct_calls.clear()
        assert _rel(solve_gram_updated(a, factor, keys, "test"), expected) <= 1e-10
        # up to m/2 keys only an n×n system is solved; more keys, or no factor, solve the m×m system
        assert direct_calls == ([(n, n)] if n <= m // 2 else [(m, m)])
        direct_calls.clear()
        assert _rel(solve_gram_updated(a, None, keys, "test"), expected) <= 1e-10
        assert direct_calls == [(m, m)]
    # a singular A has no factor; A + KKᵀ may still be positive definite, and is then solved directly
    basis = torch.randn(m, m - 3, generator=g, dtype=torch.float64)
    singular = basis @ basis.T
    assert cholesky_factor(singular - 1e-9 * torch.eye(m, dtype=torch.float64)) is None
    keys = torch.randn(m, 3, generator=g, dtype=torch.float64)
    expected = torch.linalg.solve(singular + keys @ keys.T, keys)
    assert _rel(solve_gram_updated(singular, cholesky_factor(singular - 1e-9 * torch.eye(m, dtype=torch.float64)),
                                   keys, "test"), expected) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# 4. AlphaEdit
# ---------------------------------------------------------------------------------------------------------------

EIGENVALUES = torch.tensor([1e-5, 3e-4, 1e-3, 4e-3, 1.5e-2, 3e-2, 0.1, 0.4, 1.0, 2.0, 3.0, 5.0], dtype=torch.float64)


def _known_spectrum(generator: torch.Generator):
    m = len(EIGENVALUES)
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    return q @ torch.diag(EIGENVALUES) @ q.T, q


def test_alphaedit_projector_modes():
    g = torch.Generator().manual_seed(2)
    c, q = _known_spectrum(g)
    total = float(EIGENVALUES.sum())
    # absolute: exactly the eigen-directions below the threshold
    for threshold, kept in [(2e-2, 5), (2e-3, 3), (1e-6, 0), (10.0, 12)]:
        p, dims, share = nullspace_projector(c, "absolute", threshold, 0.0)
        assert dims == kept
        expected = q[:, :kept] @ q[:, :kept].T
        assert float((p - expected).abs().max()) <= 1e-10
        assert share == pytest.approx(float(EIGENVALUES[:kept].sum()) / total, rel=1e-9, abs=1e-15)
    # energy: the largest set of smallest eigen-directions whose share of tr(C) stays ≤ the fraction
    cumulative = torch.cumsum(EIGENVALUES, 0) / total
    for kept in [1, 4, 6, 9]:
        for fraction, expect in [(float(cumulative[kept - 1]) * (1 + 1e-6), kept),
                                 (float(cumulative[kept - 1]) * (1 - 1e-6), kept - 1)]:
            p, dims, share = nullspace_projector(c, "energy", 0.0, fraction)
            assert dims == expect
            assert share <= fraction
            assert float((p - q[:, :expect] @ q[:, :expect].T).abs().max()) <= 1e-10
    solver = AlphaEditSolver(nullspace_mode="energy", nullspace_energy=float(cumulative[5]) * (1 + 1e-6))
    solver.prepare([0], {0: c.float()}, {})
    assert solver.metrics()["alphaedit/L0/null_dims"] == 6.0
    assert solver.metrics()["alphaedit/L0/null_energy_share"] == pytest.approx(float(cumulative[5]), rel=1e-5)
    with pytest.raises(ValueError):
        nullspace_projector(c, "relative", 0.0, 0.0)


def test_alphaedit_update_invariants_and_system():
    g = torch.Generator().manual_seed(3)
    c, q = _known_spectrum(g)
    m, d, n, layer = c.shape[0], 7, 4, 5
    solver = AlphaEditSolver(l2=10.0, nullspace_threshold=2e-2)
    solver.prepare([layer], {layer: c}, {})
    p = solver.projector(layer)
    assert solver.metrics()[f"alphaedit/L{layer}/null_dims"] == 5.0
    past = torch.randn(m, 3, generator=g, dtype=torch.float64) * 3
    solver.after_batch({layer: past})
    keys = torch.randn(m, n, generator=g, dtype=torch.float64) * 4
    residuals = torch.randn(d, n, generator=g, dtype=torch.float64)
    delta = solver.solve(layer, keys, residuals, torch.randn(d, m, generator=g, dtype=torch.float64))
    assert delta.shape == (d, m) and float(delta.norm()) > 1e-3
    assert _rel(delta @ p, delta) <= 1e-8
    # preserved directions (large eigenvalues of C, P k₀ = 0) are untouched
    for i in range(5, m):
        k0 = q[:, i]
        assert float((p @ k0).norm()) <= 1e-10
        assert float((delta @ k0).norm()) <= 1e-8 * float(delta.norm())
    # Δ solves (P(KKᵀ + K_pK_pᵀ) + αI) Δᵀ = P K Rᵀ
    system = p @ (keys @ keys.T + past @ past.T) + 10.0 * torch.eye(m, dtype=torch.float64)
    assert _rel(system @ delta.T, p @ keys @ residuals.T) <= 1e-8
    # with P = I and no memory it is ridge regression: Δ = R Kᵀ (KKᵀ + αI)⁻¹
    ridge = AlphaEditSolver(l2=10.0, nullspace_threshold=1e9)
    ridge.prepare([layer], {layer: c}, {})
    closed = residuals @ keys.T @ torch.linalg.inv(keys @ keys.T + 10.0 * torch.eye(m, dtype=torch.float64))
    assert _rel(ridge.solve(layer, keys, residuals, None), closed) <= 1e-8


def test_alphaedit_memory_protects_earlier_keys():
    g = torch.Generator().manual_seed(4)
    c, q = _known_spectrum(g)
    m, d, layer = c.shape[0], 6, 0
    null = q[:, :5]
    old_keys = null @ torch.randn(5, 2, generator=g, dtype=torch.float64) * 5  # editable (null-space) keys
    new_keys = old_keys[:, :1] + 0.3 * null @ torch.randn(5, 1, generator=g, dtype=torch.float64)  # overlapping
    old_res = torch.randn(d, 2, generator=g, dtype=torch.float64)
    new_res = torch.randn(d, 1, generator=g, dtype=torch.float64)

    changes = {}
    for remember in (True, False):
        solver = AlphaEditSolver(l2=1.0, nullspace_threshold=2e-2)
        solver.prepare([layer], {layer: c}, {})
        weight = torch.zeros(d, m, dtype=torch.float64)
        weight += solver.solve(layer, old_keys, old_res, weight)
        if remember:
            solver.after_batch({layer: old_keys})
            torch.testing.assert_close(solver.state_dict()["past_kk"][layer], old_keys @ old_keys.T)
        old_values = weight @ old_keys
        second = solver.solve(layer, new_keys, new_res, weight)
        changes[remember] = float((second @ old_keys).norm())
        # the second edit still does something for its own key
        assert float((second @ new_keys).norm()) > 0.1 * float(new_res.norm())
        assert old_values.shape == (d, 2)
    assert changes[True] < 0.5 * changes[False], changes
    # the memory accumulates over batches, and survives a state_dict round trip
    solver = AlphaEditSolver(l2=1.0, nullspace_threshold=2e-2)
    solver.prepare([layer], {layer: c}, {})
    solver.after_batch({layer: old_keys})
    solver.after_batch({layer: new_keys.float()})
    torch.testing.assert_close(solver.state_dict()["past_kk"][layer],
                               old_keys @ old_keys.T + new_keys.float().double() @ new_keys.float().double().T)
    restored = AlphaEditSolver(l2=1.0, nullspace_threshold=2e-2)
    restored.prepare([layer], {layer: c}, {})
    restored.load_state_dict(solver.state_dict())
    torch.testing.assert_close(restored.solve(layer, new_keys, new_res, None), solver.solve(layer, new_keys, new_res, None))


# ---------------------------------------------------------------------------------------------------------------
# 5. the editor, end to end
# ---------------------------------------------------------------------------------------------------------------

def _second_moments(editable, tokenizer, layers, texts) -> dict[int, torch.Tensor]:
    """C = mean over every token of k kᵀ at the MLP output projection's input, one unpadded pass per text."""
    sums = {layer: 0.0 for layer in layers}
    count = 0
    handles = []
    for layer in layers:
        def hook(mod, inputs, layer=layer):
            k = inputs[0][0].double()
            sums[layer] = sums[layer] + k.T @ k
        handles.append(editable.mlp_out(layer).register_forward_pre_hook(hook))
    try:
        for text in texts:
            ids = _ids(tokenizer, text)
            count += len(ids)
            with torch.no_grad():
                editable.model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: sums[layer] / count for layer in layers}


@pytest.mark.parametrize("model_name", MODELS)
def test_editor_spreads_residual_over_layers(request, monkeypatch, smol_tokenizer, model_name):
    """ALGORITHMS §1 spreading: layer i of L gets R = (v* − h_L(current model)) / (L − i). With the bare "{}"
    template the key is the plain prompt's own key, and a vanishing λ makes MEMIT insert R exactly, so the last
    layer's update must land the site output exactly on v* (a wrong divisor, or keys/h_L read before the earlier
    layers were updated, would not). Also on GPT-2, whose Conv1D is updated through a transposed view."""
    monkeypatch.setattr(smol_tokenizer, "padding_side", "left")
    model = copy.deepcopy(request.getfixturevalue(model_name))
    editable = EditableModel.wrap(model)
    layers, groups = [1, 2], [["{}"]]
    hp = TargetHParams(v_lr=0.5, v_num_grad_steps=5)
    site = editable.block(layers[-1])
    moments = {layer: torch.eye(editable.key_dim(layer), dtype=torch.float64) for layer in layers}
    target = compute_target_values(model, smol_tokenizer, site, V_REQUESTS[:2], groups, hp)  # what apply computes
    before = compute_site_outputs(editable, smol_tokenizer, V_REQUESTS[:2], site)
    assert float((target.values.t() - before).norm()) > 1e-2
    editor = LocateThenEditEditor(editable, smol_tokenizer, layers, MemitSolver(mom2_update_weight=1e-6), moments,
                                  groups, hp)
    editor.apply(V_REQUESTS[:2])
    after = compute_site_outputs(editable, smol_tokenizer, V_REQUESTS[:2], site)
    torch.testing.assert_close(after, target.values.t(), rtol=0, atol=1e-4)


def test_editor_memit_end_to_end(monkeypatch, smol_tokenizer, tiny_llama):
    monkeypatch.setattr(smol_tokenizer, "padding_side", "left")
    model = _sharpened(tiny_llama)  # a deep copy: the fixture is never edited
    editable = EditableModel.wrap(model)
    layers = [1, 2]
    texts = ["The quick brown fox jumps over the lazy dog.", "In 1990 the city council voted to build a bridge.",
             "She plays the violin and speaks three languages.", "Water boils at one hundred degrees Celsius.",
             "My favourite food is pasta with tomato sauce and basil."]
    words = " ".join(texts).replace(".", "").split()
    shuffler = random.Random(0)
    texts += [" ".join(shuffler.sample(words, 12)) + "." for _ in range(25)]
    # Enough tokens (~400) that C has full rank (key width 96): with fewer, λC + KKᵀ is singular and the update
    # depends on rounding (it differed between 1 and 2 threads).
    moments = _second_moments(editable, smol_tokenizer, layers, texts)
    assert all(int(torch.linalg.matrix_rank(c)) == c.shape[0] for c in moments.values())
    requests = END_REQUESTS
    before = [_sequence_logprob(model, smol_tokenizer, r.filled_prompt, r.target_with_space) for r in requests]
    original = {name: t.detach().clone() for name, t in model.state_dict().items()}

    editor = LocateThenEditEditor(editable, smol_tokenizer, layers, MemitSolver(), moments, CONTEXT_GROUPS,
                                  TargetHParams(v_lr=0.5, v_num_grad_steps=20))
    report = editor.apply(requests)

    after = [_sequence_logprob(model, smol_tokenizer, r.filled_prompt, r.target_with_space) for r in requests]
    for b, a in zip(before, after):
        assert a > b + 3.0, (before, after)  # at least e³ ≈ 20 times likelier on its own prompt
    assert report.num_requests == 2 and set(report.update_norm) == set(layers)
    assert all(v > 0 for v in report.update_norm.values())
    edited = {editable.mlp_out_name(layer) + ".weight" for layer in layers}
    state = model.state_dict()
    assert set(state) == set(original)
    for name, value in state.items():
        if name in edited:
            assert not torch.equal(value, original[name]), name
        else:
            assert torch.equal(value, original[name]), name
    # no hook was left behind on any module
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    # the fixture's model was not touched
    assert torch.equal(tiny_llama.state_dict()[editable.mlp_out_name(1) + ".weight"],
                       original[editable.mlp_out_name(1) + ".weight"])


@pytest.mark.parametrize("groups", [CONTEXT_GROUPS, [["I heard it. {}"], ["The weather was nice today. {}"]]],
                         ids=["with-plain-template", "without-plain-template"])
def test_keys_and_site_outputs_in_one_pass_equal_separate_passes(monkeypatch, smol_tokenizer, tiny_llama, groups):
    """The editor reads each layer's keys and h_L in one forward; h_L comes from the "{}" rows (or, when the
    templates have none, from a pass of its own) and must equal the plain-prompt site outputs."""
    monkeypatch.setattr(smol_tokenizer, "padding_side", "left")
    editable = EditableModel.wrap(tiny_llama)
    site = editable.block(2)
    keys, h = compute_keys_and_site_outputs(editable, smol_tokenizer, V_REQUESTS, [1], groups, site)
    torch.testing.assert_close(keys[1], compute_keys(editable, smol_tokenizer, V_REQUESTS, [1], groups)[1],
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(h, compute_site_outputs(editable, smol_tokenizer, V_REQUESTS, site), rtol=0, atol=1e-5)
    assert compute_keys_and_site_outputs(editable, smol_tokenizer, V_REQUESTS, [1], groups, None)[1] is None


def _plain_site_output(model, tokenizer, site, request: EditRequest) -> torch.Tensor:
    """h: the site's output at the subject's last token of the plain prompt, one unpadded forward."""
    at = request.prompt.find("{}")
    text = request.prompt.replace("{}", request.subject, 1)
    return _site_output(model, site, _ids(tokenizer, text),
                        _subject_last_position(tokenizer, text, at + len(request.subject)))


def _straightforward_sequential_edit(model, tokenizer, layers, batches, groups, hp, moments, solver: str,
                                     projectors=None, l2: float = 0.0):
    """The editor's whole computation, the obvious way (ALGORITHMS.md §1–3): per batch, v* per request with the
    unpadded reference; per layer (ascending) keys and h_L read one prompt at a time on the current model,
    R = (V* − H)/(L − i), and Δ from the papers' closed forms with explicit inverses in float64:
    MEMIT Δ = R Kᵀ (λC + KKᵀ)⁻¹;  AlphaEdit Δ = R Kᵀ P (K_pK_pᵀP + KKᵀP + l2·I)⁻¹, K_pK_pᵀ += KKᵀ after a batch."""
    editable = EditableModel.wrap(model)
    site = editable.block(layers[-1])
    lam = {layer: float(editable.key_dim(layer)) for layer in layers}  # mom2_update_weight_per_key_dim = 1
    past = {layer: torch.zeros_like(moments[layer]) for layer in layers}
    for batch in batches:
        values = torch.stack([_reference_target(model, tokenizer, site, r, groups, hp)[0] for r in batch], 1)
        for i, layer in enumerate(layers):
            keys = torch.stack([_reference_keys(editable, tokenizer, r, layer, groups) for r in batch], 1).double()
            current = torch.stack([_plain_site_output(model, tokenizer, site, r) for r in batch], 1)
            residuals = (values - current).double() / (len(layers) - i)
            eye = torch.eye(keys.shape[0], dtype=torch.float64)
            if solver == "memit":
                delta = residuals @ keys.T @ torch.linalg.inv(lam[layer] * moments[layer] + keys @ keys.T)
            else:
                p = projectors[layer]
                delta = residuals @ keys.T @ p @ torch.linalg.inv(past[layer] @ p + keys @ keys.T @ p + l2 * eye)
            with torch.no_grad():
                editable.weight(layer).add_(delta.to(editable.weight(layer).dtype))
        if solver == "alphaedit":
            for layer in layers:
                keys = torch.stack([_reference_keys(editable, tokenizer, r, layer, groups) for r in batch], 1)
                past[layer] += keys.double() @ keys.double().T
    return {layer: editable.weight(layer).detach().clone() for layer in layers}


@pytest.mark.parametrize("linear_backend", ["aten", "onednn"])
@pytest.mark.parametrize("solver", ["memit", "alphaedit"])
def test_sequential_edits_equal_the_straightforward_computation(monkeypatch, smol_tokenizer, tiny_llama, solver,
                                                                linear_backend):
    """Issue 7's guard: everything made fast (prefix cache, replayed lower blocks, chunked head, one pass for keys
    and h_L, Cholesky / incremental solves, and, with onednn, every linear product on oneDNN) leaves the edited
    weights equal to the plain computation, over two sequential batches (so AlphaEdit's past-edit memory is
    exercised)."""
    if linear_backend == "onednn" and not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 0)  # the tiny model's weights are all small
    monkeypatch.setattr(smol_tokenizer, "padding_side", "left")
    layers = [1, 2]
    hp = TargetHParams(v_lr=0.5, v_num_grad_steps=4)
    batches = [V_REQUESTS[:2], V_REQUESTS[2:3]]
    texts = [" ".join(random.Random(seed).sample(
        "the of a city river bridge council violin languages water boils degrees food pasta tomato sauce basil "
        "quick brown fox jumps lazy dog voted build plays speaks three hundred favourite".split(), 14)) + "."
        for seed in range(30)]
    reference_model, editor_model = _sharpened(tiny_llama), _sharpened(tiny_llama)
    moments = _second_moments(EditableModel.wrap(reference_model), smol_tokenizer, layers, texts)
    projectors = {layer: nullspace_projector(moments[layer], "energy", 0.0, 0.3)[0] for layer in layers}
    assert all(0 < int(torch.linalg.matrix_rank(p)) < p.shape[0] for p in projectors.values())
    expected = _straightforward_sequential_edit(reference_model, smol_tokenizer, layers, batches, CONTEXT_GROUPS, hp,
                                                moments, solver, projectors, l2=0.1)

    route_linears(editor_model, linear_backend)  # the reference model keeps PyTorch's own products
    editable = EditableModel.wrap(editor_model)
    original = {layer: editable.weight(layer).detach().clone() for layer in layers}
    if solver == "memit":
        chosen = MemitSolver()
    else:
        chosen = AlphaEditSolver(l2=0.1, nullspace_mode="energy", nullspace_energy=0.3)
    editor = LocateThenEditEditor(editable, smol_tokenizer, layers, chosen, moments, CONTEXT_GROUPS, hp)
    for batch in batches:
        editor.apply(batch)
    for layer in layers:
        change = expected[layer] - original[layer]
        assert float(change.norm()) > 1e-2  # the edit really changed the layer
        assert _rel(editable.weight(layer) - original[layer], change) < 1e-4, layer
