"""Sparsifying baselines of AdaEdit §3.3 (docs/methods.md, "AdaEdit") and the helpers every Δ transform shares.

Both baselines "set the other parameters as zero" and do not rescale what is kept:

    Δ'_ij = Δ_ij · M_ij,   M ∈ {0,1}^{d×m},   Σ_ij M_ij = n_keep = max(1, round(keep · d·m))

* random drop (DR): M is a uniformly random subset of n_keep entries (own seeded generator);
* magnitude top-k: M marks the n_keep entries of largest |Δ_ij|.

Every transform reports ``{name}/L{layer}/energy_kept`` = ‖Δ'‖_F² / ‖Δ‖_F² (1 when Δ = 0) of its latest call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def n_keep(n: int, keep: float) -> int:
    """How many of ``n`` entries a ``keep`` fraction keeps: max(1, round(keep·n)), never more than n."""
    return min(n, max(1, round(keep * n)))


def check_keep(keep: float) -> None:
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")


def keep_top(delta: torch.Tensor, scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Δ with all but the n_keep entries of highest ``scores`` zeroed (indices, not a threshold: exact count)."""
    idx = torch.topk(scores.reshape(-1), n_keep(delta.numel(), keep), sorted=False).indices
    return keep_indices(delta, idx)


def keep_indices(delta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Δ with only the flat positions ``idx`` left."""
    out = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    flat = delta.reshape(-1)
    out[idx] = flat[idx]
    return out.reshape(delta.shape)


def energy_kept(delta: torch.Tensor, kept: torch.Tensor) -> float:
    """‖Δ'‖_F² / ‖Δ‖_F², 1 for Δ = 0 (nothing was lost)."""
    total = float(delta.double().pow(2).sum())
    return 1.0 if total == 0.0 else float(kept.double().pow(2).sum()) / total


def layer_metrics(name: str, layer: int, delta: torch.Tensor, kept: torch.Tensor) -> dict[str, float]:
    """The metrics every transform logs per layer: energy kept and the fraction of Δ' entries left nonzero."""
    return {
        f"{name}/L{layer}/energy_kept": energy_kept(delta, kept),
        f"{name}/L{layer}/nonzero_frac": float((kept != 0).sum()) / max(1, kept.numel()),
    }


class TransformBase:
    """Bookkeeping shared by every Δ transform: ``__call__`` runs ``_transform`` and keeps the latest call's
    per-layer metrics (energy kept, nonzero fraction, plus whatever the transform adds)."""

    name: str

    def _transform(self, delta: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def __call__(self, layer: int, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        kept, extra = self._transform(delta, weight)
        latest = self.__dict__.setdefault("_latest_metrics", {})
        latest.update(layer_metrics(self.name, layer, delta, kept))
        latest.update({f"{self.name}/L{layer}/{key}": value for key, value in extra.items()})
        return kept

    def metrics(self) -> dict[str, float]:
        return dict(self.__dict__.get("_latest_metrics", {}))

    # Most transforms are pure functions of (Δ, W); ones with a state across batches (RandomDrop's RNG) override.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def random_drop(delta: torch.Tensor, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep a uniformly random subset of exactly n_keep entries of Δ (float64), zero the rest, no rescaling."""
    check_keep(keep)
    delta = delta.double()
    # randperm on the generator's device (CPU) so a CPU generator also serves a GPU Δ.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(delta.numel(), generator=generator, device=gen_device)
    idx = perm[: n_keep(delta.numel(), keep)].to(delta.device)
    return keep_indices(delta, idx)


def magnitude_topk(delta: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep the n_keep entries of Δ (float64) of largest |Δ_ij|, zero the rest, no rescaling."""
    check_keep(keep)
    delta = delta.double()
    return keep_top(delta, delta.abs(), keep)


@dataclass
class RandomDrop(TransformBase):
    keep: float = 0.2
    seed: int = 0
    name: str = "random_drop"
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_keep(self.keep)
        # Own generator: the draw depends only on the seed and the call order, never on global RNG use elsewhere.
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)

    def _transform(self, delta, weight):
        return random_drop(delta, self.keep, self._generator), {}

    # The generator advances with every call, so a resumed sequential run needs its state back.
    def state_dict(self) -> dict:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._generator.set_state(state["generator"])


@dataclass
class MagnitudeTopK(TransformBase):
    keep: float = 0.2
    name: str = "magnitude_topk"

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def _transform(self, delta, weight):
        return magnitude_topk(delta, self.keep), {}
