"""The solver stage: given keys K [m×n] and residuals R [d×n] of a batch at one layer, return Δ [d×m]."""

from __future__ import annotations

from typing import Protocol

import torch


class Solver(Protocol):
    name: str
    # True when the solver wants the batch's keys re-read with the edited model after all layers were updated.
    wants_keys_after_batch: bool

    def prepare(self, layers: list[int], second_moments: dict[int, torch.Tensor]) -> None:
        """One-time setup per trial (projectors, scaled covariances) from the unedited model's C per layer."""

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Δ (float64, d×m) to add to the current weight W (d×m) of ``layer``."""

    def after_batch(self, keys_after: dict[int, torch.Tensor]) -> None:
        """Called once per batch with the keys recomputed on the edited model (if ``wants_keys_after_batch``)."""

    def metrics(self) -> dict[str, float]:
        """Solver diagnostics for MLflow (names prefixed by the solver's name)."""

    def state_dict(self) -> dict:
        """What must be checkpointed to resume a sequential run."""

    def load_state_dict(self, state: dict) -> None: ...
