"""The solver stage: given keys K [m×n] and residuals R [d×n] of a batch at one layer, return Δ [d×m].

The editor calls, per batch and per layer (ascending): ``solve`` → the update transforms → W += Δ' →
``after_update`` (so solvers with a memory, like LyapLock, see the weight that was actually written); and once per
batch ``after_batch`` with the keys re-read on the edited model (AlphaEdit's K_p K_pᵀ).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Solver(Protocol):
    name: str
    # True when the solver wants the batch's keys re-read with the edited model after all layers were updated.
    wants_keys_after_batch: bool
    # True when the residual is R = V* − W K at the solver's own keys (ROME) instead of V* − h_L(current model).
    residuals_from_keys: bool
    # The most layers the solver can edit (ROME edits one); None for any number.
    max_layers: int | None

    def prepare(self, layers: list[int], second_moments: dict[int, torch.Tensor],
                weights: dict[int, torch.Tensor]) -> None:
        """One-time setup per trial from the unedited model's C and weights W₀ per layer."""

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Δ (float64, d×m) to add to the current weight W (d×m) of ``layer``."""

    def after_update(self, layer: int, keys: torch.Tensor, weight: torch.Tensor) -> None:
        """Called with the batch's keys and the layer's weight right after the (transformed) Δ was added."""

    def after_batch(self, keys_after: dict[int, torch.Tensor]) -> None:
        """Called once per batch with the keys recomputed on the edited model (if ``wants_keys_after_batch``)."""

    def metrics(self) -> dict[str, float]:
        """Solver diagnostics for MLflow (names prefixed by the solver's name)."""

    def state_dict(self) -> dict:
        """What must be checkpointed to resume a sequential run."""

    def load_state_dict(self, state: dict) -> None: ...


def resolve_lambda(absolute: float | None, per_key_dim: float, key_dim: int) -> float:
    """λ of the C-penalty: the absolute value when given, else ``per_key_dim`` · m (scale-aware; see memit.py)."""
    return float(absolute) if absolute is not None else float(per_key_dim) * key_dim


class SolverDefaults:
    """No-op defaults for the optional parts of the protocol; solvers override what they use."""

    wants_keys_after_batch = False
    residuals_from_keys = False
    max_layers: int | None = None

    def after_update(self, layer, keys, weight):
        pass

    def after_batch(self, keys_after):
        pass

    def metrics(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
