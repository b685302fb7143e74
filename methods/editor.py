"""The editor interface every method implements, and the locate-then-edit editor built from stages.

An **editor** (the ``Editor`` protocol below) is what a trial drives: ``apply`` one batch of requests and get a
``BatchReport``; ``metrics`` after each batch; ``state_dict``/``load_state_dict`` for trial checkpoints; and it
declares how it changes inference — ``writes_weights`` True: the MLP output matrices of ``layers`` are edited in
place (the trial then checkpoints them and reports the weight diagnostics σ_max, cond, drift D); False: the weights
are untouched and the editor wraps a module with its own memory (GRACE's codebook, methods/editors/grace.py), which
lives in its state. The kinds are registered in methods/stages.py (``EDITOR_KINDS``).

Sequential locate-then-edit: one batch of requests → v* at the last edited layer → spread over the layers.

The stages are pluggable (DEVELOPERS.md "a method is a composition of small stages"):
  target site   where v* lives: "block" (MEMIT/AlphaEdit: block output) or "mlp" (AdaEdit's FFN-only target)
  solver        how Δ is solved from keys and residuals (methods/solvers)
  target scaling  what is done to v* before the solve (NAS's norm anchor, methods/target_scaling) — optional
  transforms    what is done to Δ before it is added (e.g. RECT, SRFusion) — callables Δ, W → Δ'
  (restraints such as PRUNE act on the cumulative W − W₀ and are applied by the trial runner, grid/trial.py)

Spreading (MEMIT; docs/methods.md): for the i-th of L edited layers (ascending),
``R = (V* − h_L(current model)) / (L − i)``, with h_L re-read after the earlier layers were updated, and W_ℓ is
updated immediately so the next layer's keys see it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from methods.infra.arch import EditableModel
from methods.keys import compute_keys, compute_keys_and_site_outputs, compute_site_outputs
from methods.requests import EditRequest
from methods.residual_space import norm_gain, residuals_before_post_norm
from methods.solvers.base import Solver
from methods.targets import TargetHParams, compute_target_values



class TargetScaling(Protocol):
    """Rescaling of a batch's v* before the solve (methods/target_scaling): (h, v*, the MLP's output v₀) → v*'."""

    name: str

    def __call__(self, initial: torch.Tensor, values: torch.Tensor, mlp_outputs: torch.Tensor) -> torch.Tensor: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class UpdateTransform(Protocol):
    """Post-processing of one layer's Δ before it is added (methods/transforms): (layer, Δ, current W) → Δ'."""

    name: str

    def __call__(self, layer: int, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def transform_states(transforms: list[UpdateTransform]) -> list[dict]:
    return [transform.state_dict() for transform in transforms]


def load_transform_states(transforms: list[UpdateTransform], states: list[dict]) -> None:
    names = [t.name for t in transforms]
    if len(states) != len(transforms):
        raise ValueError(f"saved state has {len(states)} transform(s), the editor has {names}")
    for transform, state in zip(transforms, states):
        transform.load_state_dict(state)


@dataclass
class BatchReport:
    num_requests: int
    seconds: float
    target_seconds: float
    solve_seconds: float
    target_prob: list[float]
    target_steps: int  # optimisation passes of the slowest request
    target_request_steps: list[int] = field(default_factory=list)  # passes each request took (early stop)
    target_chunks: int = 1  # forward/backward groups v* split the batch's rows into
    target_fed_tokens: int = 0  # token slots v* ran through the blocks above the site (the work it did)
    residual_norm: dict[int, float] = field(default_factory=dict)  # ‖R‖ per layer, mean over requests
    update_norm: dict[int, float] = field(default_factory=dict)  # ‖Δ‖_F per layer


class Editor(Protocol):
    """What a trial needs from a method (methods/stages.py builds one per trial)."""

    layers: list[int]  # the layers whose MLP output projection the editor edits (writes, or wraps)
    writes_weights: bool  # True: W of ``layers`` edited in place; False: the weights never change

    def apply(self, requests: list[EditRequest]) -> BatchReport: ...

    def metrics(self) -> dict[str, float]:
        """The editor's own diagnostics after a batch, names prefixed by the method part they describe."""

    def state_dict(self) -> dict:
        """Everything besides the edited weights that a sequential run needs to continue (trial checkpoints)."""

    def load_state_dict(self, state: dict) -> None: ...

    def remove(self) -> None:
        """Undo how the editor wraps the model (a memory editor's hook); editors that write weights have nothing to
        undo (restoring weights is the caller's business)."""

    # Optional, for editors that write matrices other than the MLP output projections of ``layers`` (UltraEdit's
    # ``ultra_targets``): ``written_layers`` (list[int]) the layers whose MLP output they do write, and
    # ``other_written_matrices()`` → {label: live out×in view} the rest. See ``written_layers``/``other_matrices``.


def written_layers(editor, layers: list[int]) -> list[int]:
    """The layers whose MLP output projection ``editor`` (built on ``layers``) writes in place: all of ``layers``
    unless it says otherwise; none for memory editors."""
    if editor is None or not editor.writes_weights:
        return []
    return list(getattr(editor, "written_layers", layers))


def other_matrices(editor) -> dict[str, torch.Tensor]:
    """The other matrices ``editor`` writes in place, by label (``L<layer>.<path>``), as live views."""
    method = getattr(editor, "other_written_matrices", None)
    return dict(method()) if method is not None else {}


class MemoryEditor(Editor, Protocol):
    """An editor that serves some inputs from its own memory instead of the layer's weights (GRACE, WISE). The
    trial measures which prompts it serves (grid/evaluators.py ``MemoryLookups``)."""

    def served_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One forward of the model on a left-padded batch: a bool per row, True where the memory served it."""


class LocateThenEditEditor:
    writes_weights = True

    def remove(self) -> None:
        pass

    def __init__(self, editable: EditableModel, tokenizer, layers: list[int], solver: Solver,
                 second_moments: dict[int, torch.Tensor], context_groups: list[list[str]],
                 target_hparams: TargetHParams, target_site: Literal["block", "mlp"] = "block",
                 transforms: list[UpdateTransform] | None = None, target_scaling: TargetScaling | None = None):
        self.editable = editable
        self.tokenizer = tokenizer
        self.layers = sorted(layers)
        self.solver = solver
        self.context_groups = context_groups
        self.target_hparams = target_hparams
        self.target_site = target_site
        self.transforms = transforms or []
        self.target_scaling = target_scaling
        if solver.max_layers is not None and len(self.layers) > solver.max_layers:
            raise ValueError(f"solver {solver.name!r} edits at most {solver.max_layers} layer(s), got {self.layers}")
        solver.prepare(self.layers, second_moments, {layer: editable.weight(layer) for layer in self.layers})

    def metrics(self) -> dict[str, float]:
        out = dict(self.solver.metrics())
        for transform in self.transforms:
            out.update(transform.metrics())
        if self.target_scaling is not None:
            out.update(self.target_scaling.metrics())
        return out

    def state_dict(self) -> dict:
        """What a sequential run needs besides the weights to continue after this batch (trial checkpoints)."""
        state = {"solver": self.solver.state_dict(), "transforms": transform_states(self.transforms)}
        if self.target_scaling is not None:
            state["target_scaling"] = self.target_scaling.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.solver.load_state_dict(state["solver"])
        load_transform_states(self.transforms, state["transforms"])
        if self.target_scaling is not None:
            self.target_scaling.load_state_dict(state["target_scaling"])

    def _site(self) -> torch.nn.Module:
        last = self.layers[-1]
        return self.editable.block(last) if self.target_site == "block" else self.editable.mlp(last)

    def _mlp_outputs(self, requests: list[EditRequest], target) -> torch.Tensor:
        """v₀ [n, d]: what the site layer's MLP adds to the residual stream at the subject's last token of each plain
        prompt — h itself when the MLP output is the site; else read at the post-MLP norm where the architecture
        has one (Gemma), or at the MLP."""
        if self.target_site == "mlp":
            return target.initial
        last = self.layers[-1]
        post_norm = self.editable.mlp_post_norm(last)
        module = post_norm if post_norm is not None else self.editable.mlp(last)
        return compute_site_outputs(self.editable, self.tokenizer, requests, module).t().to(target.values.device)

    def _targets(self, requests: list[EditRequest], context_groups: list[list[str]]):
        return compute_target_values(self.editable.model, self.tokenizer, self._site(), requests, context_groups,
                                     self.target_hparams, blocks=self.editable.blocks, site_layer=self.layers[-1])

    def value_norms(self, requests: list[EditRequest], context_groups: list[list[str]]) -> list[float]:
        """‖v₀ + δ‖ per request: the norm of the MLP output each edit asks for at the site, with v* solved on the
        model as it is now (NAS's reference statistic, methods/target_scaling/nas.py)."""
        target = self._targets(requests, context_groups)
        v0 = self._mlp_outputs(requests, target)
        return [float(x) for x in (v0 + target.values - target.initial).norm(dim=1)]

    def _post_norm(self, layer: int):
        """The post-MLP norm to rescale block-space residuals through (only where v* aims at the block output)."""
        return self.editable.mlp_post_norm(layer) if self.target_site == "block" else None

    def apply(self, requests: list[EditRequest]) -> BatchReport:
        start = time.perf_counter()
        site = self._site()
        target = self._targets(requests, self.context_groups)
        values = target.values
        if self.target_scaling is not None:
            values = self.target_scaling(target.initial, values, self._mlp_outputs(requests, target))
        target_seconds = time.perf_counter() - start
        solve_start = time.perf_counter()
        values = values.t().double()  # [d, n]
        residual_norm, update_norm = {}, {}
        for i, layer in enumerate(self.layers):
            # Keys of this layer and h_L, both read with the earlier layers of this batch already updated.
            keys, site_outputs = compute_keys_and_site_outputs(
                self.editable, self.tokenizer, requests, [layer], self.context_groups,
                None if self.solver.residuals_from_keys else site)
            keys = keys[layer]
            weight = self.editable.weight(layer)
            if self.solver.residuals_from_keys:  # ROME: R = V* − W K at the averaged keys
                current = weight.detach().double() @ keys.double().to(weight.device)
            else:
                current = site_outputs.double()
            residuals = (values.to(current.device) - current) / (len(self.layers) - i)
            post_norm = None if self.solver.residuals_from_keys else self._post_norm(layer)
            if post_norm is not None:  # the block-space residual, as the MLP output must move before the norm
                residuals = residuals_before_post_norm(residuals, weight, keys,
                                                       norm_gain(post_norm, weight.shape[0], weight.device))
            delta = self.solver.solve(layer, keys, residuals, weight)
            for transform in self.transforms:
                delta = transform(layer, delta, weight)
            with torch.no_grad():
                weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
            self.solver.after_update(layer, keys, weight)
            residual_norm[layer] = float(residuals.norm(dim=0).mean())
            update_norm[layer] = float(delta.norm())
        if self.solver.wants_keys_after_batch:
            self.solver.after_batch(compute_keys(self.editable, self.tokenizer, requests, self.layers,
                                                 self.context_groups))
        solve_seconds = time.perf_counter() - solve_start
        return BatchReport(num_requests=len(requests), seconds=time.perf_counter() - start,
                           target_seconds=target_seconds, solve_seconds=solve_seconds,
                           target_prob=[float(p) for p in target.target_prob], target_steps=target.steps,
                           target_request_steps=[int(k) for k in target.request_steps], target_chunks=target.chunks,
                           target_fed_tokens=target.fed_tokens,
                           residual_norm=residual_norm, update_norm=update_norm)
