"""WISE (Wang et al. 2024; docs/lifelong_editors.md): a side memory beside one MLP output projection, with routing.

The wrapped matrix keeps W₀ (frozen) and gets a trainable copy W′ (the side memory). Each edit trains W′ on the edit
only through a random mask M of its entries; every ``wise_save_freq`` edits W′ becomes a *shard* and starts again
from W₀ with a new mask; every ``wise_merge_freq`` edits shards are TIES-merged. At inference a sequence is served
by the memory whose activation score passes a threshold ε learnt while editing, else by W₀.

Activation score of a weight U on a sequence with MLP activations a_1..a_T (the matrix's inputs):
  s(U) = (1/T) Σ_t ‖φ(U a_t) − φ(W₀ a_t)‖₂,   φ = the model's ``hidden_act`` (SiLU on Llama/SmolLM2);
the max over t replaces the mean when T > 100.

One edit (one request at a time, as the paper runs them): rows = the request under 11 templates ("{}" and greedy
5- and 10-token continuations of five starters) plus one irrelevant text x_i; while training, every row runs
through W′. Loss L = L_ft + L_act with
  L_ft  = mean over the 11 rows of Σ_target NLL / (n_target + 1)       (the original's masking quirk, kept)
  L_act = P(Δ_i − Δ_e + γ) + [Δ_i − α]₊ + P(β − Δ_e),   Δ_e = s(W′) per in-scope row, Δ_i = s(W′) on x_i,
  P(v) = mean of the positive entries of v (0 if none).
A fresh SGD (lr ``wise_lr``, weight decay 1e-5) for at most ``wise_n_iter`` steps: ∇W′ ← ∇W′ ⊙ M, step, clamp W′
into W₀ ± 1; stop when the last two losses differ by ≤ 1e-4 and the last is ≤ 0.02. The mean Δ_e of the last step
is recorded; ε = ``wise_act_ratio`` · min(recorded).

Sharding and merging (edit counter c, before the edit): a new mask (Bernoulli ``wise_mask_ratio``) when
c % save_freq = 0; after the edit, c += 1; if c % save_freq = 0, W′ is stored as a shard and reset to W₀
(Retrieve: its ε-statistic is stored with it and reset); if c % merge_freq = 0, TIES merge (``ties_merge``):
  Merge (``wise_mode: merge``): the first merge averages the n shards (w = 1/n) into the main memory W_L; later
  merges weight each new shard 0.4/n and the current W_L 0.6; the shards are cleared; ε is never reset.
  Retrieve (``wise_mode: retrieve``): the last merge_freq/save_freq shards are merged (equal weights) into one
  stored memory whose ε is the min of theirs; memories accumulate.

Routing at inference, per sequence (the original runs batch 1): Merge — s(W_L) and s(W′); both below ε → W₀,
else the higher-scoring one. Retrieve — W′ if s(W′) ≥ ε else W₀ (best = s(W′)); a stored memory replaces it if its
score exceeds the best and act_ratio × its own ε-statistic (top-1). The chosen weight serves every position.

EditGrid's choices, documented: scores average over a sequence's real tokens (the attention mask, not pads — the
original's batch-1 inference has no pads, its training batch averaged over pads too); the irrelevant text x_i of
each edit comes from a fixed pool of the model's own greedy continuations of generic starters (the original draws
a zsRE training question; an editor here sees only edit requests); merges happen only in ``apply`` — evaluating
never changes the editor (the original merges pending shards on the first forward after save_freq edits); while
WISE is attached, evaluators run each sequence in one forward (methods/infra/kv_cache.py ``mark_whole_sequences``),
as the original's batch-1 inference does — a forward over a cached prompt would let a suffix be routed alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.infra.arch import EditableModel
from methods.infra.kv_cache import WholeSequenceHooks
from methods.editor import BatchReport
from methods.editors.templates import context_templates, greedy_continuations
from methods.finetune import answer_positions
from methods.requests import EditRequest
from methods.targets import logits_at, replaying_below
from methods.infra.tokens import TextSpan, encode_spans, positions_from_mask

IRRELEVANT_STARTERS = ("The weather", "In 1998,", "My favourite", "A recipe for", "The river", "Scientists say",
                       "The football match", "Once upon a time", "The museum", "Her new song", "The train to",
                       "Mathematics is", "The old castle", "A good night's sleep", "The election", "Coffee is",
                       "The ocean", "His first novel", "The mountain village", "Computers")
LONG_SEQUENCE = 100  # above this many tokens the score is the max over positions, not the mean
CLAMP = 1.0  # W′ stays within W₀ ± this, elementwise (norm_constraint)
WEIGHT_DECAY = 1e-5
STOP_DELTA, STOP_LOSS = 1e-4, 0.02


@dataclass(frozen=True)
class WiseHParams:
    wise_mode: str = "retrieve"  # "retrieve" (WISE-Retrieve) or "merge" (WISE-Merge)
    wise_lr: float = 1.0
    wise_n_iter: int = 70
    wise_alpha: float = 5.0
    wise_beta: float = 20.0
    wise_gamma: float = 10.0
    wise_act_ratio: float = 0.88
    wise_mask_ratio: float = 0.2
    wise_save_freq: int = 500
    wise_merge_freq: int = 1000
    wise_density: float = 0.53  # TIES: the share of each shard's largest |entries| kept


def activation_scores(activations: torch.Tensor, weight: torch.Tensor, base: torch.Tensor, act,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """s(U) per sequence for activations [B, T, m], U = ``weight`` and W₀ = ``base`` (d×m); ``mask`` [B, T] marks
    the real tokens (all when None). Mean over the real positions; max when a sequence has more than 100."""
    distance = (act(activations @ weight.t()) - act(activations @ base.t())).norm(dim=-1)  # [B, T]
    if mask is None:
        mask = torch.ones(distance.shape, dtype=torch.bool, device=distance.device)
    mask = mask.bool()
    counts = mask.sum(dim=1).clamp(min=1)
    mean = (distance * mask).sum(dim=1) / counts
    longest = distance.masked_fill(~mask, float("-inf")).max(dim=1).values
    return torch.where(counts > LONG_SEQUENCE, longest, mean)


def positive_mean(values: torch.Tensor) -> torch.Tensor:
    """P(v): the mean of the positive entries (0 when none)."""
    positive = values > 0
    if not bool(positive.any()):
        return values.sum() * 0
    return values[positive].mean()


def ties_merge(base: torch.Tensor, shards: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES (magnitude pruning, sign election by the weighted sum, disjoint weighted mean), as the original's
    ``GTA('magnitude', 'sum', normalize=True)``: τ_s = W_s − W₀ keeps its top ``density`` share of |entries|;
    σ = sign(Σ w_s τ̃_s) (0 → +); τ = Σ w_s τ̃_s[sign τ̃_s = σ] / Σ w_s[sign τ̃_s = σ]; returns W₀ + τ."""
    trimmed = []
    for shard in shards:
        tau = (shard - base).to(torch.float64)
        keep = int(round(density * tau.numel()))
        if keep <= 0:
            trimmed.append(torch.zeros_like(tau))
            continue
        threshold = tau.abs().flatten().kthvalue(tau.numel() - keep + 1).values
        trimmed.append(torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)))
    weighted = sum(w * t for w, t in zip(weights, trimmed))
    sign = torch.where(weighted >= 0, 1.0, -1.0).to(torch.float64)
    numerator = torch.zeros_like(weighted)
    denominator = torch.zeros_like(weighted)
    for w, tau in zip(weights, trimmed):
        agrees = (torch.sign(tau) == sign) & (tau != 0)
        numerator += torch.where(agrees, w * tau, torch.zeros_like(tau))
        denominator += torch.where(agrees, torch.full_like(tau, w), torch.zeros_like(tau))
    tau = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-30), torch.zeros_like(numerator))
    return (base.to(torch.float64) + tau).to(base.dtype)


class WiseEditor:
    writes_weights = False  # the main matrix W₀ never changes in place; W_L, W′ and the shards are the state

    def __init__(self, editable: EditableModel, tokenizer, layers: list[int], hparams: WiseHParams, seed: int = 0):
        if len(layers) != 1:
            raise ValueError(f"WISE wraps exactly one layer, got {layers}")
        self.editable, self.tokenizer, self.layers, self.hparams = editable, tokenizer, list(layers), hparams
        self.module = editable.mlp_out(layers[0])
        from transformers.activations import ACT2FN  # the model's own activation function φ
        self.act = ACT2FN[getattr(editable.config, "hidden_act", None) or "silu"]
        self.base = editable.weight(layers[0]).detach().clone()  # W₀
        self.main = self.base.clone()  # W_L: what WISE-Merge merges into
        self.side = self.base.clone()  # W′
        self.generator = torch.Generator().manual_seed(seed)
        self.mask = torch.zeros_like(self.base, dtype=torch.bool)
        self.shards: list[torch.Tensor] = []
        self.shard_eps: list[float] = []
        self.memories: list[tuple[torch.Tensor, float]] = []  # Retrieve: (merged weight, its ε-statistic)
        self.recorded: list[float] = []  # mean Δ_e of each edit since the last reset (ε = act_ratio · min)
        self.edits = 0
        self.merges = 0
        self.routed = {"main": 0, "side": 0, "memory": 0, "base": 0}
        self._training = False
        self._mask_of_batch: torch.Tensor | None = None
        self._served: list[torch.Tensor] | None = None  # while served_rows runs: each forward's routing per row
        self.templates = context_templates(editable.model, tokenizer)
        self.irrelevant = greedy_continuations(editable.model, tokenizer, IRRELEVANT_STARTERS, 12)
        # routed by all of a sequence's tokens: evaluators must not split it at a cached prompt
        self._hooks = WholeSequenceHooks(editable.model, [
            editable.model.register_forward_pre_hook(self._remember_mask, with_kwargs=True),
            self.module.register_forward_hook(self._route)])

    # -- inference ---------------------------------------------------------------------------------------------
    def remove(self) -> None:
        self._hooks.remove()

    @torch.no_grad()
    def served_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Which rows of a (left-padded) batch are routed to a memory other than W₀ (W′, the merged W_L, or a
        retrieved memory) — one forward of the model; the routing counters of ``metrics`` are left as they were."""
        device = self.editable.parameter_device()
        routed, self._served = dict(self.routed), []
        try:
            self.editable.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                position_ids=positions_from_mask(attention_mask).to(device), use_cache=False)
            (served,) = self._served
        finally:
            self._served, self.routed = None, routed
        return served

    def _remember_mask(self, module, args, kwargs):
        self._mask_of_batch = kwargs.get("attention_mask")

    def _token_mask(self, activations: torch.Tensor) -> torch.Tensor | None:
        mask = self._mask_of_batch
        if mask is None or mask.dim() != 2 or mask.shape[0] != activations.shape[0]:
            return None
        return mask[:, -activations.shape[1]:].to(activations.device)  # cached decoding: the newest positions

    @property
    def threshold(self) -> float:
        return self.hparams.wise_act_ratio * min(self.recorded) if self.recorded else float("inf")

    def _route(self, module, args, output):
        activations = args[0]
        if self._training:  # every row through W′
            return activations @ self.side_param.t() + (module.bias if module.bias is not None else 0)
        if self.edits == 0:
            if self._served is not None:
                self._served.append(torch.zeros(activations.shape[0], dtype=torch.bool))
            return None
        mask = self._token_mask(activations)
        hp = self.hparams
        weights = [self.base, self.main, self.side, *(memory for memory, _ in self.memories)]  # indexed by choice
        with torch.no_grad():
            side = activation_scores(activations, self.side, self.base, self.act, mask)
            if hp.wise_mode == "merge":
                main = activation_scores(activations, self.main, self.base, self.act, mask)
                passes = (main >= self.threshold) | (side >= self.threshold)
                choice = torch.where(passes, torch.where(side > main, 2, 1), 0).cpu()  # 0 = W₀, 1 = W_L, 2 = W′
            else:
                best = side.clone()
                choice = torch.where(side >= self.threshold, 2, 0).cpu()
                for index, (memory, eps_stat) in enumerate(self.memories):  # top-1 over the stored memories
                    score = activation_scores(activations, memory, self.base, self.act, mask)
                    wins = (score > best) & (score > hp.wise_act_ratio * eps_stat)
                    best = torch.where(wins, score, best)
                    choice = torch.where(wins.cpu(), 3 + index, choice)
        if self._served is not None:
            self._served.append(choice != 0)
        if bool((choice == 0).all()):
            self.routed["base"] += activations.shape[0]
            return None
        out = output.clone()
        for row in range(activations.shape[0]):
            which = int(choice[row])
            name = ("base", "main", "side")[which] if which < 3 else "memory"
            self.routed[name] += 1
            if which:
                out[row] = activations[row] @ weights[which].t().to(activations.dtype)
                if module.bias is not None:
                    out[row] += module.bias
        return out

    # -- editing -----------------------------------------------------------------------------------------------
    def _rows(self, request: EditRequest):
        """The 11 in-scope rows and the irrelevant row: tokens, and (row, position, token) of every target token."""
        filled = request.filled_prompt
        texts = [template.format(filled) for template in self.templates]
        irrelevant = self.irrelevant[self.edits % len(self.irrelevant)]
        spans = [TextSpan(text=text + request.target_with_space, start=0, end=1, answer_start=len(text))
                 for text in texts]
        spans.append(TextSpan(text=irrelevant, start=0, end=1))
        batch = encode_spans(self.tokenizer, spans, padding_side="right")
        return (batch, *answer_positions(batch, len(texts)), len(texts))

    def _edit_one(self, request: EditRequest) -> float:
        hp = self.hparams
        if self.edits % hp.wise_save_freq == 0:  # a new shard: a new random mask
            # Drawn by the CPU generator (the same mask on any device), kept where the weights are.
            self.mask = (torch.rand(self.base.shape, generator=self.generator) < hp.wise_mask_ratio).to(self.base.device)
        device = self.editable.parameter_device()
        batch, rows, cols, tokens, n_scope = self._rows(request)
        batch, rows, cols, tokens = batch.to(device), rows.to(device), cols.to(device), tokens.to(device)
        captured = {}

        def grab(module, args):
            captured["a"] = args[0]

        grab_handle = self.module.register_forward_pre_hook(grab)
        self.side_param = torch.nn.Parameter(self.side.clone())
        optimizer = torch.optim.SGD([self.side_param], lr=hp.wise_lr, weight_decay=WEIGHT_DECAY)
        mask = self.mask.to(device)
        counts = torch.bincount(rows, minlength=n_scope).float()
        losses, delta_e = [], torch.zeros(n_scope)
        self._training = True
        # The blocks below the side memory cannot see it: each step runs only the blocks from it up.
        try:
            with replaying_below(self.editable.model, self.editable.blocks, self.layers[0], batch.model_inputs()):
                for _ in range(hp.wise_n_iter):
                    logits = logits_at(self.editable.model, batch.model_inputs(), rows, cols)
                    nll = F.cross_entropy(logits.float(), tokens, reduction="none")
                    per_row = torch.zeros(n_scope, device=nll.device).index_add(0, rows, nll) / (counts + 1)
                    loss_ft = per_row.mean()
                    scores = activation_scores(captured["a"], self.side_param, self.base, self.act,
                                               batch.attention_mask)
                    delta_e, delta_i = scores[:n_scope], scores[n_scope]
                    loss_act = (positive_mean(delta_i - delta_e + hp.wise_gamma) + F.relu(delta_i - hp.wise_alpha)
                                + positive_mean(hp.wise_beta - delta_e))
                    loss = loss_ft + loss_act
                    optimizer.zero_grad()
                    loss.backward()
                    self.side_param.grad *= mask
                    optimizer.step()
                    with torch.no_grad():
                        self.side_param.copy_(torch.clamp(self.side_param, self.base - CLAMP, self.base + CLAMP))
                    losses.append(float(loss.detach()))
                    if (len(losses) >= 2 and abs(losses[-1] - losses[-2]) <= STOP_DELTA
                            and losses[-1] <= STOP_LOSS):
                        break
        finally:
            self._training = False
            grab_handle.remove()
        self.side = self.side_param.detach().clone()
        del self.side_param
        self.recorded.append(float(delta_e.detach().mean()))
        self.edits += 1
        if self.edits % hp.wise_save_freq == 0:
            self._save_shard()
        if self.edits % hp.wise_merge_freq == 0:
            self._merge()
        return losses[-1]

    def _save_shard(self) -> None:
        self.shards.append(self.side.clone())
        self.shard_eps.append(min(self.recorded) if self.recorded else float("inf"))
        self.side = self.base.clone()
        if self.hparams.wise_mode == "retrieve":
            self.recorded = []

    def _merge(self) -> None:
        hp = self.hparams
        if hp.wise_mode == "merge":
            n = len(self.shards)
            if self.merges == 0:
                self.main = ties_merge(self.base, self.shards, [1.0 / n] * n, hp.wise_density)
            else:
                self.main = ties_merge(self.base, [*self.shards, self.main], [0.4 / n] * n + [0.6], hp.wise_density)
            self.shards, self.shard_eps = [], []
        else:
            count = hp.wise_merge_freq // hp.wise_save_freq
            recent, eps = self.shards[-count:], self.shard_eps[-count:]
            merged = ties_merge(self.base, recent, [1.0 / len(recent)] * len(recent), hp.wise_density)
            self.memories.append((merged, min(eps)))
            self.shards, self.shard_eps = self.shards[:-count], self.shard_eps[:-count]
        self.merges += 1

    def apply(self, requests: list[EditRequest]) -> BatchReport:
        start = time.perf_counter()
        losses = [self._edit_one(request) for request in requests]
        self._last = {"wise/edits": float(self.edits), "wise/threshold": self.threshold,
                      "wise/shards": float(len(self.shards)), "wise/memories": float(len(self.memories)),
                      "wise/merges": float(self.merges), "wise/final_loss_mean": sum(losses) / len(losses),
                      "wise/side_memory_norm": float((self.side - self.base).norm()),
                      "wise/main_memory_norm": float((self.main - self.base).norm())}
        seconds = time.perf_counter() - start
        return BatchReport(num_requests=len(requests), seconds=seconds, target_seconds=seconds, solve_seconds=0.0,
                           target_prob=[], target_steps=self.hparams.wise_n_iter)

    def metrics(self) -> dict[str, float]:
        out = dict(getattr(self, "_last", {}))
        served = sum(self.routed.values())
        if served:  # sequences routed since the previous batch's metrics (evaluations included)
            out.update({f"wise/routed_{name}_share": count / served for name, count in self.routed.items()})
        self.routed = dict.fromkeys(self.routed, 0)
        return out

    def state_dict(self) -> dict:
        return {"main": self.main.clone(), "side": self.side.clone(), "mask": self.mask.clone(),
                "shards": [s.clone() for s in self.shards], "shard_eps": list(self.shard_eps),
                "memories": [(m.clone(), e) for m, e in self.memories], "recorded": list(self.recorded),
                "edits": self.edits, "merges": self.merges, "generator": self.generator.get_state(),
                "routed": dict(self.routed)}

    def load_state_dict(self, state: dict) -> None:
        device = self.base.device  # checkpoints load on the CPU; the memories live beside the weights
        self.main, self.side = state["main"].to(device).clone(), state["side"].to(device).clone()
        self.mask = state["mask"].to(device).clone()
        self.shards = [s.to(device).clone() for s in state["shards"]]
        self.shard_eps = list(state["shard_eps"])
        self.memories = [(m.to(device).clone(), float(e)) for m, e in state["memories"]]
        self.recorded = list(state["recorded"])
        self.edits, self.merges = int(state["edits"]), int(state["merges"])
        self.routed = dict(state["routed"])  # the checkpoint's evaluation, reported with the next batch
        self.generator.set_state(state["generator"])
