"""Target values v* (ROME/MEMIT; docs/methods.md):
the representation at the edit site that makes the model say the target.

For each request j a vector δ_j (start 0) is added to the output of the *site* module (the last edited block for
MEMIT-style methods; the MLP of that layer for AdaEdit's FFN-only targets) at the subject's last token, in every
rewriting prompt ``context_template(prompt) + target[:-1]`` and in the KL prompt "{subject} is a". Loss per request:

    mean over its rewriting prompts of the mean target-token NLL
    + kl_factor · KL(p_initial ‖ p_now) on the KL prompt at the subject's last token
    + v_weight_decay · ‖δ_j‖ / ‖h_j‖²                  (‖δ‖ not squared, as in the reference code)

Adam on all δ_j together; requests are independent (each loss only depends on its own δ_j, and Adam is
element-wise). After each step ‖δ_j‖ ≤ clamp_norm_factor · ‖h_j‖. A request whose loss falls below
``early_stop_loss`` keeps its δ from then on. v*_j = h_j + δ_j, where h_j is the site output at the subject's last
token of the plain prompt.

Only what δ can change is computed, and only for the requests still optimising (the numbers equal the plain
full-prompt computation up to summation order; tests/test_editing_math.py checks it against one):
  * tokens before the subject's last token: run once, kept as a key/value cache;
  * blocks below the site: their output on the remaining tokens is recorded in the first pass and replayed
    (``_ReplayBlock``), since δ enters above them;
  * tokens whose outputs are never read: the last answer token of each rewriting prompt, and everything after
    the subject's last token of the KL prompt, are not fed at all;
  * requests whose δ is final leave the batch: their rows are not run again (per-request early stop);
  * rows run in chunks (``plan_chunks``), sorted by length so that little padding is run, each chunk's
    backward accumulating into δ's gradient: memory is bounded by ``v_chunk_tokens``, not by the batch size,
    and large batches run as few large products.

The KL direction follows the reference implementation (``kl_div(log p_now, log p_init, log_target=True)``), i.e.
KL(p_initial ‖ p_now).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.context import flatten_templates
from methods.infra.cpu_linear import OneDnnLinear
from methods.infra.hooks import CaptureSite, add_at_positions, capture
from methods.infra.kv_cache import fork_cache, with_cache
from methods.requests import EditRequest
from methods.infra.tokens import EncodedBatch, TextSpan, encode_spans

KL_PROMPT = "{} is a"


@dataclass(frozen=True)
class TargetHParams:
    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    early_stop_loss: float = 5e-2
    # How the optimisation runs (results change only by summation order): the rows of one forward/backward are
    # bounded by their padded prefix + fed tokens, so memory does not grow with the batch (plan_chunks).
    v_chunk_tokens: int = 1024
    # Opt-in: the steps' forward/backward under autocast in this dtype ("bfloat16", "float16"); "none" = the
    # weights' dtype. Changes results (h stays the model's own value), so it is a recorded hyper-parameter.
    v_autocast: str = "none"
    # Attention kernel during v* ("model" = the model's own; "eager"/"sdpa" switch it for the call and back). Same
    # numbers up to summation order; under bf16 autocast on CPU, eager attention avoids the slow bf16 backward of
    # the fused kernel (benchmarks/RESULTS.md).
    v_attention: str = "model"


@dataclass
class TargetResult:
    values: torch.Tensor  # [n, d] v* = h + δ
    initial: torch.Tensor  # [n, d] h
    target_prob: torch.Tensor  # [n] mean over rewriting prompts of exp(−mean target NLL), at the final δ
    final_loss: torch.Tensor  # [n]
    steps: int  # optimisation passes of the longest-running request
    request_steps: torch.Tensor | None = None  # [n] passes each request took before its δ was final
    chunks: int = 1  # forward/backward groups the rows were split into at the first step
    fed_tokens: int = 0  # token slots (padding included) run through the blocks above the site, all steps together


HEAD_CHUNK_ROWS = 2048  # vocabulary rows of the output head per product (see _head_logits)


def _head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` for a handful of rows, computed in vocabulary chunks when the head is a plain ``nn.Linear``.

    With the few rows v* reads (7 at batch 1) one product against the whole vocab × d weight hits a slow BLAS
    path on CPU: 32 ms forward + 25 ms backward for SmolLM2 here, against 12 + 12 ms in 2048-row chunks (never
    slower from 1 to 112 rows). Autograd sums the chunks' input gradients, so the backward is chunked too.
    A head that oneDNN computes at this row count (methods/infra/cpu_linear.py) needs no chunks: its forward on 7 rows
    took 7.9 ms, 4.7 ms with packed weights.
    """
    if not isinstance(head, torch.nn.Linear) or (isinstance(head, OneDnnLinear) and head.takes_over(hidden)):
        return head(hidden)
    weight, bias = head.weight, head.bias
    return torch.cat([F.linear(hidden, weight[start:start + HEAD_CHUNK_ROWS],
                               None if bias is None else bias[start:start + HEAD_CHUNK_ROWS])
                      for start in range(0, weight.shape[0], HEAD_CHUNK_ROWS)], dim=-1)


def final_hidden_to_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = _head_logits(model.get_output_embeddings(), hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # e.g. Gemma-2 caps its logits; keep the distribution identical to the model's own forward
        logits = torch.tanh(logits / cap) * cap
    return logits


def logits_at(model, inputs: dict, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The model's logits at positions (rows[j], cols[j]) only: the output head (49,152 × 576 on SmolLM2, the
    largest product of a short sequence) runs on the positions a loss reads instead of on every token."""
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    return final_hidden_to_logits(model, hidden[rows, cols])


def build_target_batch(tokenizer, requests: list[EditRequest], context_groups: list[list[str]]):
    """Rows: every (request, context template) rewriting prompt with the target appended, then one KL prompt per
    request. Returns the batch, the owning request of each row, and the number of rewriting rows."""
    templates, _ = flatten_templates(context_groups)
    spans, owners = [], []
    for j, req in enumerate(requests):
        for template in templates:
            prompt_template = template.replace("{}", req.prompt, 1)
            at = prompt_template.find("{}")
            filled = prompt_template.replace("{}", req.subject, 1)
            spans.append(TextSpan(text=filled + req.target_with_space, start=at, end=at + len(req.subject),
                                  answer_start=len(filled)))
            owners.append(j)
    num_rewrite = len(spans)
    at = KL_PROMPT.find("{}")
    for j, req in enumerate(requests):
        spans.append(TextSpan(text=KL_PROMPT.replace("{}", req.subject, 1), start=at, end=at + len(req.subject)))
        owners.append(j)
    # The whole target is encoded so that its tokens are known as labels; only ``target[:-1]`` is fed.
    return encode_spans(tokenizer, spans), torch.tensor(owners), num_rewrite


@dataclass(frozen=True)
class _Row:
    """One prompt of the v* batch, split at the subject's last token: ``prefix`` (everything before it; nothing
    there depends on δ, so it runs once and is kept as a key/value cache) and ``fed`` (from the subject's last
    token on; re-run at every step). ``labels`` are (column of ``fed`` whose output predicts it, answer token)."""

    owner: int
    prefix: torch.Tensor
    fed: torch.Tensor
    labels: tuple[tuple[int, int], ...]
    is_kl: bool


def _target_rows(batch, owners: torch.Tensor, num_rewrite: int) -> list[_Row]:
    rows = []
    for r in range(batch.input_ids.shape[0]):
        real = batch.input_ids[r][batch.attention_mask[r].bool()]
        start = int(batch.attention_mask[r].argmax()) if batch.attention_mask[r, 0] == 0 else 0
        subject = int(batch.span_last[r]) - start
        if r < num_rewrite:  # the last answer token is only ever a label: its own output is never read
            suffix = real[subject:]
            answer = int(batch.answer_first[r]) - start - subject
            labels = tuple((col - 1, int(suffix[col])) for col in range(answer, len(suffix)))
            rows.append(_Row(int(owners[r]), real[:subject], suffix[:-1], labels, is_kl=False))
        else:  # KL prompt: only the subject's last token's output is read
            rows.append(_Row(int(owners[r]), real[:subject], real[subject:subject + 1], (), is_kl=True))
    return rows


def plan_chunks(prefix_lengths: list[int], fed_lengths: list[int], chunk_tokens: int) -> list[list[int]]:
    """Rows grouped for one forward/backward each: sorted by (fed, prefix) length so that little padding is run,
    then cut wherever ``rows × (longest prefix + longest fed part)`` would exceed ``chunk_tokens`` — the bound on
    the activations one backward holds, whatever the batch size. A row longer than the budget is a chunk alone."""
    order = sorted(range(len(fed_lengths)), key=lambda r: (fed_lengths[r], prefix_lengths[r], r))
    chunks: list[list[int]] = []
    current: list[int] = []
    widest_prefix = widest_fed = 0
    for r in order:
        prefix, fed = max(widest_prefix, prefix_lengths[r]), max(widest_fed, fed_lengths[r])
        if current and (len(current) + 1) * (prefix + fed) > chunk_tokens:
            chunks.append(current)
            current, prefix, fed = [], prefix_lengths[r], fed_lengths[r]
        current.append(r)
        widest_prefix, widest_fed = prefix, fed
    if current:
        chunks.append(current)
    return chunks


@dataclass
class _Chunk:
    """Rows run together: a left-padded prefix and a right-padded fed part, plus what the first, δ-free pass
    left behind for them (the prefix cache, the replayed block's output, the initial KL distributions)."""

    owners: torch.Tensor  # [B] request of each row
    prefix_ids: torch.Tensor  # [B, P]
    fed_ids: torch.Tensor  # [B, U]
    attention_mask: torch.Tensor  # [B, P+U]
    position_ids: torch.Tensor  # [B, P+U]
    label_rows: torch.Tensor  # per answer token: local row, column predicting it, token id
    label_cols: torch.Tensor
    label_tokens: torch.Tensor
    rewrite_rows: torch.Tensor  # local rows of rewriting prompts
    kl_rows: torch.Tensor  # local rows of KL prompts
    cache: object = None  # the prefix's key/value cache (None without a prefix)
    replayed: object = None  # the last replayed block's output on the fed tokens (None: nothing replayed)
    kl_initial: torch.Tensor | None = None  # [len(kl_rows), V] log p at the KL position before any step

    @property
    def prefix_len(self) -> int:
        return self.prefix_ids.shape[1]

    @classmethod
    def pack(cls, rows: list[_Row], pad_id: int, device) -> "_Chunk":
        n = len(rows)
        width_prefix = max(len(row.prefix) for row in rows)
        width_fed = max(len(row.fed) for row in rows)
        prefix_ids = torch.full((n, width_prefix), pad_id, dtype=torch.long)
        fed_ids = torch.full((n, width_fed), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width_prefix + width_fed), dtype=torch.long)
        label_rows, label_cols, label_tokens = [], [], []
        for r, row in enumerate(rows):
            if len(row.prefix):
                prefix_ids[r, width_prefix - len(row.prefix):] = row.prefix
                mask[r, width_prefix - len(row.prefix):width_prefix] = 1
            fed_ids[r, :len(row.fed)] = row.fed
            mask[r, width_prefix:width_prefix + len(row.fed)] = 1
            for col, token in row.labels:
                label_rows.append(r)
                label_cols.append(col)
                label_tokens.append(token)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        kl = [r for r, row in enumerate(rows) if row.is_kl]
        rewrite = [r for r, row in enumerate(rows) if not row.is_kl]
        as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return cls(owners=as_long([row.owner for row in rows]), prefix_ids=prefix_ids.to(device),
                   fed_ids=fed_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   label_rows=as_long(label_rows), label_cols=as_long(label_cols), label_tokens=as_long(label_tokens),
                   rewrite_rows=as_long(rewrite), kl_rows=as_long(kl))

    def select(self, keep: torch.Tensor) -> "_Chunk | None":
        """The chunk without the rows where ``keep`` is False (requests whose δ is final), or None if none stay.
        Only the batch dimension shrinks: the prefix cache keeps its length (cache layers count their tokens)."""
        if bool(keep.all()):
            return self
        index = keep.nonzero().squeeze(1)
        if index.numel() == 0:
            return None
        local = torch.full_like(keep, -1, dtype=torch.long)
        local[index] = torch.arange(index.numel(), device=index.device)
        kept_labels = keep[self.label_rows]
        kept_kl = keep[self.kl_rows]
        return _Chunk(owners=self.owners[index], prefix_ids=self.prefix_ids[index], fed_ids=self.fed_ids[index],
                      attention_mask=self.attention_mask[index], position_ids=self.position_ids[index],
                      label_rows=local[self.label_rows[kept_labels]], label_cols=self.label_cols[kept_labels],
                      label_tokens=self.label_tokens[kept_labels],
                      rewrite_rows=local[self.rewrite_rows[keep[self.rewrite_rows]]],
                      kl_rows=local[self.kl_rows[kept_kl]],
                      cache=None if self.cache is None else fork_cache(self.cache, index),
                      replayed=None if self.replayed is None else _select_rows(self.replayed, index),
                      kl_initial=None if self.kl_initial is None else self.kl_initial[kept_kl])


def _select_rows(output, index: torch.Tensor):
    if isinstance(output, tuple):
        return tuple(_select_rows(item, index) for item in output)
    if isinstance(output, torch.Tensor) and output.dim() >= 1:
        return output[index]
    return output


class _ReplayBlock(torch.nn.Module):
    """Stands in for a transformer block during the optimisation: returns the output the last replayed block gave
    in the first, δ-free pass over the same tokens (the input of the blocks up to the site cannot depend on δ,
    which enters above them; the model's layer loop only hands each block's output to the next one). Attributes
    the loop reads from its blocks (e.g. ``attention_type``) are looked up on the real block."""

    def __init__(self, block: torch.nn.Module, output):
        super().__init__()
        object.__setattr__(self, "block", block)  # not registered: the replay owns no parameters
        self.recorded = output

    def forward(self, *args, **kwargs):
        return self.recorded

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "block"), name)


def detached_output(output):
    if isinstance(output, tuple):
        return tuple(item.detach() if isinstance(item, torch.Tensor) else item for item in output)
    return output.detach()


@contextlib.contextmanager
def replaying(blocks: torch.nn.ModuleList, last: int, output):
    """While active, blocks[0..last] are ``_ReplayBlock``s returning ``output`` (block ``last``'s recorded output)."""
    originals = {i: blocks[i] for i in range(last + 1)}
    try:
        for i, block in originals.items():
            blocks[i] = _ReplayBlock(block, output)
        yield blocks[last]
    finally:
        for i, block in originals.items():
            blocks[i] = block


@contextlib.contextmanager
def replaying_below(model, blocks: torch.nn.ModuleList, layer: int, inputs: dict):
    """While active, the blocks below ``layer`` return the output they give on ``inputs`` (recorded now, in one
    forward pass without gradients) instead of recomputing it: for a memory that sits at ``layer`` and is trained
    on the same tokens for many steps, each step then runs only the blocks from ``layer`` up (GRACE, WISE).
    Nothing is replayed for layer 0."""
    if layer == 0:
        yield
        return
    recorded = {}

    def keep(module, args, output):
        recorded["output"] = detached_output(output)

    handle = blocks[layer - 1].register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    with replaying(blocks, layer - 1, recorded["output"]):
        yield


AUTOCAST_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION_CHOICES = ("model", "eager", "sdpa")


@contextlib.contextmanager
def _attention_implementation(model, name: str):
    """While active, the model's attention runs on implementation ``name`` ("model": as it is)."""
    before = getattr(model.config, "_attn_implementation", None)
    if name == "model" or name == before:
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"v_attention {name!r} needs a transformers version whose models have "
                         "set_attn_implementation; use v_attention: model")
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _autocast(device: torch.device, name: str):
    dtype = AUTOCAST_DTYPES[name]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _run_fed(base, chunk: _Chunk) -> torch.Tensor:
    """Final hidden states [B, U, d] of the chunk's fed tokens, attending to the cached prefix."""
    step_cache = fork_cache(chunk.cache) if chunk.cache is not None else None
    return base(input_ids=chunk.fed_ids, attention_mask=chunk.attention_mask,
                position_ids=chunk.position_ids[:, chunk.prefix_len:], **with_cache(base, step_cache)
                ).last_hidden_state


def compute_target_values(model, tokenizer, site_module: torch.nn.Module, requests: list[EditRequest],
                          context_groups: list[list[str]], hp: TargetHParams,
                          blocks: torch.nn.ModuleList | None = None, site_layer: int | None = None) -> TargetResult:
    """Optimise δ for all ``requests`` together; ``site_module``'s output is where δ is added.

    With ``blocks`` (the model's transformer blocks) and ``site_layer`` (the index of the block that is or holds
    ``site_module``), the blocks below the site — and the site block itself when it is the site — are run once
    and replayed at every step. Without them every step runs every block (same numbers, slower).
    """
    if hp.v_autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"v_autocast must be one of {sorted(AUTOCAST_DTYPES)}, got {hp.v_autocast!r}")
    if hp.v_attention not in ATTENTION_CHOICES:
        raise ValueError(f"v_attention must be one of {list(ATTENTION_CHOICES)}, got {hp.v_attention!r}")
    with _attention_implementation(model, hp.v_attention):
        return _optimise_targets(model, tokenizer, site_module, requests, context_groups, hp, blocks, site_layer)


def _optimise_targets(model, tokenizer, site_module, requests, context_groups, hp: TargetHParams, blocks,
                      site_layer) -> TargetResult:
    device = next(model.parameters()).device
    full, owners, num_rewrite = build_target_batch(tokenizer, requests, context_groups)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = _target_rows(full, owners, num_rewrite)
    n = len(requests)
    rows_per_request = torch.bincount(owners[:num_rewrite], minlength=n).to(torch.float32).to(device)
    # The first rewriting row of each request uses the plain "{}" template: its subject position gives h_j.
    plain_rows = [int((owners[:num_rewrite] == j).nonzero()[0]) for j in range(n)]
    groups = plan_chunks([len(row.prefix) for row in rows], [len(row.fed) for row in rows], hp.v_chunk_tokens)
    chunks = [_Chunk.pack([rows[r] for r in group], pad_id, device) for group in groups]

    replay_last = None  # index of the highest block whose output is recorded and replayed
    if blocks is not None:
        if site_layer is None or not 0 <= site_layer < len(blocks):
            raise ValueError(f"site_layer must index the {len(blocks)} blocks, got {site_layer!r}")
        replay_last = site_layer if blocks[site_layer] is site_module else site_layer - 1
        if replay_last < 0:
            replay_last = None

    base = model.base_model  # final hidden states only; logits are computed just where they are needed
    lowered = _autocast(device, hp.v_autocast)
    site_outputs = [_first_pass(model, base, chunk, site_module, blocks, replay_last, lowered) for chunk in chunks]
    if AUTOCAST_DTYPES[hp.v_autocast] is None:
        where = torch.tensor([r for group in groups for r in group], device=device).argsort()
        initial = torch.cat(site_outputs)[where][plain_rows]
    else:  # h must be the model's own value (v* = h + δ feeds the solve): one plain pass in the weights' dtype
        initial = _plain_site_outputs(model, tokenizer, [rows[r] for r in plain_rows], site_module, pad_id, device)
    del site_outputs

    delta = torch.zeros_like(initial, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * initial.norm(dim=1)
    init_norm_sq = initial.norm(dim=1) ** 2
    frozen = torch.zeros(n, dtype=torch.bool, device=device)
    frozen_delta = torch.zeros_like(initial)
    final_loss = torch.full((n,), float("nan"), device=device)
    final_prob = torch.zeros(n, device=device)
    request_steps = torch.zeros(n, dtype=torch.long, device=device)
    steps = fed_tokens = 0
    for step in range(hp.v_num_grad_steps):
        steps = step + 1
        last_step = step == hp.v_num_grad_steps - 1
        # One chunk: decide who is done before any backward (nothing is computed for nothing). Several: each
        # chunk's graph is freed by its own backward, at the price of one unused backward per finishing request.
        keep_graph = len(chunks) == 1
        optimizer.zero_grad()
        nll, kl, prob = (torch.zeros(n, device=device) for _ in range(3))
        pending = None
        for chunk in chunks:
            fed_tokens += chunk.fed_ids.numel()
            with torch.set_grad_enabled(not last_step):
                part_nll, part_kl, part_prob = _chunk_loss(model, base, chunk, delta, site_module, blocks,
                                                           replay_last, rows_per_request, lowered)
                chunk_loss = (part_nll + hp.kl_factor * part_kl).sum()
            if not last_step:
                if keep_graph:
                    pending = chunk_loss
                else:
                    chunk_loss.backward()
            nll += part_nll.detach()
            kl += part_kl.detach()
            prob += part_prob
        decay = hp.v_weight_decay * delta.norm(dim=1) / init_norm_sq
        with torch.no_grad():
            loss = nll + hp.kl_factor * kl + decay
            live = ~frozen
            request_steps[live] += 1
            final_loss[live] = loss[live]
            final_prob[live] = prob[live]
            newly_done = live & (loss < hp.early_stop_loss)
            frozen_delta[newly_done] = delta[newly_done]
            frozen |= newly_done
        if bool(frozen.all()) or last_step:
            break
        (decay.sum() + pending if pending is not None else decay.sum()).backward()
        optimizer.step()
        with torch.no_grad():
            norms = delta.norm(dim=1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
            delta.mul_(scale[:, None])
        if bool(newly_done.any()):  # finished requests leave the batch: their rows are not run again
            chunks = [kept for kept in (chunk.select(~frozen[chunk.owners]) for chunk in chunks) if kept is not None]
    with torch.no_grad():
        values = initial + torch.where(frozen[:, None], frozen_delta, delta)
    return TargetResult(values=values.detach(), initial=initial, target_prob=final_prob.detach().cpu(),
                        final_loss=final_loss.detach().cpu(), steps=steps, request_steps=request_steps.cpu(),
                        chunks=len(groups), fed_tokens=fed_tokens)


def _first_pass(model, base, chunk: _Chunk, site_module, blocks, replay_last: int | None, lowered) -> torch.Tensor:
    """The δ-free pass: fills the chunk's prefix cache, its replayed output and its KL rows' initial distributions;
    returns the site's output at each row's subject position [B, d]."""
    captured = {}

    def capture_site(module, inputs, output):
        captured["site"] = (output[0] if isinstance(output, tuple) else output)[:, 0].detach().float()

    def record(module, inputs, output):
        captured["replayed"] = detached_output(output)

    handles = [site_module.register_forward_hook(capture_site)]
    if replay_last is not None:
        handles.append(blocks[replay_last].register_forward_hook(record))
    try:
        with torch.no_grad(), lowered:
            if chunk.prefix_len:
                from transformers import DynamicCache

                chunk.cache = DynamicCache()
                base(input_ids=chunk.prefix_ids, attention_mask=chunk.attention_mask[:, :chunk.prefix_len],
                     position_ids=chunk.position_ids[:, :chunk.prefix_len], **with_cache(base, chunk.cache))
            hidden = _run_fed(base, chunk)
            chunk.kl_initial = F.log_softmax(final_hidden_to_logits(model, hidden[chunk.kl_rows, 0]).float(), dim=-1)
    finally:
        for handle in handles:
            handle.remove()
    chunk.replayed = captured.get("replayed")
    return captured["site"]


def _plain_site_outputs(model, tokenizer, plain: list[_Row], site_module, pad_id: int, device) -> torch.Tensor:
    """h [n, d]: the site's output at the subject's last token of each plain prompt, in the weights' own dtype."""
    chunk = _Chunk.pack([_Row(row.owner, row.prefix, row.fed[:1], (), is_kl=True) for row in plain], pad_id, device)
    ids = torch.cat([chunk.prefix_ids, chunk.fed_ids], dim=1)
    last = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=device)
    batch = EncodedBatch(input_ids=ids, attention_mask=chunk.attention_mask, position_ids=chunk.position_ids,
                         span_last=last, answer_first=torch.full_like(last, -1),
                         lengths=chunk.attention_mask.sum(dim=1))
    rows = torch.arange(ids.shape[0], device=device)
    (outputs,) = capture(model, batch, [CaptureSite(site_module, "output")], rows, last)
    return outputs.float()


def _chunk_loss(model, base, chunk: _Chunk, delta: torch.Tensor, site_module, blocks, replay_last: int | None,
                rows_per_request: torch.Tensor, lowered):
    """This chunk's share of every request's loss terms, as [n] tensors: mean target NLL over the request's
    rewriting prompts, KL(p_initial ‖ p_now) at its KL prompt, and (detached) mean target probability."""
    n = delta.shape[0]
    with contextlib.ExitStack() as stack:
        # δ goes onto the site's output; when the site block itself is replayed, onto its stand-in's.
        site_now = site_module
        if replay_last is not None:
            stand_in = stack.enter_context(replaying(blocks, replay_last, chunk.replayed))
            if stand_in.block is site_module:
                site_now = stand_in
        rows = torch.arange(chunk.owners.shape[0], device=delta.device)
        stack.enter_context(add_at_positions(site_now, rows, torch.zeros_like(rows), lambda: delta[chunk.owners]))
        stack.enter_context(lowered)
        hidden = _run_fed(base, chunk)
        # Answer positions and KL positions through the output head together: one pass over its vocab × d weight
        # per direction instead of two.
        read_rows = torch.cat([chunk.label_rows, chunk.kl_rows])
        read_cols = torch.cat([chunk.label_cols, torch.zeros_like(chunk.kl_rows)])
        logits = final_hidden_to_logits(model, hidden[read_rows, read_cols])
    log_probs = F.log_softmax(logits.float(), dim=-1)
    num_labels = chunk.label_rows.shape[0]
    token_logp = log_probs[:num_labels].gather(1, chunk.label_tokens[:, None]).squeeze(1)
    rows_count = chunk.owners.shape[0]
    tokens_per_row = torch.bincount(chunk.label_rows, minlength=rows_count).clamp(min=1).to(log_probs.dtype)
    row_nll = -torch.zeros(rows_count, device=delta.device).index_add(0, chunk.label_rows, token_logp) / tokens_per_row
    rewrite_owners = chunk.owners[chunk.rewrite_rows]
    weights = rows_per_request[rewrite_owners]
    nll = torch.zeros(n, device=delta.device).index_add(0, rewrite_owners, row_nll[chunk.rewrite_rows] / weights)
    kl_now = log_probs[num_labels:]
    kl_rows = (chunk.kl_initial.exp() * (chunk.kl_initial - kl_now)).sum(dim=-1)
    kl = torch.zeros(n, device=delta.device).index_add(0, chunk.owners[chunk.kl_rows], kl_rows)
    with torch.no_grad():
        prob = torch.zeros(n, device=delta.device).index_add(0, rewrite_owners,
                                                             torch.exp(-row_nll[chunk.rewrite_rows]) / weights)
    return nll, kl, prob
