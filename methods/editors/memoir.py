"""MEMOIR (Wang et al. 2025; docs/lifelong_editors.md): a residual memory beside one MLP output projection, each edit
written into its own sparse set of input columns, chosen by a hash of the prompt.

The wrapped matrix W₀ (d×m) never changes. Beside it a residual memory W_r (d×m, zero at the start) adds
  y = W₀a + W_r(a ⊙ M)
where a is the layer's input (the MLP activation) and M a 0/1 mask over its m features.

TopHash (the mask of a prompt): the prompt feature is the mean of a over the prompt's tokens minus a background
mean b (the same mean over ``memoir_background_samples`` unrelated texts): f = mean_t(a_t) − b. Its k entries of
largest |f| (k = ``memoir_active_share`` · m) are mapped through a fixed random permutation π of the m features;
M = 1 at those k features. Similar prompts share most of their top-k set, so they hash to overlapping masks; π
spreads each edit's columns over the whole matrix.

One edit (one request at a time, as the original runs them): the mask M_e is computed from the plain prompt and
stored (unless an identical mask is stored already). W_r is trained on the request under the 11 context templates
(docs/lifelong_editors.md, shared with WISE) with every row and position passing through W_r(a ⊙ M_e):
  L = mean over rows of Σ_target NLL / (n_target + 1)
a fresh SGD (lr ``memoir_lr``, weight decay 1e-5) for at most ``memoir_n_iter`` steps, the gradient clipped to
norm ``memoir_max_grad_norm``, stopping when the last two losses differ by ≤ 1e-4 and the last is ≤ 0.02. Only
the columns of M_e receive gradient, so edits with disjoint masks write disjoint parts of W_r.

Inference: a position's query mask M_q is TopHash of the mean over its sequence's tokens up to and including it.
If the best overlap |M_q ∩ M_i| / k over the stored masks reaches ``memoir_threshold``, the layer adds
W_r(a ⊙ M_i) with that *stored* mask M_i; otherwise it computes as W₀ alone.

EditGrid's choices, documented: the original pins one query mask per sequence, from the prompt's tokens, given
to it by the caller; an editor here sees forwards, not prompts, so each position is routed by its own prefix (as
GRACE routes each position by its own key). At the last prompt token this is exactly the original's query; the
continuation's positions are routed by prompt + the continuation so far, which in practice picks the same memory.
To see whole prefixes, the editor marks the model (methods/infra/kv_cache.py ``mark_whole_sequences``) so that
evaluators run each sequence in one forward; in token-by-token decoding it carries each row's running sum.
The loss ignores the right padding that the original's label mask also counts (its weight depended on the
longest template in the batch). The background texts are the model's own greedy continuations of generic starters
(the original ships a precomputed feature file per model).

Diagnostics (``memoir/...``, after every batch): ``edits``, ``masks`` (stored, distinct), ``duplicate_masks``,
``final_loss_mean``, ``residual_norm`` (‖W_r‖_F), ``mask_overlap_max`` (the largest overlap of the batch's new masks
with earlier ones), and ``routed_share`` (the share of real positions the memory served since the previous batch,
evaluations included).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.corpus import SAMPLE_STARTERS
from methods.editor import BatchReport
from methods.editors.templates import context_templates, greedy_continuations_at
from methods.finetune import answer_positions
from methods.infra.arch import EditableModel
from methods.infra.kv_cache import WholeSequenceHooks
from methods.infra.tokens import TextSpan, encode_spans, positions_from_mask
from methods.requests import EditRequest
from methods.targets import logits_at, replaying_below

WEIGHT_DECAY = 1e-5
STOP_DELTA, STOP_LOSS = 1e-4, 0.02
BACKGROUND_LENGTHS = (8, 16, 24)  # tokens of each background text's continuation
MAX_BACKGROUND_SAMPLES = len(SAMPLE_STARTERS) * len(BACKGROUND_LENGTHS)


@dataclass(frozen=True)
class MemoirHParams:
    memoir_lr: float = 1.0
    memoir_n_iter: int = 30
    memoir_active_share: float = 4096 / 14336  # k / m: the original's top-4096 of Llama-3-8B's 14,336 features
    memoir_threshold: float = 0.4  # the original's irr_threshold for question answering
    memoir_max_grad_norm: float = 1.0
    memoir_background_samples: int = 100


def prefix_means(activations: torch.Tensor, real: torch.Tensor, carried_sum: torch.Tensor | None = None,
                 carried_count: torch.Tensor | None = None):
    """Mean of ``activations`` [B, T, m] over each row's real tokens (``real`` [B, T]) up to and including each
    position, continuing a carried running sum [B, m] and count [B] (earlier tokens of the same rows).
    Returns (means [B, T, m], the running sum and count after the last position)."""
    x = activations.float() * real[..., None]
    sums = x.cumsum(dim=1)
    counts = real.long().cumsum(dim=1)
    if carried_sum is not None:
        sums = sums + carried_sum[:, None, :]
        counts = counts + carried_count[:, None]
    means = sums / counts.clamp(min=1)[..., None]
    return means, sums[:, -1], counts[:, -1]


def top_hash(features: torch.Tensor, k: int, permutation: torch.Tensor) -> torch.Tensor:
    """TopHash masks [..., m] (bool) of ``features`` [..., m]: the k entries of largest |value|, permuted."""
    index = features.abs().topk(k, dim=-1).indices
    mask = torch.zeros(features.shape, dtype=torch.bool, device=features.device)
    return mask.scatter_(-1, permutation.to(features.device)[index], True)


def best_overlaps(queries: torch.Tensor, stored: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For query masks [N, m] and stored masks [S, m] (S ≥ 1): the best overlap |M_q ∩ M_i| / k and its index i."""
    overlap = queries.float() @ stored.float().t() / k
    return overlap.max(dim=1)


class MemoirEditor:
    writes_weights = False  # W₀ never changes; the residual memory and the masks are the editor's state

    def __init__(self, editable: EditableModel, tokenizer, layers: list[int], hparams: MemoirHParams, seed: int = 0):
        if len(layers) != 1:
            raise ValueError(f"MEMOIR wraps exactly one layer, got {layers}")
        self.editable, self.tokenizer, self.layers, self.hparams = editable, tokenizer, list(layers), hparams
        self.module = editable.mlp_out(layers[0])
        weight = editable.weight(layers[0])
        self.width = weight.shape[1]  # m: the layer's input features
        self.k = max(1, min(self.width, round(hparams.memoir_active_share * self.width)))
        generator = torch.Generator().manual_seed(seed)
        self.permutation = torch.randperm(self.width, generator=generator).to(weight.device)
        self.residual = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # W_r
        self.masks = torch.zeros(0, self.width, dtype=torch.bool, device=weight.device)
        self.edits = 0
        self.duplicates = 0
        self.routed_positions = 0
        self.real_positions = 0
        self._last: dict[str, float] = {}
        self._training: tuple[torch.nn.Parameter, torch.Tensor] | None = None  # (W_r being trained, M_e)
        self._mask_of_batch: torch.Tensor | None = None
        self._carried: tuple[torch.Tensor, torch.Tensor] | None = None  # running (sum, count) per row, decoding
        self._served: list[torch.Tensor] | None = None  # while served_rows runs: each forward's routed positions
        self._bypass = False
        self.templates = context_templates(editable.model, tokenizer)
        self.background = self._background_mean(editable.model, tokenizer)
        # routed by all of a sequence's tokens: evaluators must not split it at a cached prompt
        self._hooks = WholeSequenceHooks(editable.model, [
            editable.model.register_forward_pre_hook(self._remember_mask, with_kwargs=True),
            self.module.register_forward_hook(self._forward)])

    def remove(self) -> None:
        self._hooks.remove()

    # -- features --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _layer_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """a [B, T, m] at the wrapped layer for a left- or right-padded batch (the memory is not applied)."""
        grabbed = {}

        def grab(module, args):
            grabbed["a"] = args[0].detach()

        handle = self.module.register_forward_pre_hook(grab)
        device = self.editable.parameter_device()
        self._bypass = True  # a look at the inputs: no routing, no counters
        try:
            self.editable.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                position_ids=positions_from_mask(attention_mask).to(device), use_cache=False)
        finally:
            handle.remove()
            self._bypass = False
        return grabbed["a"]

    def _background_mean(self, model, tokenizer) -> torch.Tensor:
        """b: the mean over unrelated texts of each text's mean layer input."""
        count = self.hparams.memoir_background_samples
        texts = [text for group in greedy_continuations_at(model, tokenizer, SAMPLE_STARTERS, BACKGROUND_LENGTHS)
                 for text in group][:count]
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            batch = tokenizer(texts, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
        means = []
        for start in range(0, len(texts), 32):
            ids, mask = batch["input_ids"][start:start + 32], batch["attention_mask"][start:start + 32]
            a = self._layer_inputs(ids, mask)
            real = mask.to(a.device).bool()
            means.append((a.float() * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1))
        return torch.cat(means).mean(dim=0)

    def prompt_mask(self, activations: torch.Tensor) -> torch.Tensor:
        """TopHash mask [m] of one prompt's layer inputs [T, m]."""
        return top_hash(activations.float().mean(dim=0) - self.background.to(activations.device), self.k,
                        self.permutation)

    # -- inference ---------------------------------------------------------------------------------------------
    def _remember_mask(self, module, args, kwargs):
        self._mask_of_batch = kwargs.get("attention_mask")

    def _real_tokens(self, activations: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Which of this forward's positions are real tokens [B, T], and whether the forward continues the previous
        one (token-by-token decoding: the attention mask covers more positions than the forward runs)."""
        batch, length = activations.shape[:2]
        mask = self._mask_of_batch
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch:
            return torch.ones(batch, length, dtype=torch.bool, device=activations.device), False
        return mask[:, -length:].to(activations.device).bool(), mask.shape[1] > length

    def _forward(self, module, args, output):
        activations = args[0]
        if self._bypass:
            return None
        if self._training is not None:  # every row and position through the edit's own mask
            param, mask = self._training
            return output + F.linear(activations * mask.to(activations.dtype), param.to(activations.dtype))
        real, continues = self._real_tokens(activations)
        carried = self._carried if continues and self._carried is not None \
            and self._carried[0].shape[0] == activations.shape[0] else (None, None)
        with torch.no_grad():
            means, running_sum, running_count = prefix_means(activations, real, *carried)
        self._carried = (running_sum, running_count)
        if len(self.masks) == 0:
            if self._served is not None:
                self._served.append(torch.zeros(real.shape, dtype=torch.bool))
            return None
        with torch.no_grad():
            queries = top_hash(means - self.background.to(means.device), self.k, self.permutation)
            best, index = best_overlaps(queries.reshape(-1, self.width), self.masks.to(queries.device), self.k)
            hit = (best >= self.hparams.memoir_threshold) & real.reshape(-1)
        if self._served is not None:
            self._served.append(hit.reshape(real.shape).cpu())
        else:
            self.routed_positions += int(hit.sum())
            self.real_positions += int(real.sum())
        if not bool(hit.any()):
            return None
        chosen = self.masks.to(hit.device)[index] & hit[:, None]  # [B·T, m]: the stored mask, or nothing
        flat = activations.reshape(-1, self.width) * chosen.to(activations.dtype)
        return output + F.linear(flat, self.residual.to(device=flat.device, dtype=flat.dtype)).reshape(output.shape)

    @torch.no_grad()
    def served_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Which rows of a (left-padded) batch the memory serves at one or more real tokens (one forward); the
        routing counters of ``metrics`` are left as they were."""
        device = self.editable.parameter_device()
        self._served = []
        try:
            self.editable.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                position_ids=positions_from_mask(attention_mask).to(device), use_cache=False)
            (served,) = self._served
        finally:
            self._served = None
        return (served & attention_mask.bool()).any(dim=1)

    # -- editing -----------------------------------------------------------------------------------------------
    def _rows(self, request: EditRequest):
        """The 11 template rows (right-padded) and (row, position, token) of every target token."""
        filled = request.filled_prompt
        texts = [template.format(filled) for template in self.templates]
        spans = [TextSpan(text=text + request.target_with_space, start=0, end=1, answer_start=len(text))
                 for text in texts]
        batch = encode_spans(self.tokenizer, spans, padding_side="right")
        return (batch, *answer_positions(batch, len(texts)), len(texts))

    def _edit_one(self, request: EditRequest) -> tuple[float, float]:
        """Train W_r on one request; (the last loss, the new mask's best overlap with the earlier masks)."""
        hp = self.hparams
        device = self.editable.parameter_device()
        batch, rows, cols, tokens, n_rows = self._rows(request)
        # Row 0 is the plain prompt ("{}"): its prompt tokens decide the edit's mask.
        prompt_length = int(batch.answer_first[0])
        a = self._layer_inputs(batch.input_ids[:1, :prompt_length], batch.attention_mask[:1, :prompt_length])
        mask = self.prompt_mask(a[0])
        overlap = 0.0
        if len(self.masks):
            best, _ = best_overlaps(mask[None], self.masks.to(mask.device), self.k)
            overlap = float(best[0])
        if len(self.masks) and bool((self.masks.to(mask.device) == mask).all(dim=1).any()):
            self.duplicates += 1
        else:
            self.masks = torch.cat([self.masks, mask[None].to(self.masks.device)])
        batch, rows, cols, tokens = batch.to(device), rows.to(device), cols.to(device), tokens.to(device)
        counts = torch.bincount(rows, minlength=n_rows).float()
        param = torch.nn.Parameter(self.residual.clone())
        optimizer = torch.optim.SGD([param], lr=hp.memoir_lr, weight_decay=WEIGHT_DECAY)
        losses: list[float] = []
        self._training = (param, mask.to(param.device))
        # The blocks below the wrapped layer cannot see the memory: each step runs only the blocks from it up.
        try:
            with replaying_below(self.editable.model, self.editable.blocks, self.layers[0], batch.model_inputs()):
                with torch.enable_grad():
                    for _ in range(hp.memoir_n_iter):
                        logits = logits_at(self.editable.model, batch.model_inputs(), rows, cols)
                        nll = F.cross_entropy(logits.float(), tokens, reduction="none")
                        loss = (torch.zeros(n_rows, device=nll.device).index_add(0, rows, nll) / (counts + 1)).mean()
                        optimizer.zero_grad()
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_([param], max_norm=hp.memoir_max_grad_norm)
                        optimizer.step()
                        losses.append(float(loss.detach()))
                        if len(losses) >= 2 and abs(losses[-1] - losses[-2]) <= STOP_DELTA and losses[-1] <= STOP_LOSS:
                            break
        finally:
            self._training = None
        self.residual = param.detach().clone()
        self.edits += 1
        return losses[-1], overlap

    def apply(self, requests: list[EditRequest]) -> BatchReport:
        start = time.perf_counter()
        results = [self._edit_one(request) for request in requests]
        self._last = {"memoir/edits": float(self.edits), "memoir/masks": float(len(self.masks)),
                      "memoir/duplicate_masks": float(self.duplicates),
                      "memoir/final_loss_mean": sum(loss for loss, _ in results) / len(results),
                      "memoir/residual_norm": float(self.residual.norm()),
                      "memoir/mask_overlap_max": max(overlap for _, overlap in results)}
        seconds = time.perf_counter() - start
        return BatchReport(num_requests=len(requests), seconds=seconds, target_seconds=seconds, solve_seconds=0.0,
                           target_prob=[], target_steps=self.hparams.memoir_n_iter)

    def metrics(self) -> dict[str, float]:
        out = dict(self._last)
        if self.real_positions:  # positions served since the previous batch's metrics (evaluations included)
            out["memoir/routed_share"] = self.routed_positions / self.real_positions
        self.routed_positions = self.real_positions = 0
        return out

    def state_dict(self) -> dict:
        # Saved on the CPU, so that a checkpoint loads on any device. The permutation and the background mean are
        # rebuilt from the seed and the model; they are saved to check that they were.
        return {"residual": self.residual.cpu().clone(), "masks": self.masks.cpu().clone(), "edits": self.edits,
                "duplicates": self.duplicates, "permutation": self.permutation.cpu().clone(),
                "background": self.background.cpu().clone(),
                "routed": (self.routed_positions, self.real_positions)}

    def load_state_dict(self, state: dict) -> None:
        if not torch.equal(state["permutation"], self.permutation.cpu()):
            raise ValueError("MEMOIR checkpoint was made with another TopHash permutation (another seed)")
        if not torch.allclose(state["background"], self.background.cpu(), rtol=1e-4, atol=1e-5):
            raise ValueError("MEMOIR checkpoint was made with another background mean (another model)")
        device = self.residual.device
        self.residual = state["residual"].to(device).clone()
        self.masks = state["masks"].to(device).clone()
        self.edits, self.duplicates = int(state["edits"]), int(state["duplicates"])
        self.routed_positions, self.real_positions = (int(x) for x in state["routed"])
