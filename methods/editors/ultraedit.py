"""UltraEdit (Gu et al. 2025; docs/lifelong_editors.md): training-free lifelong editing, one closed-form step per batch.

No v* optimisation and no covariance. For a batch ("turn") of requests, on the model as it is before the turn:

1. Feed ``prompt + target`` in micro-batches of ``ultra_micro_batch`` requests. The loss of a micro-batch is the
   mean cross-entropy over all its answer-predicting positions (last prompt token … penultimate answer token) —
   one mean over tokens, not per request. One backward pass.
2. At every one of those positions and for every edited matrix W (d_out×d_in) read the key k (W's input) and the
   gradient g = ∂L/∂(W's output). Row z = [k; g].
3. Lifelong normalisation: running mean μ and spread σ of the rows z, kept across turns, one normaliser per weight
   *shape* (all edited matrices of one shape pool their rows, as the original does; ``ultra_norm_scope: module``
   is the per-matrix variant). The whole turn's rows enter the statistics before any update is computed.
4. Pseudo-values: ẑ = (z − μ)/(σ + 1.19e-7) = [k̂; ĝ], v = −η ‖k̂‖² ĝ.
5. One ridge regression per matrix from the *raw* keys K (d_in×N) to the values V (d_out×N):
   Δ = V Kᵀ (K Kᵀ + λI)⁻¹, λ = ``ultra_ridge`` (1 in the original), and W ← W + Δ for all matrices at once.

Since ĝ has the running mean subtracted, v is not parallel to −g, and g's overall scale drops out. Only the
normalisers persist between turns (besides the weights). The statistics and solves run in float64 here (the
original uses float32; the difference is rounding).

Deviation, documented: with one row in a micro-batch the original's unbiased batch variance is NaN (and the whole
edit with it); here a one-row batch contributes no variance term.

Which matrices: by default the MLP output projections of ``layers`` (the original's Mistral setting, down_proj of
the last layers). ``ultra_targets`` names linear maps inside the MLP and their layers instead, e.g. the original's
Llama-3 setting ``{gate_proj: [11, ..., 15], up_proj: [18, ..., 24]}``: their key is the MLP's input (the post-norm
hidden state) and their gradient is taken at their own output; gate and up projections share a shape and so one
normaliser, as in the original.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.infra.arch import EditableModel
from methods.editor import BatchReport
from methods.finetune import target_nll_batch
from methods.infra.hooks import hidden_of, replace_hidden
from methods.requests import EditRequest
from methods.targets import logits_at

NORMALIZER_EPS = 1.19e-7  # float32 machine epsilon, added to σ as the original does


@dataclass(frozen=True)
class UltraEditHParams:
    ultra_lr: float = 1e-6  # η, the pseudo-value scale
    ultra_micro_batch: int = 10  # requests per forward/backward pass
    ultra_ridge: float = 1.0  # λ of (K Kᵀ + λI)
    ultra_norm_scope: str = "shape"  # "shape": one normaliser per weight shape (original); "module": per matrix
    # MLP linear map (path inside the MLP) -> its layers; None: the MLP output projection of ``layers``
    ultra_targets: dict | None = None


@dataclass(frozen=True)
class EditedMatrix:
    """One matrix UltraEdit writes: ``key`` names it in reports (the layer index for an MLP output projection, as
    every editor does; ``L<layer>.<path>`` for the MLP's other maps), ``label`` in its own metric names."""

    key: int | str
    layer: int
    name: str  # the module's path in the model, e.g. model.layers.11.mlp.gate_proj
    module: torch.nn.Module
    weight: torch.Tensor  # out×in view of the parameter
    is_mlp_out: bool

    @property
    def label(self) -> str:
        return f"L{self.key}" if self.is_mlp_out else self.key


def edited_matrices(editable: EditableModel, layers: list[int], targets: dict | None) -> list[EditedMatrix]:
    """The matrices of ``targets`` (or the MLP output projections of ``layers``), in model order. A target that is
    the MLP output projection itself (``down_proj`` on Llama) counts as one, so the trial treats it like any
    editor's (W₀, drift D, restraints)."""
    pairs = ([(layer, None) for layer in layers] if targets is None
             else sorted((layer, child) for child, child_layers in targets.items() for layer in child_layers))
    out = []
    for layer, child in pairs:
        module = editable.mlp_out(layer) if child is None else editable.mlp_child(layer, child)
        if module is editable.mlp_out(layer):
            out.append(EditedMatrix(layer, layer, editable.mlp_out_name(layer), module,
                                    editable.weight(layer), True))
        else:
            label = f"L{layer}.{child}"
            out.append(EditedMatrix(label, layer, editable.mlp_child_name(layer, child), module,
                                    editable.mlp_child_weight(layer, child), False))
    return out


def target_layers(targets: dict | None) -> list[int] | None:
    """The layers ``ultra_targets`` touches (None when unset: the method's ``layers`` apply)."""
    return None if targets is None else sorted({layer for layers in targets.values() for layer in layers})


class RunningMeanStd:
    """Running mean and spread of rows, updated a block of rows at a time (the original's ``nets.RunningMeanStd``).

    For a block X of b rows: δ = mean(X) − μ; μ += bδ/(N+b); M2 += b·var(X) + N·b·δ²/(N+b); N += b, with var the
    *unbiased* per-column variance of the block, as the original computes it (so M2 exceeds the exact sum of
    squared deviations by the blocks' variances); σ = sqrt(M2/(N−1)).
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def _follow(self, rows: torch.Tensor) -> None:
        """Keep the statistics on the rows' device (the model's: a GPU trial's rows never visit the CPU)."""
        if self.mean.device != rows.device:
            self.mean, self.m2 = self.mean.to(rows.device), self.m2.to(rows.device)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float64)
        self._follow(rows)
        b = rows.shape[0]
        if b == 0:
            return
        block_mean = rows.mean(0)
        block_var = rows.var(0, unbiased=True) if b > 1 else torch.zeros_like(block_mean)
        delta = block_mean - self.mean
        total = self.count + b
        self.mean = self.mean + delta * (b / total)
        self.m2 = self.m2 + b * block_var + delta.square() * (self.count * b / total)
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / max(self.count - 1, 1)).sqrt()

    def normalize(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(torch.float64)
        self._follow(rows)
        return (rows - self.mean) / (self.std + NORMALIZER_EPS)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean.cpu().clone(), "m2": self.m2.cpu().clone()}

    @classmethod
    def from_state(cls, state: dict) -> "RunningMeanStd":
        out = cls(state["mean"].numel())
        out.count, out.mean, out.m2 = int(state["count"]), state["mean"].clone(), state["m2"].clone()
        return out


def ultraedit_delta(keys: torch.Tensor, values: torch.Tensor, ridge: float) -> torch.Tensor:
    """Δ = V Kᵀ (K Kᵀ + λI)⁻¹ for keys [N, d_in] and values [N, d_out] given as rows; returns [d_out, d_in]."""
    k = keys.to(torch.float64)
    gram = k.t() @ k + ridge * torch.eye(k.shape[1], dtype=torch.float64, device=k.device)
    return torch.linalg.solve(gram, k.t() @ values.to(torch.float64)).t()


def pseudo_values(normalized: torch.Tensor, key_dim: int, lr: float) -> torch.Tensor:
    """v = −η ‖k̂‖² ĝ from normalised rows ẑ = [k̂; ĝ] ([N, d_in + d_out] → [N, d_out])."""
    k_hat, g_hat = normalized[:, :key_dim], normalized[:, key_dim:]
    return -lr * k_hat.square().sum(dim=1, keepdim=True) * g_hat


class UltraEditEditor:
    writes_weights = True

    def remove(self) -> None:  # nothing wraps the model
        pass

    def __init__(self, editable: EditableModel, tokenizer, layers: list[int], hparams: UltraEditHParams,
                 seed: int = 0):  # seed: every editor kind takes one; UltraEdit draws nothing at random
        self.editable = editable
        self.tokenizer = tokenizer
        self.hparams = hparams
        self.matrices = edited_matrices(editable, sorted(layers), hparams.ultra_targets)
        self.layers = sorted({m.layer for m in self.matrices})
        self.normalizers: dict[str, RunningMeanStd] = {}
        self.turns = 0
        self._last: dict[str, float] = {}

    # -- what the trial checkpoints and diagnoses (methods/editor.py) ---------------------------------------------
    @property
    def written_layers(self) -> list[int]:
        """The layers whose MLP output projection this editor writes."""
        return [m.key for m in self.matrices if m.is_mlp_out]

    def other_written_matrices(self) -> dict[str, torch.Tensor]:
        """The other matrices it writes, by label (e.g. ``L11.gate_proj``): live views of the parameters."""
        return {m.key: m.weight for m in self.matrices if not m.is_mlp_out}

    def _normalizer_key(self, matrix: EditedMatrix) -> str:
        if self.hparams.ultra_norm_scope == "module":
            return matrix.name
        return "x".join(str(n) for n in matrix.weight.shape)  # d_out x d_in

    def _normalizer(self, matrix: EditedMatrix) -> RunningMeanStd:
        key = self._normalizer_key(matrix)
        if key not in self.normalizers:
            self.normalizers[key] = RunningMeanStd(sum(matrix.weight.shape))
        return self.normalizers[key]

    def keys_and_gradients(self, requests: list[EditRequest]) -> tuple[dict[int | str, torch.Tensor],
                                                                         dict[int | str, torch.Tensor]]:
        """Per edited matrix: keys [N, d_in] and output gradients [N, d_out] at every answer-predicting position
        of the turn (N = answer tokens), micro-batch by micro-batch on the unchanged model; each micro-batch's rows
        enter the normalisers as they are read (matrices in model order, as the original's module loop)."""
        device = self.editable.parameter_device()
        keys: dict[int | str, list[torch.Tensor]] = {m.key: [] for m in self.matrices}
        grads: dict[int | str, list[torch.Tensor]] = {m.key: [] for m in self.matrices}
        step = self.hparams.ultra_micro_batch
        for first in range(0, len(requests), step):
            batch, rows, cols, tokens = target_nll_batch(self.tokenizer, requests[first:first + step])
            batch, rows, cols, tokens = batch.to(device), rows.to(device), cols.to(device), tokens.to(device)
            inputs: dict[int | str, torch.Tensor] = {}
            probes: dict[int | str, torch.Tensor] = {}

            def hook_for(key: int | str):
                def hook(module, args, output):
                    inputs[key] = args[0][rows, cols].detach()
                    hidden = hidden_of(output)
                    # A zero added to the output: its gradient is ∂L/∂output, and gradients still flow through
                    # the output to the layers below (no weight gradient is needed or computed).
                    probes[key] = torch.zeros_like(hidden, requires_grad=True)
                    return replace_hidden(output, hidden + probes[key])
                return hook

            handles = [m.module.register_forward_hook(hook_for(m.key)) for m in self.matrices]
            try:
                with torch.enable_grad():
                    logits = logits_at(self.editable.model, batch.model_inputs(), rows, cols)
                    loss = F.cross_entropy(logits.float(), tokens)  # one mean over all answer tokens
                    gradients = torch.autograd.grad(loss, [probes[m.key] for m in self.matrices])
            finally:
                for handle in handles:
                    handle.remove()
            for matrix, gradient in zip(self.matrices, gradients):
                k, g = inputs[matrix.key].to(torch.float64), gradient[rows, cols].to(torch.float64)
                self._normalizer(matrix).update(torch.cat([k, g], dim=1))
                keys[matrix.key].append(k)
                grads[matrix.key].append(g)
        return ({key: torch.cat(rows_) for key, rows_ in keys.items()},
                {key: torch.cat(rows_) for key, rows_ in grads.items()})

    def apply(self, requests: list[EditRequest]) -> BatchReport:
        start = time.perf_counter()
        keys, grads = self.keys_and_gradients(requests)
        pass_seconds = time.perf_counter() - start
        solve_start = time.perf_counter()
        hp = self.hparams
        deltas, stats = {}, {}
        for matrix in self.matrices:  # every Δ from the same pass, then all written together
            k = keys[matrix.key]
            normalized = self._normalizer(matrix).normalize(torch.cat([k, grads[matrix.key]], dim=1))
            values = pseudo_values(normalized, k.shape[1], hp.ultra_lr)
            deltas[matrix.key] = ultraedit_delta(k, values, hp.ultra_ridge)
            # How the ridge term compares with the keys: eigenvalues of KᵀK (N×N, the non-zero ones of K Kᵀ).
            eig = torch.linalg.eigvalsh(k @ k.t())
            stats[matrix.label] = (float(values.abs().mean()), float(eig.max()), float((eig > hp.ultra_ridge).sum()))
        update_norm = {}
        with torch.no_grad():
            for matrix in self.matrices:
                delta = deltas[matrix.key]
                matrix.weight.add_(delta.to(device=matrix.weight.device, dtype=matrix.weight.dtype))
                update_norm[matrix.key] = float(delta.norm())
        self.turns += 1
        self._last = {"ultraedit/answer_tokens": float(next(iter(keys.values())).shape[0]),
                      "ultraedit/turns": float(self.turns)}
        for label, (mean_abs_value, gram_max, above_ridge) in stats.items():
            self._last[f"ultraedit/{label}/mean_abs_value"] = mean_abs_value
            self._last[f"ultraedit/{label}/key_gram_max_eig"] = gram_max
            self._last[f"ultraedit/{label}/key_gram_eigs_above_ridge"] = above_ridge
        return BatchReport(num_requests=len(requests), seconds=time.perf_counter() - start,
                           target_seconds=pass_seconds, solve_seconds=time.perf_counter() - solve_start,
                           target_prob=[], target_steps=1, update_norm=update_norm)

    def metrics(self) -> dict[str, float]:
        out = dict(self._last)
        out.update({f"ultraedit/normalizer/{key}/rows": float(n.count) for key, n in self.normalizers.items()})
        return out

    def state_dict(self) -> dict:
        return {"turns": self.turns, "normalizers": {k: n.state_dict() for k, n in self.normalizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.turns = int(state["turns"])
        self.normalizers = {k: RunningMeanStd.from_state(v) for k, v in state["normalizers"].items()}
