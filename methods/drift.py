"""Preservation drift of an edited matrix (LyapLock §3.1; docs/methods.md): D(W) = tr((W − W₀) C (W − W₀)ᵀ).

With C = E[k kᵀ] over general text, D(W) = E‖(W − W₀) k‖²: the mean squared change of the layer's outputs on text
the edit should leave alone. LyapLock's queue is driven by it; the trial logs it for every method so solvers can
be compared on the same footing. Computed in float64 in this drift form (not as a difference of two large traces).
"""

from __future__ import annotations

import torch


def preservation_drift(weight: torch.Tensor, original: torch.Tensor, second_moment: torch.Tensor) -> float:
    """D(W) for one layer: ``weight`` and ``original`` are d×m, ``second_moment`` is C (m×m)."""
    c = second_moment.double()
    delta = weight.detach().double().to(c.device) - original.detach().double().to(c.device)
    return float(((delta @ c) * delta).sum())
