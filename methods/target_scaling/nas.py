"""NAS, norm-anchor scaling (SasyaTitech/NAS, "Norm Anchors Make Model Edits Last"; ALGORITHMS.md §14;
docs/methods.md "NAS"): every edit's value vector is rescaled to one norm measured on the unedited model before the
solve, so that thousands of sequential edits do not keep writing ever larger vectors into the same matrices.

v* (methods/targets.py) is the site output h plus the optimised δ. NAS reads the part of it the MLP writes:

    v₀ = the MLP's contribution to the residual stream at the site layer, at the subject's last token of the plain
         prompt (what the block adds; after the post-MLP norm where the architecture has one)
    u  = v₀ + δ                                          the MLP output the edit asks for
    r  = upper-trimmed mean of ‖u‖ over reference requests solved on the unedited model (the largest
         ``trim`` share dropped), computed once per model, site and v* hyper-parameters, and cached
    u' = u · r / ‖u‖        if ‖u‖ ≤ skip_factor · r
    u' = v₀                 otherwise: the edit is skipped (its target is the current output)
    v*' = (h − v₀) + u' = h + (u' − v₀)

and the solver writes v*' instead of v*. The reference requests use the plain prompt only (no context templates),
as the reference code does; δ is optimised with the method's own v* hyper-parameters. With the MLP output as the
site (``target_site: mlp``) h is v₀ itself.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from methods.infra.cache import cached_path, content_key
from methods.requests import EditRequest

logger = logging.getLogger(__name__)

PLAIN_ONLY = [["{}"]]  # the reference requests' only context template: the plain prompt


def upper_trimmed_mean(norms: list[float], trim: float) -> tuple[float, int]:
    """Mean of ``norms`` without its ⌊trim·n⌋ largest values (the reference code's rule), and how many were
    dropped. Fails on an empty list or on non-finite norms (a v* that diverged must not set the anchor)."""
    values = sorted(float(x) for x in norms)
    if not values:
        raise ValueError("NAS: no reference norms to average")
    if not all(math.isfinite(x) for x in values):
        raise ValueError("NAS: non-finite v* norm among the reference requests")
    dropped = int(math.floor(trim * len(values)))
    kept = values[:len(values) - dropped] if dropped else values
    return sum(kept) / len(kept), dropped


def anchor_values(initial: torch.Tensor, values: torch.Tensor, mlp_outputs: torch.Tensor, reference_norm: float,
                  skip_factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v*' for each row (see the module docstring), the bool mask of skipped rows, and ‖u‖ before scaling.

    initial h, values v* and mlp_outputs v₀ are [n, d] (same device)."""
    v0 = mlp_outputs.to(values.dtype)
    wanted = v0 + (values - initial)  # u = v₀ + δ
    norms = wanted.norm(dim=1)
    skipped = norms > skip_factor * reference_norm
    scale = reference_norm / norms.clamp_min(torch.finfo(norms.dtype).tiny)
    anchored = torch.where(skipped[:, None], v0, wanted * scale[:, None])
    return initial + (anchored - v0), skipped, norms


@dataclass
class NormAnchor:
    """The NAS target-scaling stage. ``prepare(r)`` sets the anchor norm before the first batch (grid/assembly.py
    computes it with ``reference_norm``); ``__call__`` rescales a batch's targets.

    Metrics after every batch: ``nas/reference_norm`` r; ``nas/norm_ratio_mean`` and ``nas/norm_ratio_max`` ‖u‖/r
    of the batch's edits before scaling (above 1: the edit asked for a larger MLP output than the anchor);
    ``nas/batch_skipped`` the batch's skipped edits; ``nas/anchored_edits`` and ``nas/skipped_edits`` the trial's
    rescaled and skipped edits so far."""

    samples: int = 1000  # reference requests for r (the whole pool when it is smaller)
    trim: float = 0.05  # share of the largest reference norms dropped from r's mean
    skip_factor: float = 2.0  # an edit whose ‖u‖ exceeds skip_factor · r is skipped
    name: str = field(default="nas", init=False)
    reference_norm: float | None = field(default=None, init=False)
    skipped_edits: int = field(default=0, init=False)  # over the trial so far
    anchored_edits: int = field(default=0, init=False)
    _latest: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"NAS: samples must be >= 1, got {self.samples!r}")
        if not 0 <= self.trim < 1:
            raise ValueError(f"NAS: trim must be in [0, 1), got {self.trim!r}")
        if self.skip_factor <= 0:
            raise ValueError(f"NAS: skip_factor must be > 0, got {self.skip_factor!r}")

    def prepare(self, reference_norm: float) -> None:
        if not (math.isfinite(reference_norm) and reference_norm > 0):
            raise ValueError(f"NAS: the reference norm must be finite and > 0, got {reference_norm!r}")
        self.reference_norm = float(reference_norm)

    def __call__(self, initial: torch.Tensor, values: torch.Tensor, mlp_outputs: torch.Tensor) -> torch.Tensor:
        if self.reference_norm is None:
            raise RuntimeError("NAS: the reference norm r was never set (NormAnchor.prepare)")
        anchored, skipped, norms = anchor_values(initial, values, mlp_outputs, self.reference_norm,
                                                 self.skip_factor)
        n_skipped = int(skipped.sum())
        self.skipped_edits += n_skipped
        self.anchored_edits += len(skipped) - n_skipped
        ratio = norms / self.reference_norm
        self._latest = {"nas/norm_ratio_mean": float(ratio.mean()), "nas/norm_ratio_max": float(ratio.max()),
                        "nas/batch_skipped": float(n_skipped)}
        return anchored

    def metrics(self) -> dict[str, float]:
        out = dict(self._latest)
        if self.reference_norm is not None:
            out["nas/reference_norm"] = self.reference_norm
        out["nas/skipped_edits"] = float(self.skipped_edits)
        out["nas/anchored_edits"] = float(self.anchored_edits)
        return out

    def state_dict(self) -> dict:
        # r travels with the checkpoint: a resumed trial keeps the anchor it started with
        return {"reference_norm": self.reference_norm, "skipped_edits": self.skipped_edits,
                "anchored_edits": self.anchored_edits}

    def load_state_dict(self, state: dict) -> None:
        if state.get("reference_norm") is not None:
            self.prepare(state["reference_norm"])
        self.skipped_edits = int(state["skipped_edits"])
        self.anchored_edits = int(state["anchored_edits"])


def reference_norm(editor, requests: list[EditRequest], trim: float, model_key: str, cache_dir: Path,
                   batch_size: int = 64) -> dict:
    """r for ``editor`` (a LocateThenEditEditor on the *unedited* model) from ``requests``, cached under
    ``<cache_dir>/nas/<key>.json`` by everything it depends on: the weights (``model_key``), the site, v*'s
    hyper-parameters, the requests and ``trim``. Returns the cache entry: r, the raw mean, the count dropped and
    every request's ‖u‖."""
    description = {"model": model_key, "site_layer": editor.layers[-1], "target_site": editor.target_site,
                   "target_hparams": {k: v for k, v in vars(editor.target_hparams).items()
                                      if k not in ("v_chunk_tokens", "v_attention")},  # these change no number
                   "requests": content_key({"requests": [[r.prompt, r.subject, r.target] for r in requests]}),
                   "num_requests": len(requests), "trim": trim, "version": 1}

    def build(tmp: Path) -> None:
        logger.info("NAS: solving v* for %d reference requests on the unedited model (once per model, site and v* "
                    "settings; cached in %s)", len(requests), Path(cache_dir) / "nas")
        norms: list[float] = []
        for start in range(0, len(requests), batch_size):
            norms += editor.value_norms(requests[start:start + batch_size], PLAIN_ONLY)
            logger.info("NAS: %d/%d reference requests solved", len(norms), len(requests))
        mean, dropped = upper_trimmed_mean(norms, trim)
        tmp.write_text(json.dumps({"reference_norm": mean, "raw_mean": sum(norms) / len(norms), "dropped": dropped,
                                   "norms": norms, "description": description}, indent=1))

    path = cached_path(Path(cache_dir), "nas", content_key(description), build, suffix=".json")
    entry = json.loads(path.read_text())
    if entry.get("description") != json.loads(json.dumps(description)):
        raise ValueError(f"NAS cache entry {path} was written for another description; delete it")
    return entry
