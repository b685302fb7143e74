"""Reading and editing activations with forward hooks, generically across architectures.

``capture`` runs one forward pass and returns a module's input or output at chosen token positions, stopping the
pass right after the deepest module it needs (the layers above do not influence what was captured).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from methods.infra.tokens import EncodedBatch


class _StopForward(Exception):
    """Raised from a hook once everything needed has been captured."""


def hidden_of(output):
    """The hidden-state tensor of a module's output (blocks may return a tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


@dataclass(frozen=True)
class CaptureSite:
    module: nn.Module
    what: Literal["input", "output"]


def capture(model: nn.Module, batch: EncodedBatch, sites: list[CaptureSite], rows: torch.Tensor,
            positions: torch.Tensor) -> list[torch.Tensor]:
    """For each site, the [len(rows), dim] activations at (rows[j], positions[j]) from one forward pass."""
    results: list[torch.Tensor | None] = [None] * len(sites)
    pending = [len(sites)]

    def make_hook(index: int, site: CaptureSite) -> Callable:
        def hook(module, inputs, output=None):
            tensor = inputs[0] if site.what == "input" else hidden_of(output)
            results[index] = tensor[rows, positions].detach()
            pending[0] -= 1
            if pending[0] == 0:
                raise _StopForward

        return hook

    handles = []
    try:
        for i, site in enumerate(sites):
            if site.what == "input":
                handles.append(site.module.register_forward_pre_hook(make_hook(i, site)))
            else:
                handles.append(site.module.register_forward_hook(make_hook(i, site)))
        batch = batch.to(next(model.parameters()).device)
        with torch.no_grad():
            try:
                model(**batch.model_inputs(), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"capture sites {missing} were never reached in the forward pass")
    return results  # type: ignore[return-value]


@contextmanager
def add_at_positions(module: nn.Module, rows: torch.Tensor, positions: torch.Tensor, delta_fn: Callable[[], torch.Tensor]):
    """While active, adds ``delta_fn()[j]`` to the module's output hidden state at (rows[j], positions[j])."""

    def hook(mod, inputs, output):
        hidden = hidden_of(output)
        delta = delta_fn().to(hidden.dtype)
        return replace_hidden(output, hidden.index_put((rows, positions), delta, accumulate=True))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
