"""NAS's norm anchor (methods/target_scaling/nas.py): the trimmed reference mean, the rescaling of v*'s MLP part
against hand-computed vectors, v₀ read from the MLP (not the block) on a tiny random Llama, the editor writing
the plain update when r equals the edit's own norm and nothing when the edit is skipped, and the cached r."""

from __future__ import annotations

import json

import pytest
import torch

from methods.editor import LocateThenEditEditor
from methods.infra.arch import EditableModel
from methods.requests import EditRequest
from methods.solvers.memit import MemitSolver
from methods.stages import MethodSpec, build_editor, method_problems
from methods.target_scaling.nas import NormAnchor, anchor_values, reference_norm, upper_trimmed_mean
from methods.targets import TargetHParams, compute_target_values

REQUESTS = [EditRequest(prompt="The capital city of {} is", subject="Norland", target="Paris"),
            EditRequest(prompt="{} plays the", subject="Maria Cole", target="violin")]
GROUPS = [["{}"], ["Hello. {}"]]
HP = TargetHParams(v_num_grad_steps=4)
LAYERS = [1, 2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _moments(editable, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in LAYERS:
        m = editable.key_dim(layer)
        a = torch.randn(m, 3 * m, generator=g, dtype=torch.float64)
        out[layer] = (a @ a.T / (3 * m) + 0.05 * torch.eye(m, dtype=torch.float64)).float()
    return out


def _editor(editable, tokenizer, scaling=None, site="block"):
    return LocateThenEditEditor(editable, tokenizer, LAYERS, MemitSolver(mom2_update_weight=0.5), _moments(editable),
                                GROUPS, HP, target_site=site, target_scaling=scaling)


def _saved(editable):
    return {layer: editable.weight(layer).clone() for layer in LAYERS}


def _restore(editable, saved):
    with torch.no_grad():
        for layer, weight in saved.items():
            editable.weight(layer).copy_(weight)


def test_upper_trimmed_mean_drops_the_floor_of_the_trim_share_of_largest_norms():
    norms = [float(x) for x in range(1, 21)]  # 20 values: ⌊0.05·20⌋ = 1 dropped (the 20)
    assert upper_trimmed_mean(norms, 0.05) == (sum(range(1, 20)) / 19, 1)
    assert upper_trimmed_mean(norms[:19], 0.05) == (10.0, 0)  # ⌊0.95⌋ = 0: nothing dropped
    assert upper_trimmed_mean([5.0, 1.0, 3.0, 100.0], 0.25) == (3.0, 1)  # the largest, wherever it stands
    assert upper_trimmed_mean(norms, 0.0) == (10.5, 0)
    with pytest.raises(ValueError, match="non-finite"):
        upper_trimmed_mean([1.0, float("nan")], 0.05)
    with pytest.raises(ValueError, match="no reference"):
        upper_trimmed_mean([], 0.05)


def test_anchor_values_rescale_the_mlp_part_to_r_and_skip_what_asks_for_more_than_twice_r():
    h = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
    v0 = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    delta = torch.tensor([[0.0, 4.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    # rows: u = (3,4,0), ‖u‖ = 5 — anchored to r = 10 → u' = (6,8,0); row 3: u = (0,1,0), ‖u‖ = 1
    out, skipped, norms = anchor_values(h, h + delta, v0, 10.0, 2.0)
    assert torch.allclose(norms, torch.tensor([5.0, 5.0, 1.0]))
    assert skipped.tolist() == [False, False, False]
    assert torch.allclose(out[0], torch.tensor([1.0 + 3.0, 1.0 + 8.0, 1.0]))  # h + (u' − v₀)
    assert torch.allclose(out[2], torch.tensor([0.0, 2.0 + 9.0, 0.0]))  # u' = (0,10,0): h + (0,9,0)
    # r = 2: ‖u‖ = 5 > 2·2 → skipped (v*' = h); ‖u‖ = 1 ≤ 4 → scaled up to 2
    out, skipped, _ = anchor_values(h, h + delta, v0, 2.0, 2.0)
    assert skipped.tolist() == [True, True, False]
    assert torch.equal(out[0], h[0]) and torch.equal(out[1], h[1])
    assert torch.allclose(out[2], torch.tensor([0.0, 3.0, 0.0]))
    # the boundary is "more than": ‖u‖ = 5 = 2 · 2.5 is rescaled, not skipped
    _, skipped, _ = anchor_values(h, h + delta, v0, 2.5, 2.0)
    assert skipped.tolist() == [False, False, False]


def test_value_norms_read_v0_at_the_mlp_output_of_the_site_layer(smol_tokenizer, tiny_llama):
    editable = EditableModel.wrap(tiny_llama)
    editor = _editor(editable, smol_tokenizer)
    got = editor.value_norms(REQUESTS, GROUPS)
    # the reference computation, written out: v* at the block output, v₀ by a hook on the MLP of layer 2
    target = compute_target_values(tiny_llama, smol_tokenizer, editable.block(2), REQUESTS, GROUPS, HP)
    mlp_out = []
    handle = editable.mlp(2).register_forward_hook(lambda module, args, output: mlp_out.append(output.detach()))
    try:
        for request in REQUESTS:
            ids = smol_tokenizer(request.filled_prompt, return_tensors="pt").input_ids
            subject_end = len(smol_tokenizer(request.prompt.split("{}")[0] + request.subject).input_ids) - 1
            with torch.no_grad():
                tiny_llama(input_ids=ids)
            mlp_out[-1] = mlp_out[-1][0, subject_end]
    finally:
        handle.remove()
    expected = (torch.stack(mlp_out) + target.values - target.initial).norm(dim=1)
    assert got == pytest.approx(expected.tolist(), rel=1e-4)
    # v₀ is not the block output h: with it the norms would be ‖v*‖
    assert got != pytest.approx(target.values.norm(dim=1).tolist(), rel=1e-2)
    # with the MLP output as the site, v₀ = h and u = v*
    mlp_site = _editor(editable, smol_tokenizer, site="mlp")
    at_mlp = compute_target_values(tiny_llama, smol_tokenizer, editable.mlp(2), REQUESTS, GROUPS, HP)
    assert mlp_site.value_norms(REQUESTS, GROUPS) == pytest.approx(at_mlp.values.norm(dim=1).tolist(), rel=1e-4)


def test_the_editor_writes_the_plain_update_at_its_own_norm_and_nothing_for_a_skipped_edit(smol_tokenizer,
                                                                                           tiny_llama):
    editable = EditableModel.wrap(tiny_llama)
    saved = _saved(editable)
    request = REQUESTS[:1]
    try:
        _editor(editable, smol_tokenizer).apply(request)
        plain = {layer: editable.weight(layer) - saved[layer] for layer in LAYERS}
        _restore(editable, saved)

        (own,) = _editor(editable, smol_tokenizer).value_norms(request, GROUPS)
        anchor = NormAnchor()
        anchor.prepare(own)  # r = ‖u‖: the scale is 1, so the update is MEMIT's own
        _editor(editable, smol_tokenizer, anchor).apply(request)
        for layer in LAYERS:
            change = editable.weight(layer) - saved[layer]
            assert float((change - plain[layer]).norm() / plain[layer].norm()) < 1e-4
        assert anchor.metrics()["nas/norm_ratio_mean"] == pytest.approx(1.0, rel=1e-4)
        _restore(editable, saved)

        anchor = NormAnchor()
        anchor.prepare(own / 2.5)  # ‖u‖ = 2.5 r > 2 r: skipped, the target is the current output
        _editor(editable, smol_tokenizer, anchor).apply(request)
        for layer in LAYERS:
            change = editable.weight(layer) - saved[layer]
            assert float(change.norm()) < 1e-3 * float(plain[layer].norm())
        assert anchor.metrics()["nas/skipped_edits"] == 1 and anchor.metrics()["nas/anchored_edits"] == 0
        _restore(editable, saved)

        anchor = NormAnchor()
        anchor.prepare(own / 1.5)  # rescaled down, not skipped: a smaller update in the same layers
        _editor(editable, smol_tokenizer, anchor).apply(request)
        for layer in LAYERS:
            ratio = float((editable.weight(layer) - saved[layer]).norm() / plain[layer].norm())
            assert 0.05 < ratio < 0.95
        assert anchor.metrics()["nas/anchored_edits"] == 1
    finally:
        _restore(editable, saved)


def test_the_reference_norm_is_solved_once_and_cached_by_what_it_depends_on(smol_tokenizer, tiny_llama, tmp_path,
                                                                           monkeypatch):
    editable = EditableModel.wrap(tiny_llama)
    editor = _editor(editable, smol_tokenizer, NormAnchor())
    calls = []
    original = LocateThenEditEditor.value_norms

    def counted(self, requests, groups):
        calls.append((len(requests), groups))
        return original(self, requests, groups)

    monkeypatch.setattr(LocateThenEditEditor, "value_norms", counted)
    entry = reference_norm(editor, REQUESTS * 3, 0.2, "tiny@abc", tmp_path, batch_size=4)
    assert calls == [(4, [["{}"]]), (2, [["{}"]])]  # the plain prompt only, in batches
    assert len(entry["norms"]) == 6
    assert entry["reference_norm"] == pytest.approx(upper_trimmed_mean(entry["norms"], 0.2)[0])
    assert entry["dropped"] == 1
    again = reference_norm(editor, REQUESTS * 3, 0.2, "tiny@abc", tmp_path, batch_size=4)
    assert again == entry and len(calls) == 2  # read from the cache
    reference_norm(editor, REQUESTS * 3, 0.2, "tiny@other-weights", tmp_path)
    reference_norm(editor, REQUESTS * 3, 0.1, "tiny@abc", tmp_path)
    assert len(calls) == 4 and len(list((tmp_path / "nas").glob("*.json"))) == 3
    # the same v* settings but another chunking: the same numbers, the same entry
    editor.target_hparams = TargetHParams(v_num_grad_steps=4, v_chunk_tokens=7)
    reference_norm(editor, REQUESTS * 3, 0.2, "tiny@abc", tmp_path)
    assert len(calls) == 4
    path = next(iter((tmp_path / "nas").glob("*.json")))
    assert json.loads(path.read_text())["description"]["site_layer"] == 2


def test_nas_composes_with_the_closed_form_solvers_only_and_checks_its_settings(smol_tokenizer, tiny_llama):
    spec = MethodSpec(solver="alphaedit", target_scaling="nas", hparams={"nas_samples": 8, "nas_trim": 0.1})
    assert method_problems(spec) == []
    editor = build_editor(spec, EditableModel.wrap(tiny_llama), smol_tokenizer, [2], {2: _moments(
        EditableModel.wrap(tiny_llama))[2]}, GROUPS)
    assert (editor.target_scaling.samples, editor.target_scaling.trim, editor.target_scaling.skip_factor) == (8, 0.1,
                                                                                                            2.0)
    assert "nas_skip_factor" in spec.defaults()
    problems = method_problems(MethodSpec(solver="ft", target_scaling="nas"))
    assert problems and "solver 'ft' has none" in problems[0]
    assert "editor 'grace' has none" in method_problems(MethodSpec(solver="none", editor="grace",
                                                                   target_scaling="nas"))[0]
    assert "unknown" in method_problems(MethodSpec(solver="memit", target_scaling="norm"))[0]
    bad = method_problems(MethodSpec(solver="memit", target_scaling="nas",
                                     hparams={"nas_trim": 1.0, "nas_samples": 0, "nas_skip_factor": -1}))
    assert len(bad) == 3 and all("hparams.nas_" in p for p in bad)
    with pytest.raises(RuntimeError, match="never set"):
        NormAnchor()(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))
