"""Residuals for blocks whose MLP output is normalised before it joins the residual stream (Gemma 2/3's
``post_feedforward_layernorm``; docs/methods.md, "Post-MLP normalisation").

MEMIT-style solvers aim at the block output h: the residual R = (v* − h)/(layers left) is what the layer's MLP must
add to the residual stream. In Llama-like blocks the MLP output x = W·k is added as is, so the MLP must change x by
R. With a post-norm, the stream receives y = g ⊙ x / rms(x) (g the norm's gain), whose scale does not follow x's: in
Gemma-3-270M rms(x) ≈ 0.1–0.4 while rms(y) ≈ 4–54 at layers 1–5, so asking x itself to move by R (sized for the
stream) would be an update hundreds of times too large. The x whose normalised output is y + R is, up to scale
(RMS normalisation forgets it),

    x' = rms(x) · (y + R) / g,     so     x' − x = rms(x) · R / g      (as y / g = x / rms(x)),

exact in R's component along the normalised sphere; the radial part of R is what no x can give (the next layers'
residuals are measured again after this one's update, so they take up what is left). Coordinates where the gain is
~0 cannot be moved and get no residual.

The move is then made orthogonal to x. Its component along x only rescales x, which the norm divides out: it
changes nothing the model says, but it is not free. The solver writes it into W, along the direction that the
keys share, so the next batch's rms(x) is larger, its moves are larger, and the scale compounds. On Gemma-3-270M
(MEMIT and AlphaEdit, batches of 10) the update of layer 4 grew about sixfold per batch, to σ_max ≈ 10⁸ after 100
edits. To first order the normalised output moves by the same amount without that component:
dy = (g / rms(x)) ⊙ (dx − x̂ (x̂ · dx)).
"""

from __future__ import annotations

import torch
from torch import nn


def norm_gain(norm: nn.Module, width: int, device, dtype=torch.float64) -> torch.Tensor:
    """g of a normalisation module y = g ⊙ x / rms(x), read from its output on the all-ones vector (rms 1),
    whatever the module's parameterisation (Gemma stores g − 1)."""
    param = next(norm.parameters(), None)
    ones = torch.ones(1, width, device=device, dtype=param.dtype if param is not None else torch.float32)
    with torch.no_grad():
        return norm(ones)[0].to(dtype)


def residuals_before_post_norm(residuals: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor,
                               gain: torch.Tensor, min_gain: float = 1e-3) -> torch.Tensor:
    """Block-space residuals R [d, n] as MLP-output residuals rms(W k_j) · R_j / g, less their component along
    W k_j (see the module docstring).

    ``weight`` is W [d, m], ``keys`` K [m, n] (each request's key, the MLP output being x_j = W k_j)."""
    x = (weight.detach().double() @ keys.double().to(weight.device)).to(residuals.device)  # [d, n]
    scale = x.pow(2).mean(dim=0).sqrt()  # rms(x_j) per request
    gain = gain.double().to(residuals.device)
    movable = gain.abs() > min_gain * gain.abs().mean()
    inverse = torch.where(movable, 1.0 / torch.where(movable, gain, torch.ones_like(gain)), torch.zeros_like(gain))
    moves = residuals.double() * inverse[:, None] * scale[None, :]
    # Orthogonal to x within the movable coordinates (the others stay 0): no rescaling of x.
    x_movable = x * movable[:, None]
    squared = x_movable.pow(2).sum(dim=0)
    along = torch.where(squared > 0, (moves * x_movable).sum(dim=0) / squared.clamp_min(1e-300),
                        torch.zeros_like(squared))
    return moves - x_movable * along[None, :]
