"""Handing a key/value cache to a transformers forward, whichever name the installed version gives it.

transformers 5.25 renamed the forward argument ``past_key_values`` (and the output field) to ``cache``; the old
argument still works there with a FutureWarning until 5.40, and older versions know only ``past_key_values``.
Looking the name up in the forward's signature keeps EditGrid's cached forwards (v* prefixes, shared evaluation
prompts, causal tracing) on the fast path with either.
"""

from __future__ import annotations

import copy
import inspect

import torch

CACHE_ARGUMENTS = ("cache", "past_key_values")  # the current name first


def cache_argument(module: torch.nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a key/value cache, or None when it takes none."""
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def with_cache(module: torch.nn.Module, cache) -> dict:
    """Keyword arguments passing ``cache`` (None: no cache) to ``module``'s forward, with ``use_cache`` to match."""
    name = cache_argument(module)
    if name is None:
        if cache is not None:
            raise TypeError(f"{type(module).__name__}.forward takes no key/value cache "
                            f"({' or '.join(CACHE_ARGUMENTS)})")
        return {"use_cache": False}
    return {name: cache, "use_cache": cache is not None}


def returned_cache(output):
    """The key/value cache a forward returned (``cache`` or, before transformers 5.25, ``past_key_values``)."""
    for name in CACHE_ARGUMENTS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def fork_cache(cache, rows: torch.Tensor | None = None):
    """A cache holding the same prefix tensors (no copy; optionally only ``rows`` of the batch, a row repeated as
    often as ``rows`` names it) whose updates leave ``cache`` untouched: a forward appends the fed tokens'
    keys/values (for v*, carrying δ's autograd graph) to the cache it is given, and transformers' dynamic cache
    layers append by concatenating into new tensors. So one prefix's cache serves every batch that continues it."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        fork = copy.copy(cache)
        fork.layers = [copy.copy(layer) for layer in layers]
        if rows is not None:
            for layer in fork.layers:
                if getattr(layer, "is_initialized", True) and getattr(layer, "keys", None) is not None:
                    layer.reorder_cache(rows)  # re-binds keys/values to row-selected copies
        return fork
    fork = copy.deepcopy(cache)  # caches without per-layer objects (older transformers)
    if rows is not None:
        fork.reorder_cache(rows)
    return fork


# Some memory editors route a position by what came before it in the same sequence (MEMOIR's prompt feature is a
# mean over the prefix), which a forward over a cached prefix cannot show them. Such an editor marks the model while
# it is attached; evaluators then run every sequence whole (generation still decodes token by token, and the editor
# carries its per-row state across those steps).
WHOLE_SEQUENCES_MARK = "_editgrid_whole_sequences"


def mark_whole_sequences(model: torch.nn.Module, on: bool) -> None:
    """Count one more (``on``) or one fewer editor on ``model`` that needs whole sequences."""
    count = getattr(model, WHOLE_SEQUENCES_MARK, 0) + (1 if on else -1)
    setattr(model, WHOLE_SEQUENCES_MARK, max(count, 0))


def needs_whole_sequences(model: torch.nn.Module) -> bool:
    """True while an attached editor needs each forward to hold whole sequences (no shared cached prefixes)."""
    return getattr(model, WHOLE_SEQUENCES_MARK, 0) > 0


class WholeSequenceHooks:
    """The hooks of a memory editor that routes by whole sequences, with the model marked while they are on
    (``mark_whole_sequences``); ``remove`` takes both away, once."""

    def __init__(self, model: torch.nn.Module, handles: list):
        self.model, self.handles = model, list(handles)
        mark_whole_sequences(model, True)

    def remove(self) -> None:
        if not self.handles:
            return
        for handle in self.handles:
            handle.remove()
        self.handles = []
        mark_whole_sequences(self.model, False)
