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
residuals are measured again after this one's update, so they take up what is left).

Two things keep the move within the range where this first-order picture holds, since the solver writes it into W
and the next batch starts from there:

* **Small gains are damped.** Coordinate i moves by rms(x) · R_i · g_i / (g_i² + μ), μ = (GAIN_DAMPING · mean |g|)²:
  the least-squares move of x for R with a penalty on the move's size, ≈ rms(x) · R_i / g_i wherever the gain is
  not small, and 0 where it is 0. Undamped, a coordinate with a tiny gain takes a huge move for a small effect on y;
  the move enlarges rms(x), which shrinks every other coordinate of y, which the next batch's residuals ask back.
  Layer 4 of Gemma-3-270M has 18 of 640 gains below 1 % of the mean, and its update grew 3–10× per batch of 10
  edits, to σ_max 3 × 10⁶ (AlphaEdit) and 10⁸ (MEMIT) after 100; damped, it stays flat (docs/methods.md).
* **No component along x.** A move along x only rescales x, which the norm divides out: it changes nothing the
  model says, but enlarges rms(x) for the next batch. To first order y moves the same without it:
  dy = (g / rms(x)) ⊙ (dx − x̂ (x̂ · dx)).
"""

from __future__ import annotations

import torch
from torch import nn

GAIN_DAMPING = 0.1  # μ = (GAIN_DAMPING · mean |g|)²: a gain of a tenth of the mean moves half as far as undamped


def norm_gain(norm: nn.Module, width: int, device, dtype=torch.float64) -> torch.Tensor:
    """g of a normalisation module y = g ⊙ x / rms(x), read from its output on the all-ones vector (rms 1),
    whatever the module's parameterisation (Gemma stores g − 1)."""
    param = next(norm.parameters(), None)
    ones = torch.ones(1, width, device=device, dtype=param.dtype if param is not None else torch.float32)
    with torch.no_grad():
        return norm(ones)[0].to(dtype)


def residuals_before_post_norm(residuals: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor,
                               gain: torch.Tensor, damping: float = GAIN_DAMPING) -> torch.Tensor:
    """Block-space residuals R [d, n] as MLP-output moves rms(W k_j) · R_j ⊙ g / (g² + μ), less their component
    along W k_j (see the module docstring).

    ``weight`` is W [d, m], ``keys`` K [m, n] (each request's key, the MLP output being x_j = W k_j)."""
    x = (weight.detach().double() @ keys.double().to(weight.device)).to(residuals.device)  # [d, n]
    scale = x.pow(2).mean(dim=0).sqrt()  # rms(x_j) per request
    gain = gain.double().to(residuals.device)
    mu = (damping * gain.abs().mean()) ** 2
    moves = residuals.double() * (gain / (gain.pow(2) + mu))[:, None] * scale[None, :]
    squared = x.pow(2).sum(dim=0)
    along = torch.where(squared > 0, (moves * x).sum(dim=0) / squared.clamp_min(1e-300), torch.zeros_like(squared))
    return moves - x * along[None, :]
