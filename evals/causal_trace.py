"""Causal tracing (ROME, Meng et al. 2022): which layers' MLPs carry a fact at the subject's last token.

For one fact (prompt, subject, answer) there are three kinds of run:

* clean: the prompt as is; we record p(answer's first token) and, at the subject's last token, every layer's MLP
  output and block output (the "states");
* corrupted: Gaussian noise is added to the input embeddings of every subject token, so the model loses the
  subject; p drops;
* restored: corrupted, except that at the subject's last token the states of a few layers are overwritten with
  their clean values.

The indirect effect of a restoration is IE = p_restored − p_corrupted; averaged over facts it is the AIE. A
"window" of w layers centred on layer ℓ restores ℓ−⌊w/2⌋ … ℓ+⌊(w−1)/2⌋ (clipped to the model), as ROME does for
MLPs, because one MLP's effect is small when the neighbouring ones stay corrupted.

Speed: restoring at the subject's last token s cannot change any position before s (causal attention), so the
corrupted prefix (tokens 0…s−1) is run once per noise sample and its key/value cache is shared by every restored
run, which then only processes tokens s…end. ``reuse_prefix=False`` runs whole prompts instead (the reference the
tests compare against).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from methods.infra.arch import EditableModel
from methods.infra.kv_cache import returned_cache, with_cache

MLP = "mlp"
HIDDEN = "hidden"
STATE_KINDS = (MLP, HIDDEN)


class TracingError(ValueError):
    """A fact cannot be traced (subject not in the prompt, no fast tokenizer, ...)."""


@dataclass(frozen=True)
class TracedPrompt:
    """A prompt tokenised for tracing: the subject occupies tokens ``subject_start`` … ``subject_last``."""

    input_ids: tuple[int, ...]
    subject_start: int
    subject_last: int
    answer_id: int


@dataclass(frozen=True)
class Restoration:
    """Which states to overwrite with their clean values at the subject's last token."""

    kind: str  # MLP or HIDDEN
    layers: tuple[int, ...]


@dataclass
class FactTrace:
    """One fact's result: ``restored[(kind, window)]`` holds p_restored per centre layer, mean over noise samples."""

    p_clean: float
    p_corrupted: float
    restored: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def indirect_effect(self, kind: str, window: int) -> torch.Tensor:
        return self.restored[(kind, window)] - self.p_corrupted

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupted


def subject_token_span(tokenizer, prompt: str, subject: str) -> tuple[list[int], int, int]:
    """Token ids of ``prompt`` and the first/last token index of the subject's first occurrence.

    Uses the tokenizer's character offsets, so the subject's tokens are exactly those the model sees in context
    (re-tokenising the subject alone can split it differently, e.g. without its leading space).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TracingError("causal tracing needs a fast tokenizer (character offsets)")
    char_start = prompt.find(subject)
    if char_start < 0 or not subject:
        raise TracingError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    char_end = char_start + len(subject)
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    inside = [index for index, (start, end) in enumerate(encoding["offset_mapping"])
              if end > start and end > char_start and start < char_end]  # end > start skips special tokens
    if not inside:
        raise TracingError(f"no token of {prompt!r} covers the subject {subject!r}")
    return list(encoding["input_ids"]), inside[0], inside[-1]


def answer_first_token(tokenizer, prompt_ids: Sequence[int], prompt: str, answer: str) -> int:
    """The first token of `` answer`` as it follows the prompt.

    Read off the tokenisation of prompt + answer when its prefix is the prompt's own tokens (the usual case);
    otherwise from the answer tokenised alone.
    """
    joined = tokenizer(prompt + " " + answer)["input_ids"]
    if len(joined) > len(prompt_ids) and list(joined[:len(prompt_ids)]) == list(prompt_ids):
        return int(joined[len(prompt_ids)])
    return int(tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0])


def prepare_prompt(tokenizer, prompt: str, subject: str, answer: str) -> TracedPrompt:
    ids, first, last = subject_token_span(tokenizer, prompt, subject)
    return TracedPrompt(input_ids=tuple(ids), subject_start=first, subject_last=last,
                        answer_id=answer_first_token(tokenizer, ids, prompt, answer))


def embedding_noise_std(model: nn.Module, multiple: float = 3.0, chunk: int = 16384) -> float:
    """``multiple`` × the standard deviation of the input-embedding module's outputs over the vocabulary (ROME: 3×).

    Measured on the module's outputs, where the noise is added, not on its weight: some embedding modules scale
    their rows (Gemma's multiplies by √d), and noise sized from the weight would then barely corrupt the subject.
    For a plain embedding the two are the same number."""
    embed = model.get_input_embeddings()
    vocab = embed.weight.shape[0]
    total, total_sq, count = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, vocab, chunk):
            ids = torch.arange(start, min(vocab, start + chunk), device=embed.weight.device)
            rows = embed(ids).double()
            total += float(rows.sum())
            total_sq += float((rows * rows).sum())
            count += rows.numel()
    mean = total / count
    return float(multiple * math.sqrt(max(0.0, (total_sq - count * mean * mean) / (count - 1))))


def window_layers(centre: int, window: int, num_layers: int) -> tuple[int, ...]:
    """The ``window`` layers centred on ``centre`` (for even windows one more below), clipped to the model."""
    first = centre - window // 2
    return tuple(layer for layer in range(first, first + window) if 0 <= layer < num_layers)


def eligible_centres(num_layers: int, restore_window: int = 1, min_layer: int = 0) -> list[int]:
    """Centre layers whose restoration window lies entirely at or above ``min_layer``."""
    return [centre for centre in range(num_layers)
            if min(window_layers(centre, restore_window, num_layers)) >= min_layer]


def recommend_edit_layers(average_effect: Sequence[float], width: int = 5, restore_window: int = 1,
                          min_layer: int = 0) -> tuple[int, tuple[int, ...]]:
    """Peak layer of an AIE curve and the ``width`` layers ending at it (peak−width+1 … peak).

    This is AdaEdit §4.2's rule ("denote L as the max AIE value layer, select L−4, …, L−1, L"), which is how
    MEMIT/PMET place their edited layers just before the MLP effect peaks. ``min_layer`` leaves the lowest layers
    out of both the peak search (no restoration window may reach below it) and the edit window: the first MLP
    acts as an extended token embedding, so its effect at the subject's last token is the token's identity
    rather than the fact. A peak closer than ``width`` layers to ``min_layer`` gives the first ``width`` layers.
    """
    values = torch.as_tensor(list(average_effect), dtype=torch.float64)
    if len(values) - min_layer < width:
        raise ValueError(f"an AIE curve of {len(values)} layers cannot hold {width} layers from layer {min_layer}")
    centres = eligible_centres(len(values), restore_window, min_layer)
    if not centres:
        raise ValueError(f"no {restore_window}-layer window of {len(values)} layers lies above layer {min_layer}")
    peak = max(centres, key=lambda centre: float(values[centre]))
    last = max(peak, min_layer + width - 1)
    return peak, tuple(range(last - width + 1, last + 1))


def bootstrap_peak_frequencies(per_fact_effect: torch.Tensor, centres: Sequence[int], resamples: int = 1000,
                               seed: int = 0) -> list[float]:
    """How often each layer is the AIE peak when the facts are resampled with replacement.

    ``per_fact_effect`` is [facts, layers]; only ``centres`` compete for the peak. Returns one share per layer.
    """
    generator = torch.Generator().manual_seed(seed)
    num_facts, num_layers = per_fact_effect.shape
    picks = torch.randint(num_facts, (resamples, num_facts), generator=generator)
    means = per_fact_effect.double()[picks].mean(dim=1)[:, list(centres)]  # [resamples, centres]
    winners = torch.tensor(list(centres))[means.argmax(dim=1)]
    return (torch.bincount(winners, minlength=num_layers).double() / resamples).tolist()


def _last_logits_kwargs(model: nn.Module) -> dict:
    """Only the last position's logits are needed: skip the vocabulary projection elsewhere when supported."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _contiguous_input(module, inputs):
    # ``logits_to_keep`` hands the output projection a strided slice; on CPU a linear layer on a non-contiguous
    # 3-D input falls back to a batched matmul against a broadcast weight, which took over half the run time.
    return tuple(x.contiguous() if isinstance(x, torch.Tensor) else x for x in inputs)


@contextmanager
def _fast_last_logits(model: nn.Module) -> Iterator[None]:
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _first_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first_tensor(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextmanager
def _registered(hooks: list[tuple[nn.Module, object]]) -> Iterator[None]:
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class CausalTracer:
    """Runs clean, corrupted and restored passes of one model; stateless between facts (each fact's noise comes
    from its own ``fact_seed``, so a fact traces the same whatever else is traced)."""

    def __init__(self, editable: EditableModel, noise_std: float, num_samples: int = 10, max_batch_rows: int = 256,
                 reuse_prefix: bool = True):
        if num_samples < 1:
            raise ValueError("num_samples must be ≥ 1")
        self.editable = editable
        self.model = editable.model
        self.noise_std = float(noise_std)
        self.num_samples = num_samples
        self.max_batch_rows = max(max_batch_rows, num_samples)
        self.reuse_prefix = reuse_prefix
        self._logits_kwargs = _last_logits_kwargs(self.model)

    @property
    def num_layers(self) -> int:
        return self.editable.num_layers

    def _state_module(self, kind: str, layer: int) -> nn.Module:
        if kind == MLP:
            return self.editable.mlp(layer)
        if kind == HIDDEN:
            return self.editable.block(layer)
        raise ValueError(f"unknown state kind {kind!r}; expected one of {STATE_KINDS}")

    def _device(self) -> torch.device:
        return self.editable.parameter_device()

    def _answer_probability(self, logits: torch.Tensor, answer_id: int) -> torch.Tensor:
        return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_id]

    @torch.no_grad()
    def clean_run(self, traced: TracedPrompt, kinds: Sequence[str] = STATE_KINDS
                  ) -> tuple[float, dict[str, torch.Tensor]]:
        """p(answer) on the clean prompt and, per kind, the states at the subject's last token ([layers, d])."""
        position = traced.subject_last
        captured: dict[tuple[str, int], torch.Tensor] = {}

        def capture(kind: str, layer: int):
            def hook(module, inputs, output):
                captured[(kind, layer)] = _first_tensor(output)[0, position].detach().clone()
            return hook

        hooks = [(self._state_module(kind, layer), capture(kind, layer))
                 for kind in kinds for layer in range(self.num_layers)]
        input_ids = torch.tensor([traced.input_ids], device=self._device())
        with _registered(hooks), _fast_last_logits(self.model):
            logits = self.model(input_ids=input_ids, use_cache=False, **self._logits_kwargs).logits
        states = {kind: torch.stack([captured[(kind, layer)] for layer in range(self.num_layers)]) for kind in kinds}
        return float(self._answer_probability(logits, traced.answer_id)[0]), states

    def sample_noise(self, traced: TracedPrompt, fact_seed: int) -> torch.Tensor:
        """Noise for the subject's token embeddings: [samples, subject tokens, d], reproducible per fact."""
        generator = torch.Generator().manual_seed(fact_seed)
        weight = self.model.get_input_embeddings().weight
        subject_len = traced.subject_last - traced.subject_start + 1
        noise = torch.randn(self.num_samples, subject_len, weight.shape[1], generator=generator)
        return (self.noise_std * noise).to(device=weight.device, dtype=weight.dtype)

    @torch.no_grad()
    def _restored_probabilities(self, traced: TracedPrompt, restorations: Sequence[Restoration | None],
                                noise: torch.Tensor, clean_states: dict[str, torch.Tensor]) -> torch.Tensor:
        """p(answer) for every (noise sample, restoration): [samples, restorations]. ``None`` restores nothing."""
        restorations = list(restorations)
        per_chunk = max(1, self.max_batch_rows // self.num_samples)
        columns = [self._run_chunk(traced, restorations[start:start + per_chunk], noise, clean_states)
                   for start in range(0, len(restorations), per_chunk)]
        return torch.cat(columns, dim=1)

    def _run_chunk(self, traced: TracedPrompt, restorations: list[Restoration | None], noise: torch.Tensor,
                   clean_states: dict[str, torch.Tensor]) -> torch.Tensor:
        # Rows are sample-major (row = sample · n + restoration), the order a repeat-interleaved prefix cache has.
        n = len(restorations)
        device = self._device()
        ids = torch.tensor(traced.input_ids, device=device)
        split = traced.subject_last if (self.reuse_prefix and traced.subject_last > 0) else 0
        past = None
        if split > 0:
            prefix_noise = noise[:, :split - traced.subject_start]  # subject tokens before the last one
            prefix_positions = list(range(traced.subject_start, split))
            noise_hook = [(self.model.get_input_embeddings(), _add_noise_hook(prefix_positions, prefix_noise))]
            with _registered(noise_hook), _fast_last_logits(self.model):
                past = returned_cache(self.model(input_ids=ids[:split].expand(self.num_samples, -1), use_cache=True,
                                                 **self._logits_kwargs))
            past.batch_repeat_interleave(n)
        first_noised = max(traced.subject_start, split)  # first subject token inside this pass
        suffix_noise = noise[:, first_noised - traced.subject_start:].repeat_interleave(n, dim=0)
        noised_positions = list(range(first_noised - split, traced.subject_last + 1 - split))
        hooks = [(self.model.get_input_embeddings(), _add_noise_hook(noised_positions, suffix_noise))]
        restore_position = traced.subject_last - split
        rows_by_module: dict[tuple[str, int], list[int]] = {}
        for column, restoration in enumerate(restorations):
            if restoration is None:
                continue
            for layer in restoration.layers:
                rows_by_module.setdefault((restoration.kind, layer), []).extend(
                    sample * n + column for sample in range(self.num_samples))
        for (kind, layer), rows in rows_by_module.items():
            hooks.append((self._state_module(kind, layer),
                          _restore_hook(torch.tensor(rows, device=device), restore_position,
                                        clean_states[kind][layer])))
        suffix = ids[split:].expand(self.num_samples * n, -1)
        with _registered(hooks), _fast_last_logits(self.model):
            logits = self.model(input_ids=suffix, **with_cache(self.model, past), **self._logits_kwargs).logits
        return self._answer_probability(logits, traced.answer_id).view(self.num_samples, n)

    def trace(self, traced: TracedPrompt, windows: dict[str, Sequence[int]], fact_seed: int) -> FactTrace:
        """Clean, corrupted and, for every kind/window/centre layer, restored p(answer) of one fact.

        ``windows`` maps a state kind to the window sizes to trace it with, e.g. ``{"mlp": [1, 5], "hidden": [1]}``.
        """
        kinds = [kind for kind in windows if windows[kind]]
        p_clean, clean_states = self.clean_run(traced, kinds)
        restorations: list[Restoration | None] = [None]
        keys: list[tuple[str, int]] = []
        for kind in kinds:
            for window in windows[kind]:
                keys.append((kind, window))
                restorations.extend(Restoration(kind, window_layers(layer, window, self.num_layers))
                                    for layer in range(self.num_layers))
        probabilities = self._restored_probabilities(
            traced, restorations, self.sample_noise(traced, fact_seed), clean_states).mean(dim=0).cpu().double()
        result = FactTrace(p_clean=p_clean, p_corrupted=float(probabilities[0]))
        for index, key in enumerate(keys):
            start = 1 + index * self.num_layers
            result.restored[key] = probabilities[start:start + self.num_layers]
        return result


def _add_noise_hook(positions: list[int], noise: torch.Tensor):
    """Embedding hook: add ``noise`` [batch, len(positions), d] at ``positions`` of this pass's input."""
    def hook(module, inputs, output):
        if not positions:
            return output
        noisy = output.clone()
        noisy[:, positions] += noise
        return noisy
    return hook


def _restore_hook(rows: torch.Tensor, position: int, clean_state: torch.Tensor):
    """State hook: overwrite the state at ``position`` of the given batch rows with its clean value."""
    def hook(module, inputs, output):
        state = _first_tensor(output).clone()
        state[rows, position] = clean_state.to(state.dtype)
        return _replace_first_tensor(output, state)
    return hook


def select_known_facts(model: nn.Module, prompts: Sequence[TracedPrompt], batch_size: int = 32) -> list[bool]:
    """Which prompts the model "knows": the answer's first token is its argmax on the clean prompt.

    Prompts are grouped by token length so that no padding (and no position shift) enters the check.
    """
    known = [False] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for index, traced in enumerate(prompts):
        by_length.setdefault(len(traced.input_ids), []).append(index)
    device = next(model.parameters()).device
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = torch.tensor([prompts[i].input_ids for i in chunk], device=device)
            answers = torch.tensor([prompts[i].answer_id for i in chunk], device=device)
            with torch.no_grad(), _fast_last_logits(model):
                logits = model(input_ids=batch, use_cache=False, **_last_logits_kwargs(model)).logits
            is_top = logits[:, -1].argmax(dim=-1) == answers
            for i, flag in zip(chunk, is_top.tolist()):
                known[i] = bool(flag)
    return known


@dataclass
class TraceSummary:
    """Average over facts: AIE and its standard error per (kind, window), plus mean clean/corrupted p."""

    num_facts: int
    mean_p_clean: float
    mean_p_corrupted: float
    average_effect: dict[tuple[str, int], list[float]]
    standard_error: dict[tuple[str, int], list[float]]


def summarise(traces: Sequence[FactTrace]) -> TraceSummary:
    if not traces:
        raise ValueError("no traced facts to summarise")
    average, error = {}, {}
    for key in traces[0].restored:
        effects = torch.stack([trace.indirect_effect(*key) for trace in traces])  # [facts, layers]
        average[key] = effects.mean(dim=0).tolist()
        spread = effects.std(dim=0) if len(traces) > 1 else torch.zeros(effects.shape[1], dtype=effects.dtype)
        error[key] = (spread / len(traces) ** 0.5).tolist()
    return TraceSummary(num_facts=len(traces),
                        mean_p_clean=sum(t.p_clean for t in traces) / len(traces),
                        mean_p_corrupted=sum(t.p_corrupted for t in traces) / len(traces),
                        average_effect=average, standard_error=error)
