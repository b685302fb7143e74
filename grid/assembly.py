"""How a method becomes an editor on a loaded model: the one assembly a trial (grid/trial.py) and the editing
benchmark (benchmarks/bench_editing.py) share.

  layers      the configured ones, else the editor kind's default depths, else the architecture's window
  C           second moments of the edited layers' keys, for every editor that writes weights (the solvers read
              them; the drift diagnostic D reads them for all such editors) — computed by the caller, which knows
              its corpus and cache
  editor      built by the stage registry (methods/stages.py): a locate-then-edit composition, FT, or a registered
              editor kind (UltraEdit, GRACE, WISE)
  r           NAS's anchor norm (a ``target_scaling: nas`` method): solved on the unedited model from reference
              requests the caller picks, cached by content key (methods/target_scaling/nas.py)
  restraint   PRUNE-style restraints act on the cumulative W − W₀, so they keep the unedited weights W₀
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from methods.infra.arch import EditableModel
from methods.context import generate_context_templates
from methods.editor import other_matrices, written_layers
from methods.infra.cache import default_cache_dir
from methods.requests import EditRequest
from methods.target_scaling.nas import reference_norm
from methods.stages import FINE_TUNING, NO_SOLVER, MethodSpec, build_editor, build_restraint


class AssemblyError(ValueError):
    """A method that cannot be assembled on this model as configured."""


@dataclass
class MethodAssembly:
    spec: MethodSpec
    layers: list[int]  # the layers the editor acts on (weights written, or the module it wraps)
    editor: object | None  # None: the method edits nothing (SCR alone)
    restraint: object | None
    moments: dict[int, torch.Tensor]  # C per weight-writing layer given, on the model's device
    originals: dict[int, torch.Tensor]  # W₀ of the MLP output projections the editor writes in place, by layer
    # W₀ of the other matrices it writes (UltraEdit's ultra_targets), by label L<layer>.<path>; usually none
    other_originals: dict[str, torch.Tensor]
    context_groups: list[list[str]]  # v*'s context templates (locate-then-edit only)

    @property
    def weight_layers(self) -> list[int]:
        return sorted(self.originals)

    def live_weights(self, editable: EditableModel) -> dict[int, torch.Tensor]:
        return {layer: editable.weight(layer) for layer in self.weight_layers}

    def other_live_weights(self) -> dict[str, torch.Tensor]:
        """Live views of the other written matrices (``other_originals``' labels)."""
        return other_matrices(self.editor) if self.other_originals else {}


def resolve_layers(editable: EditableModel, spec: MethodSpec, who: str) -> list[int]:
    """The configured layers, else the editor kind's default depths, else the architecture's default window (its
    last layer(s) for one-layer solvers). ``who`` names the trial or benchmark cell in the error."""
    layers = spec.layers(editable.default_layers(), editable.num_layers)
    outside = [layer for layer in layers if layer >= editable.num_layers]
    if outside:
        raise AssemblyError(f"{who}: hparams.layers {outside} are outside the model ({editable.num_layers} layers, "
                            f"0–{editable.num_layers - 1})")
    return layers


def _prepare_target_scaling(spec: MethodSpec, editor, reference_requests, model_key: str,
                            cache_dir: Path | None) -> None:
    """Set NAS's anchor norm r from the reference requests (solved once per model and v* settings, then cached)."""
    if not reference_requests:
        raise AssemblyError(f"target_scaling {spec.target_scaling!r} needs reference requests to measure its anchor "
                            "norm on the unedited model; none were given")
    if not model_key:
        raise AssemblyError(f"target_scaling {spec.target_scaling!r} caches its anchor norm by the weights' key; "
                            "no model_key was given")
    scaling = editor.target_scaling
    entry = reference_norm(editor, reference_requests, scaling.trim, model_key,
                           cache_dir if cache_dir is not None else default_cache_dir())
    scaling.prepare(entry["reference_norm"])


def assemble_method(spec: MethodSpec, editable: EditableModel, tokenizer, layers: list[int],
                    moments: dict[int, torch.Tensor], *, seed: int, cache_dir: Path | None = None,
                    context_groups: list[list[str]] | None = None,
                    reference_requests: list[EditRequest] | None = None, model_key: str = "") -> MethodAssembly:
    """The editor, restraint and unedited weights of ``spec`` on ``editable``. ``moments`` holds C for (at least)
    ``layers`` when the method writes weights; ``context_groups`` are generated (seeded) when a locate-then-edit
    method needs them and none are given. A method with target scaling (NAS) needs ``reference_requests`` and the
    unedited weights' ``model_key`` (its cache key); ``editable`` must then be unedited."""
    device = editable.parameter_device()
    editor, groups = None, []
    writes = spec.edits_weights
    if spec.kind is None and spec.solver not in (FINE_TUNING, NO_SOLVER):  # the closed-form solvers read C
        missing = [layer for layer in layers if layer not in moments]
        if missing:
            raise AssemblyError(f"the {spec.solver} solver edits layers {layers} but second moments C were given "
                                f"for {sorted(moments)} only (missing {missing})")
    # C of the written layers: the solvers' and the drift diagnostic's (absent: no drift, e.g. in the benchmark)
    kept = {layer: moments[layer].to(device) for layer in layers if writes and layer in moments}
    if spec.edits_model:
        if spec.kind is None:  # v*'s context templates (locate-then-edit only)
            groups = (context_groups if context_groups is not None
                      else generate_context_templates(editable.model, tokenizer, seed=seed))
        editor = build_editor(spec, editable, tokenizer, layers, kept, groups, seed=seed, cache_dir=cache_dir)
        if spec.target_scaling is not None:
            _prepare_target_scaling(spec, editor, reference_requests, model_key, cache_dir)
    originals = {layer: editable.weight(layer).detach().clone() for layer in written_layers(editor, layers)}
    others = {label: weight.detach().clone() for label, weight in other_matrices(editor).items()}
    restraint = build_restraint(spec)
    if restraint is not None:
        if others:
            raise AssemblyError(f"the {spec.restraint} restraint acts on MLP output projections; this method also "
                                f"writes {', '.join(others)}")
        restraint.prepare(originals)
    return MethodAssembly(spec=spec, layers=layers, editor=editor, restraint=restraint, moments=kept,
                          originals=originals, other_originals=others, context_groups=groups)
