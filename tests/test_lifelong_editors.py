"""UltraEdit, GRACE and WISE (methods/editors) against their equations (ALGORITHMS.md §11–13), on tiny random models
with independent references, and on the real SmolLM2: an edit changes what the model says, an unrelated prompt does
not move. Their registration (configs refused before any model loads) is checked here too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grid.config import ConfigError, expand_trials, load_config, method_settings
from methods.infra.arch import ArchitectureError, EditableModel
from methods.editors.grace import Codebook, GraceEditor, GraceHParams
from methods.editors.ultraedit import (NORMALIZER_EPS, RunningMeanStd, UltraEditEditor, UltraEditHParams,
                                       ultraedit_delta)
from methods.finetune import target_nll_batch
from methods.infra.kv_cache import needs_whole_sequences
from methods.requests import EditRequest
from methods.stages import build_editor

REQUESTS = [EditRequest("{} is located in the country of", "The Eiffel Tower", "Italy"),
            EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
            EditRequest("{} plays the sport of", "LeBron James", "cricket"),
            EditRequest("{} was created by the company", "The iPhone", "Nokia Corporation")]


# ---------------------------------------------------------------------------------------------- UltraEdit

def test_running_normaliser_matches_a_direct_computation_over_every_row_seen():
    torch.manual_seed(0)
    blocks = [torch.randn(n, 5) * 3 + 1 for n in (4, 7, 1, 9)]  # a one-row block too (no variance term)
    normaliser = RunningMeanStd(5)
    for block in blocks:
        normaliser.update(block)
    rows = torch.cat(blocks).double()
    assert normaliser.count == len(rows)
    torch.testing.assert_close(normaliser.mean, rows.mean(0))
    # The original's M2 adds b·var_unbiased per block: the exact sum of squares plus each block's variance.
    extra = sum(b.double().var(0) for b in blocks if len(b) > 1)
    expected_std = ((rows - rows.mean(0)).square().sum(0) + extra).div(len(rows) - 1).sqrt()
    torch.testing.assert_close(normaliser.std, expected_std)
    restored = RunningMeanStd.from_state(normaliser.state_dict())
    torch.testing.assert_close(restored.normalize(rows), (rows - rows.mean(0)) / (expected_std + NORMALIZER_EPS))


def test_ultraedit_delta_is_the_ridge_solution():
    torch.manual_seed(1)
    keys, values = torch.randn(6, 4).double(), torch.randn(6, 3).double()
    delta = ultraedit_delta(keys, values, ridge=0.5)
    k, v = keys.t(), values.t()  # columns: d_in×N, d_out×N
    torch.testing.assert_close(delta, v @ k.t() @ torch.linalg.inv(k @ k.t() + 0.5 * torch.eye(4).double()))


def _reference_rows(model, modules, tokenizer, requests):
    """Keys and output gradients of each of ``modules`` ({key: linear module}) at the answer-predicting
    positions, read with retain_grad on an input that requires grad (a mechanism independent of the editor's zero
    probes)."""
    batch, rows, cols, tokens = target_nll_batch(tokenizer, requests)
    captured = {}

    def hook_for(key):
        def hook(module, args, output):
            output.retain_grad()
            captured[key] = (args[0].detach(), output)
        return hook

    handles = [module.register_forward_hook(hook_for(key)) for key, module in modules.items()]
    try:
        embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
        F.cross_entropy(logits[rows, cols], tokens).backward()
    finally:
        for handle in handles:
            handle.remove()
    return {key: (captured[key][0][rows, cols].double(), captured[key][1].grad[rows, cols].double())
            for key in modules}


def test_ultraedit_update_equals_the_closed_form_from_independently_read_keys_and_gradients(
        tiny_llama, smol_tokenizer):
    editable = EditableModel.wrap(tiny_llama)
    layers, lr, micro = [1, 2], 0.3, 2
    before = {layer: editable.weight(layer).clone() for layer in layers}
    try:
        parts = [_reference_rows(tiny_llama, {layer: editable.mlp_out(layer) for layer in layers}, smol_tokenizer,
                                 REQUESTS[i:i + micro])
                 for i in range(0, len(REQUESTS), micro)]
        editor = UltraEditEditor(editable, smol_tokenizer, layers, UltraEditHParams(ultra_lr=lr,
                                                                                    ultra_micro_batch=micro))
        report = editor.apply(REQUESTS)
        # One normaliser for the two same-shaped matrices; its blocks: each micro-batch × each layer.
        blocks = [torch.cat(part[layer], dim=1) for part in parts for layer in layers]
        rows = torch.cat(blocks)
        mean = rows.mean(0)
        std = ((rows - mean).square().sum(0) + sum(b.var(0) for b in blocks)).div(len(rows) - 1).sqrt()
        assert list(editor.normalizers) == ["64x96"] and editor.normalizers["64x96"].count == len(rows)
        for layer in layers:
            keys = torch.cat([part[layer][0] for part in parts])
            grads = torch.cat([part[layer][1] for part in parts])
            normalized = (torch.cat([keys, grads], dim=1) - mean) / (std + NORMALIZER_EPS)
            k_hat, g_hat = normalized[:, :96], normalized[:, 96:]
            values = -lr * k_hat.square().sum(1, keepdim=True) * g_hat
            k, v = keys.t(), values.t()
            expected = v @ k.t() @ torch.linalg.inv(k @ k.t() + torch.eye(96).double())
            written = editable.weight(layer).double() - before[layer].double()
            # fp32 gradients summed in another order (the editor's head runs in vocabulary chunks) and the fp32 add
            # to W: agreement to 1e-4 of the update's scale
            torch.testing.assert_close(written, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
            assert report.update_norm[layer] == pytest.approx(float(expected.norm()), rel=1e-4)
    finally:
        with torch.no_grad():
            for layer in layers:
                editable.weight(layer).copy_(before[layer])


def test_ultraedit_on_gate_and_up_projections_equals_the_closed_form_with_one_pooled_normaliser(
        tiny_llama, smol_tokenizer):
    """ultra_targets (the original's Llama setting): the keys are the MLP's input, the gradients are taken at each
    projection's output; the gate and up matrices share a shape and so one normaliser; nothing else changes."""
    editable = EditableModel.wrap(tiny_llama)
    targets, lr = {"gate_proj": [1], "up_proj": [2]}, 0.3
    modules = {"L1.gate_proj": tiny_llama.model.layers[1].mlp.gate_proj,
               "L2.up_proj": tiny_llama.model.layers[2].mlp.up_proj}
    before = {name: p.detach().clone() for name, p in tiny_llama.named_parameters()}
    try:
        reference = _reference_rows(tiny_llama, modules, smol_tokenizer, REQUESTS)
        editor = UltraEditEditor(editable, smol_tokenizer, [], UltraEditHParams(ultra_lr=lr, ultra_micro_batch=4,
                                                                                 ultra_targets=targets))
        assert editor.layers == [1, 2] and editor.written_layers == []
        assert sorted(editor.other_written_matrices()) == ["L1.gate_proj", "L2.up_proj"]
        report = editor.apply(REQUESTS)
        blocks = [torch.cat(reference[label], dim=1) for label in modules]  # model order: gate L1, then up L2
        rows = torch.cat(blocks)
        mean = rows.mean(0)
        std = ((rows - mean).square().sum(0) + sum(b.var(0) for b in blocks)).div(len(rows) - 1).sqrt()
        assert list(editor.normalizers) == ["96x64"] and editor.normalizers["96x64"].count == len(rows)
        for label, module in modules.items():
            keys, grads = reference[label]
            normalized = (torch.cat([keys, grads], dim=1) - mean) / (std + NORMALIZER_EPS)
            values = -lr * normalized[:, :64].square().sum(1, keepdim=True) * normalized[:, 64:]
            k, v = keys.t(), values.t()
            expected = v @ k.t() @ torch.linalg.inv(k @ k.t() + torch.eye(64).double())
            name = next(n for n, p in tiny_llama.named_parameters() if p is module.weight)
            written = module.weight.detach().double() - before[name].double()
            torch.testing.assert_close(written, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
            assert report.update_norm[label] == pytest.approx(float(expected.norm()), rel=1e-4)
        changed = {name for name, p in tiny_llama.named_parameters() if not torch.equal(p.detach(), before[name])}
        assert changed == {"model.layers.1.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight"}
        # a target that is the MLP output projection itself counts as one (W₀, drift, restraints)
        down = UltraEditEditor(editable, smol_tokenizer, [], UltraEditHParams(ultra_targets={"down_proj": [3]}))
        assert down.written_layers == [3] and down.other_written_matrices() == {}
    finally:
        with torch.no_grad():
            for name, p in tiny_llama.named_parameters():
                p.copy_(before[name])


def test_ultraedit_targets_that_are_not_linear_maps_of_the_mlp_are_refused(tiny_llama, smol_tokenizer):
    editable = EditableModel.wrap(tiny_llama)
    with pytest.raises(ArchitectureError, match=r"model.layers.1.mlp.gate does not exist .* gate_proj, up_proj, "
                                                r"down_proj"):
        UltraEditEditor(editable, smol_tokenizer, [], UltraEditHParams(ultra_targets={"gate": [1]}))
    with pytest.raises(ArchitectureError, match=r"model.layers.1.mlp.act_fn is a SiLU"):
        UltraEditEditor(editable, smol_tokenizer, [], UltraEditHParams(ultra_targets={"act_fn": [1]}))


def test_ultraedit_state_carries_the_lifelong_statistics(tiny_llama, smol_tokenizer):
    """A second turn normalises with the first turn's rows included; a restored editor continues identically."""
    editable = EditableModel.wrap(tiny_llama)
    layers = [2]
    before = editable.weight(2).clone()
    try:
        editor = UltraEditEditor(editable, smol_tokenizer, layers, UltraEditHParams(ultra_lr=0.1))
        editor.apply(REQUESTS[:2])
        state, after_first = editor.state_dict(), editable.weight(2).clone()
        editor.apply(REQUESTS[2:])
        continued = editable.weight(2).clone()
        rows_after_two = editor.normalizers["64x96"].count
        with torch.no_grad():
            editable.weight(2).copy_(after_first)
        fresh = UltraEditEditor(editable, smol_tokenizer, layers, UltraEditHParams(ultra_lr=0.1))
        fresh.load_state_dict(state)
        fresh.apply(REQUESTS[2:])
        torch.testing.assert_close(editable.weight(2), continued)
        assert fresh.normalizers["64x96"].count == rows_after_two > state["normalizers"]["64x96"]["count"]
    finally:
        with torch.no_grad():
            editable.weight(2).copy_(before)


# ---------------------------------------------------------------------------------------------- GRACE

def _value(x):
    return lambda: torch.full((2,), float(x))


def test_grace_codebook_adds_splits_and_widens_as_the_rules_say():
    book = Codebook(key_dim=2, value_dim=2)
    assert book.update(torch.tensor([0.0, 0.0]), (1,), 0, 1.0, "coverage", _value(1)) == (0, "added")
    # farther than ε_init + ε_0 = 2: a new key with radius ε_init
    assert book.update(torch.tensor([3.0, 0.0]), (2,), 1, 1.0, "coverage", _value(2)) == (1, "added")
    # 1.5 from key 0 (≤ 2), another label: split both balls at the midpoint
    assert book.update(torch.tensor([0.0, 1.5]), (3,), 2, 1.0, "coverage", _value(3)) == (2, "split")
    assert book.radii[0] == pytest.approx(0.75 - 1e-5) and book.radii[2] == pytest.approx(0.75)
    # 1.8 from key 1 (ε 1), the same label: no new key, key 1's radius grows to the distance
    assert book.update(torch.tensor([3.0, -1.8]), (2,), 3, 1.0, "coverage", _value(4)) == (1, "expanded")
    assert book.radii[1] == pytest.approx(1.8) and len(book) == 3
    # inside key 1's ball, same label: covered as it is
    assert book.update(torch.tensor([3.0, 1.0]), (2,), 4, 1.0, "coverage", _value(5)) == (1, "covered")
    assert book.labels == [(1,), (2,), (3,)] and book.edit_ids == [0, 1, 2]  # appended together (no prepend)
    torch.testing.assert_close(book.values.detach()[:, 0], torch.tensor([1.0, 2.0, 3.0]))
    # moving_average moves the key halfway to the query
    book.update(torch.tensor([3.0, -1.0]), (2,), 5, 1.0, "moving_average", _value(6))
    torch.testing.assert_close(book.keys[1], torch.tensor([3.0, -0.5]))


def test_grace_same_key_with_another_answer_replaces_and_near_keys_are_measured_exactly():
    """Found at edit 226 of a 1,000-edit CounterFact trial: a split ball can be smaller than the float32 error of
    ‖q‖² + ‖k‖² − 2q·k, so a query missed the key made from it and training had nothing to train."""
    book = Codebook(key_dim=2, value_dim=2)
    book.update(torch.tensor([100.0, 100.0]), (1,), 0, 1.0, "coverage", _value(1))
    # the same key, another answer: a zero-radius split would serve neither; the newer edit takes the key over
    assert book.update(torch.tensor([100.0, 100.0]), (2,), 1, 1.0, "coverage", _value(7)) == (0, "replaced")
    assert book.labels == [(2,)] and book.edit_ids == [1] and book.replacements == 1 and book.radii[0] == 1.0
    torch.testing.assert_close(book.values.detach()[0], torch.full((2,), 7.0))
    # a query 1e-3 from a key among many rows (where cdist would switch to the matrix-product form) is 1e-3 away
    queries = torch.cat([torch.full((40, 2), 500.0), torch.tensor([[100.0, 100.001]])])
    distance, index = book.nearest(queries)
    assert int(index[-1]) == 0 and float(distance[-1]) == pytest.approx(1e-3, rel=1e-2)


def test_grace_replaces_the_layer_output_exactly_where_a_key_is_within_its_radius(tiny_llama, smol_tokenizer):
    editable = EditableModel.wrap(tiny_llama)
    editor = GraceEditor(editable, smol_tokenizer, [2], GraceHParams())
    module = editable.mlp_out(2)
    try:
        x = torch.randn(1, 3, 96)
        plain = module(x)  # empty codebook: unchanged
        editor.codebook.add(x[0, 1], torch.full((64,), 7.0), 0.5, (1,), 0)
        editor.codebook.add(x[0, 2] + 10.0, torch.full((64,), 9.0), 0.5, (2,), 1)  # far from every query
        out = module(x)
        torch.testing.assert_close(out[0, 1], torch.full((64,), 7.0))
        torch.testing.assert_close(out[0, [0, 2]], plain[0, [0, 2]])
    finally:
        editor.remove()


def test_grace_state_round_trips(tiny_llama, smol_tokenizer):
    editable = EditableModel.wrap(tiny_llama)
    editor = GraceEditor(editable, smol_tokenizer, [2], GraceHParams(grace_n_iter=3), seed=3)
    try:
        editor.apply(REQUESTS[:2])
        state = editor.state_dict()
    finally:
        editor.remove()
    other = GraceEditor(editable, smol_tokenizer, [2], GraceHParams(grace_n_iter=3), seed=99)
    try:
        other.load_state_dict(state)
        assert other.codebook.labels == editor.codebook.labels and other.edits == 2
        torch.testing.assert_close(other.codebook.values.detach(), editor.codebook.values.detach())
        torch.testing.assert_close(torch.rand(4, generator=other.generator), torch.rand(4, generator=editor.generator))
    finally:
        other.remove()


# ---------------------------------------------------------------------------------------------- registry

def test_lifelong_presets_expand_and_bad_values_are_refused_together():
    for method in ("ultraedit", "grace", "wise", "wise-retrieve", "memoir", "ultraedit+scr", "grace+scr", "wise+scr",
                   "memoir+scr"):
        cfg, source = load_config(None, [f"method={method}"])
        (trial,) = expand_trials(cfg, source)
        assert trial.config["method"] == method
    assert method_settings("grace", {}).edits_weights is False
    assert method_settings("ultraedit+scr", {}).retrieval == "scr"
    cfg, source = load_config(None, ["method=ultraedit", "hparams.ultra_lr=0", "hparams.ultra_micro_batch=0"])
    with pytest.raises(ConfigError) as err:
        expand_trials(cfg, source)
    assert "hparams.ultra_lr: 0" in str(err.value) and "hparams.ultra_micro_batch: 0" in str(err.value)
    cfg, source = load_config(None, ["method=ultraedit", "hparams.layers=[3]",
                                     "hparams.ultra_targets={gate_proj: [1, 1], up_proj: []}"])
    with pytest.raises(ConfigError) as err:
        expand_trials(cfg, source)
    assert "hparams.ultra_targets: {'gate_proj': [1, 1], 'up_proj': []} is invalid (must be null" in str(err.value)
    cfg, source = load_config(None, ["method=ultraedit", "hparams.layers=[3]",
                                     "hparams.ultra_targets={gate_proj: [1, 2]}"])
    with pytest.raises(ConfigError, match="hparams.layers: \\[3\\] and hparams.ultra_targets: .* are both set"):
        expand_trials(cfg, source)
    cfg, source = load_config(None, ["method=ultraedit", "hparams.ultra_targets={gate_proj: [40], up_proj: [2]}"])
    with pytest.raises(ConfigError, match=r"the layers of hparams.ultra_targets \[2, 40\] reach beyond the 30 "):
        expand_trials(cfg, source, check_depth=True)  # against the model's config, before it loads
    cfg, source = load_config(None, ["method=ultraedit", "hparams.ultra_targets={gate_proj: [1, 2], up_proj: [4]}"])
    (trial,) = expand_trials(cfg, source)
    assert method_settings("ultraedit", trial.config["hparams"]).layers((0,), 30) == [1, 2, 4]
    cfg, source = load_config(None, ["method=grace", "hparams.grace_eps_init=-1", "hparams.layers=[3, 4]",
                                     "hparams.v_lr=0.5"])
    with pytest.raises(ConfigError) as err:
        expand_trials(cfg, source)
    message = str(err.value)
    assert "grace_eps_init: -1" in message and "at most 1 layer" in message and "hparams.v_lr: unknown" in message
    cfg, source = load_config(None, ["method=memoir", "hparams.memoir_threshold=1.5",
                                     "hparams.memoir_active_share=0", "hparams.memoir_background_samples=500"])
    with pytest.raises(ConfigError) as err:
        expand_trials(cfg, source)
    message = str(err.value)
    assert ("memoir_threshold: 1.5" in message and "memoir_active_share: 0" in message
            and "memoir_background_samples: 500" in message)


# ---------------------------------------------------------------------------------------------- SmolLM2

def _greedy(model, tokenizer, prompt: str, n: int = 4) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def _next_token_logits(model, tokenizer, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]


SMOL_EDITS = [EditRequest("{} is located in the country of", "The Eiffel Tower", "Italy"),
              EditRequest("{}'s domain of activity is", "Anselme Payen", "mathematics"),
              EditRequest("{}, whose headquarters are in", "Lyndon B. Johnson Space Center", "Montreal")]
UNRELATED = "The chemical symbol for gold is"


@pytest.mark.parametrize("method,hparams", [("ultraedit", {"ultra_lr": 3e-3}),
                                            # the original's Llama-3 setting mirrored on 30 layers (gate + up)
                                            ("ultraedit", {"ultra_lr": 6e-4, "ultra_targets": {
                                                "gate_proj": [10, 11, 12, 13, 14],
                                                "up_proj": [17, 18, 19, 20, 21, 22, 23]}}),
                                            ("grace", {"grace_eps_init": 3.0, "grace_n_iter": 30}),
                                            ("wise-retrieve", {"wise_n_iter": 30}),
                                            ("memoir", {})])
def test_an_edit_changes_what_smollm2_says_and_leaves_an_unrelated_prompt(method, hparams, smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    editable = EditableModel.wrap(model)
    spec = method_settings(method, hparams)
    layers = spec.layers(editable.default_layers(), editable.num_layers)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    unrelated_before = _next_token_logits(model, tok, UNRELATED)
    for request in SMOL_EDITS:
        assert not _greedy(model, tok, request.filled_prompt).strip().startswith(request.target)
    editor = build_editor(spec, editable, tok, layers, {}, [])
    try:
        editor.apply(SMOL_EDITS)
        said = [_greedy(model, tok, request.filled_prompt) for request in SMOL_EDITS]
        hits = sum(text.strip().startswith(request.target) for text, request in zip(said, SMOL_EDITS))
        assert hits >= 2, said
        unrelated_after = _next_token_logits(model, tok, UNRELATED)
        assert int(unrelated_after.argmax()) == int(unrelated_before.argmax())
        if method != "ultraedit":  # the unrelated prompt is not routed to the memory: computed exactly as before
            torch.testing.assert_close(unrelated_after, unrelated_before)
    finally:
        if hasattr(editor, "remove"):
            editor.remove()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(before[name])


# ---------------------------------------------------------------------------------------------- WISE

def test_ties_merge_trims_elects_the_sign_and_averages_the_agreeing_entries():
    from methods.editors.wise import ties_merge
    base = torch.zeros(1, 4)
    a = torch.tensor([[4.0, -1.0, 2.0, 0.1]])
    b = torch.tensor([[2.0, 3.0, -4.0, 0.2]])
    # density 0.5: a keeps [4, 0, 2, 0], b keeps [0, 3, -4, 0]. Weighted sums (½ each): [2, 1.5, -1, 0] → elected
    # signs +, +, −, + (0 counts as +).
    merged = ties_merge(base, [a, b], [0.5, 0.5], density=0.5)
    # entry 0: only a's 4 survives → 4; entry 1: b's 3; entry 2: a's +2 disagrees with −, b's −4 agrees → −4;
    # entry 3: trimmed away in both → 0.
    torch.testing.assert_close(merged, torch.tensor([[4.0, 3.0, -4.0, 0.0]]))
    both = ties_merge(base, [a, torch.tensor([[2.0, 0.0, 1.0, 0.0]])], [0.5, 0.5], density=0.5)
    assert float(both[0, 0]) == 3.0  # where both agree: their weighted mean (½·4 + ½·2)/(½ + ½)
    # Merge mode's later merges weigh the old main memory 0.6 and each new shard 0.4/n
    torch.testing.assert_close(ties_merge(base, [a, a], [0.4, 0.6], density=1.0), a)


def test_wise_scores_and_routes_by_the_learnt_threshold(tiny_llama, smol_tokenizer):
    from methods.editors.wise import WiseEditor, WiseHParams, activation_scores, positive_mean
    assert float(positive_mean(torch.tensor([-1.0, 2.0, 4.0]))) == 3.0
    assert float(positive_mean(torch.tensor([-1.0, -2.0]))) == 0.0
    act = torch.nn.functional.silu
    x = torch.randn(2, 3, 96)
    base, other = torch.randn(64, 96), torch.randn(64, 96)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = [(act(x[i] @ other.t()) - act(x[i] @ base.t())).norm(dim=-1)[mask[i].bool()].mean() for i in range(2)]
    torch.testing.assert_close(activation_scores(x, other, base, act, mask), torch.stack(expected))

    editable = EditableModel.wrap(tiny_llama)
    editor = WiseEditor(editable, smol_tokenizer, [2], WiseHParams())
    module = editable.mlp_out(2)
    try:
        plain = module(x)
        editor.edits, editor.side = 1, editor.base + 0.5 * torch.randn(64, 96)
        scores = activation_scores(x, editor.side, editor.base, editor.act)
        editor.recorded = [float(scores.min() + scores.max()) / 2 / editor.hparams.wise_act_ratio]  # ε between
        out = module(x)
        high = int(scores.argmax())
        torch.testing.assert_close(out[high], x[high] @ editor.side.t())  # above ε: the side memory serves it
        torch.testing.assert_close(out[1 - high], plain[1 - high])  # below ε: W₀
        assert editor.metrics()["wise/routed_side_share"] == 0.5
    finally:
        editor.remove()


def test_wise_shards_merge_and_state_round_trips(tiny_llama, smol_tokenizer):
    from methods.editors.wise import WiseEditor, WiseHParams
    editable = EditableModel.wrap(tiny_llama)
    hparams = WiseHParams(wise_n_iter=2, wise_save_freq=1, wise_merge_freq=2, wise_mode="retrieve")
    editor = WiseEditor(editable, smol_tokenizer, [2], hparams, seed=1)
    try:
        before = editable.weight(2).clone()
        editor.apply(REQUESTS[:3])
        # 3 edits, a shard each, merged in twos: one stored memory, one shard pending, the side memory reset
        assert (len(editor.memories), len(editor.shards), editor.merges) == (1, 1, 1)
        torch.testing.assert_close(editor.side, editor.base)
        torch.testing.assert_close(editable.weight(2), before)  # W₀ itself never changes
        state = editor.state_dict()
    finally:
        editor.remove()
    other = WiseEditor(editable, smol_tokenizer, [2], hparams, seed=7)
    try:
        other.load_state_dict(state)
        torch.testing.assert_close(other.memories[0][0], editor.memories[0][0])
        assert other.recorded == editor.recorded and other.edits == 3
        torch.testing.assert_close(torch.rand(3, generator=other.generator), torch.rand(3, generator=editor.generator))
    finally:
        other.remove()


def test_memory_editors_report_which_rows_their_memory_serves(tiny_llama, smol_tokenizer):
    """``served_rows`` (the memory/served_share/* evaluator's question): GRACE serves a row exactly when one of its
    real tokens' layer inputs lies within a key's radius; WISE when a row is routed away from W₀; neither moves the
    per-batch routing counters."""
    from evals.batching import left_padded
    from methods.editors.wise import WiseEditor, WiseHParams

    editable = EditableModel.wrap(tiny_llama)
    ids, mask = left_padded([smol_tokenizer("The Eiffel Tower is located in")["input_ids"],
                             smol_tokenizer("Bananas are")["input_ids"]], 0)
    module = editable.mlp_out(2)
    grace = GraceEditor(editable, smol_tokenizer, [2], GraceHParams())
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    try:
        assert grace.served_rows(ids, mask).tolist() == [False, False]  # empty codebook
        handle.remove()
        grace.codebook.add(seen[-1][0, -1], torch.zeros(64), 1e-3, (1,), 0)  # row 0's last token, tiny radius
        assert grace.served_rows(ids, mask).tolist() == [True, False]
        grace.codebook.add(seen[-1][1, 0], torch.zeros(64), 1e-3, (2,), 1)  # a padded position of row 1
        assert grace.served_rows(ids, mask).tolist() == [True, False]  # padding never counts
    finally:
        handle.remove()
        grace.remove()

    wise = WiseEditor(editable, smol_tokenizer, [2], WiseHParams())
    try:
        assert needs_whole_sequences(tiny_llama)  # routed by all of a sequence's tokens: no cached prompts
        assert wise.served_rows(ids, mask).tolist() == [False, False]  # nothing edited
        wise.edits, wise.side = 1, wise.base + 0.5 * torch.randn(64, 96)
        wise.recorded = [1e-9]  # ε below every score: the side memory serves every row
        assert wise.served_rows(ids, mask).tolist() == [True, True]
        wise.recorded = [1e9]
        assert wise.served_rows(ids, mask).tolist() == [False, False]
        assert sum(wise.routed.values()) == 0  # the counters of metrics() are untouched
    finally:
        wise.remove()
    assert not needs_whole_sequences(tiny_llama)
