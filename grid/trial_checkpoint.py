"""Trial checkpoints: what a sequential run needs to continue after edit n instead of starting again from edit 0.

One folder per trial, ``<checkpoints.dir>/<trial id>/`` (default ``<cache dir>/trial_checkpoints``; on several
nodes it must be shared storage). At every evaluation checkpoint, *after* that checkpoint's metrics and artifacts
were logged, and between evaluations after the first batch that ends ``checkpoints.every_minutes`` after the last
save, the trial writes ``step_<n>/``:

  state.pt     the edit cursor n, the edited matrices (only those: nothing else changes), the editor's
               state (the solver's memory — AlphaEdit's K_pK_pᵀ, LyapLock's queue, threshold and S_vk/S_kk — and
               the update transforms' RNGs), the cost counters, the v* probabilities so far, the per-record rows
               of the pre-edit and latest evaluation, and the torch RNG state
  scr_memory/  the SCR fact memory (retrieval/memory.py), for methods with SCR in front

and then points ``LATEST`` at it with one atomic rename, so a crash while writing leaves the previous checkpoint
in force. ``RUN`` names the MLflow run holding every metric up to the latest checkpoint: the next attempt copies
that history into its own run before it continues (TrialTracker.carry_over), and then takes ``RUN`` over. PRUNE needs nothing here: W₀ and σ̂ are recomputed from the unedited model. A finished trial's folder is
removed unless ``checkpoints.keep_final`` is set.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
STATE_FILE = "state.pt"
SCR_MEMORY_DIR = "scr_memory"
LATEST = "LATEST"
RUN = "RUN"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used for this trial (named with its path and the mismatch)."""


@dataclass
class TrialState:
    """Everything in ``state.pt``: enough, with the unedited model and the trial's config, to continue."""

    trial_id: str
    cursor: int  # edits applied
    weights: dict[int, torch.Tensor]  # edited layers' W (d×m as EditableModel.weight returns it)
    editor_state: dict
    edit_seconds: float
    scr_add_seconds: float
    vstar_probs: list[float]
    pre_rows: dict
    post_rows: dict
    result_rows: list[dict]  # TrialResult.checkpoints so far
    rng_state: torch.Tensor
    eval_seconds: float = 0.0  # every evaluation so far (cost/eval_share); absent from older checkpoints
    # the other matrices the editor writes (UltraEdit's ultra_targets), by label; absent from older checkpoints
    other_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    scr_memory: Path | None = field(default=None)  # folder of the saved fact memory, when the method has SCR


class TrialCheckpoints:
    """The checkpoint folder of one trial."""

    def __init__(self, root: str | Path, trial_id: str):
        self.trial_id = trial_id
        self.folder = Path(root) / trial_id

    def latest(self) -> TrialState | None:
        """The newest complete checkpoint, or None when the trial has none."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        step_dir = self.folder / pointer.read_text().strip()
        state_path = step_dir / STATE_FILE
        try:
            saved = torch.load(state_path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as err:
            raise CheckpointError(f"{state_path}: unreadable trial checkpoint ({type(err).__name__}: {err}); "
                                  f"delete {self.folder} to restart the trial from edit 0") from err
        if saved.get("format_version") != FORMAT_VERSION or saved.get("trial_id") != self.trial_id:
            raise CheckpointError(f"{state_path}: format {saved.get('format_version')!r} of trial "
                                  f"{saved.get('trial_id')!r}, expected format {FORMAT_VERSION} of trial "
                                  f"{self.trial_id!r}; delete {self.folder} to restart the trial from edit 0")
        saved.pop("format_version")
        scr_dir = step_dir / SCR_MEMORY_DIR
        return TrialState(**saved, scr_memory=scr_dir if scr_dir.is_dir() else None)

    def run_id(self) -> str | None:
        """The MLflow run whose history goes with the latest checkpoint."""
        path = self.folder / RUN
        return path.read_text().strip() if path.is_file() else None

    def set_run_id(self, run_id: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_atomically(RUN, run_id)

    def _write_atomically(self, name: str, text: str) -> None:
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, self.folder / name)

    def save(self, state: TrialState, run_id: str, scr_saver=None) -> Path:
        """Write ``state`` (and the SCR memory through ``scr_saver(folder)``) as ``step_<cursor>/``, make it the
        latest for run ``run_id``, and drop the older ones."""
        name = f"step_{state.cursor:07d}"
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        payload = {key: value for key, value in state.__dict__.items() if key != "scr_memory"}
        payload["format_version"] = FORMAT_VERSION
        payload["weights"] = {layer: w.detach().cpu().clone() for layer, w in state.weights.items()}
        payload["other_weights"] = {label: w.detach().cpu().clone() for label, w in state.other_weights.items()}
        torch.save(payload, tmp / STATE_FILE)
        if scr_saver is not None:
            scr_saver(tmp / SCR_MEMORY_DIR)
        final = self.folder / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        # RUN first: between the two writes the run named holds at least the steps of the older checkpoint.
        self._write_atomically(RUN, run_id)
        self._write_atomically(LATEST, name)  # the switch: from here on this is the checkpoint
        for old in self.folder.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
