"""Target values v* (ALGORITHMS.md §1): the representation at the edit site that makes the model say the target.

For each request j a vector δ_j (start 0) is added to the output of the *site* module (the last edited block for
MEMIT-style methods; the MLP of that layer for AdaEdit's FFN-only targets) at the subject's last token, in every
rewriting prompt ``context_template(prompt) + target[:-1]`` and in the KL prompt "{subject} is a". Loss per request:

    mean over its rewriting prompts of the mean target-token NLL
    + kl_factor · KL(p_initial ‖ p_now) on the KL prompt at the subject's last token
    + v_weight_decay · ‖δ_j‖ / ‖h_j‖²                  (‖δ‖ not squared, as in the reference code)

Adam on all δ_j together (one padded forward/backward per step for the whole batch; requests are independent
because each loss only depends on its own δ_j). After each step ‖δ_j‖ ≤ clamp_norm_factor · ‖h_j‖. A request whose
loss falls below ``early_stop_loss`` keeps its δ from then on. v*_j = h_j + δ_j, where h_j is the site output at
the subject's last token of the plain prompt.

Only what δ can change is recomputed at each optimisation step (the numbers equal the plain full-prompt
computation; tests/test_editing_math.py checks it against one):
  * tokens before the subject's last token: run once, kept as a key/value cache (``_split_batch``);
  * blocks below the site: their outputs on the remaining tokens are recorded in the first pass and replayed
    (``_ReplayBlock``), since δ enters above them;
  * tokens whose outputs are never read: the last answer token of each rewriting prompt, and everything after
    the subject's last token of the KL prompt, are not fed at all.

The KL direction follows the reference implementation (``kl_div(log p_now, log p_init, log_target=True)``), i.e.
KL(p_initial ‖ p_now).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.context import flatten_templates
from methods.cpu_linear import OneDnnLinear
from methods.hooks import add_at_positions
from methods.requests import EditRequest
from methods.tokens import TextSpan, encode_spans

KL_PROMPT = "{} is a"


@dataclass(frozen=True)
class TargetHParams:
    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    early_stop_loss: float = 5e-2


@dataclass
class TargetResult:
    values: torch.Tensor  # [n, d] v* = h + δ
    initial: torch.Tensor  # [n, d] h
    target_prob: torch.Tensor  # [n] mean over rewriting prompts of exp(−mean target NLL), at the final δ
    final_loss: torch.Tensor  # [n]
    steps: int


HEAD_CHUNK_ROWS = 2048  # vocabulary rows of the output head per product (see _head_logits)


def _head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` for a handful of rows, computed in vocabulary chunks when the head is a plain ``nn.Linear``.

    With the few rows v* reads (7 at batch 1) one product against the whole vocab × d weight hits a slow BLAS
    path on CPU: 32 ms forward + 25 ms backward for SmolLM2 here, against 12 + 12 ms in 2048-row chunks (never
    slower from 1 to 112 rows). Autograd sums the chunks' input gradients, so the backward is chunked too.
    A head that oneDNN computes at this row count (methods/cpu_linear.py) needs no chunks: its forward on 7 rows
    took 7.9 ms, 4.7 ms with packed weights.
    """
    if not isinstance(head, torch.nn.Linear) or (isinstance(head, OneDnnLinear) and head.takes_over(hidden)):
        return head(hidden)
    weight, bias = head.weight, head.bias
    return torch.cat([F.linear(hidden, weight[start:start + HEAD_CHUNK_ROWS],
                               None if bias is None else bias[start:start + HEAD_CHUNK_ROWS])
                      for start in range(0, weight.shape[0], HEAD_CHUNK_ROWS)], dim=-1)


def _final_hidden_to_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = _head_logits(model.get_output_embeddings(), hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # e.g. Gemma-2 caps its logits; keep the distribution identical to the model's own forward
        logits = torch.tanh(logits / cap) * cap
    return logits


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
    # The whole target is encoded so that its tokens are known as labels; ``_split_batch`` feeds ``target[:-1]``.
    return encode_spans(tokenizer, spans), torch.tensor(owners), num_rewrite


@dataclass
class _SplitBatch:
    """Rows split at the subject's last token: a left-padded prefix (run once, cached) and a right-padded suffix
    (re-run every optimisation step). Nothing before the subject's last token depends on δ, so only the suffix
    needs recomputing — typically 3–6 of ~20 tokens."""

    prefix_ids: torch.Tensor  # [B, S]
    suffix_ids: torch.Tensor  # [B, U]
    attention_mask: torch.Tensor  # [B, S+U]
    position_ids: torch.Tensor  # [B, S+U]
    label_rows: torch.Tensor  # answer tokens: row, suffix column predicting it, token id
    label_cols: torch.Tensor
    label_tokens: torch.Tensor

    @property
    def prefix_len(self) -> int:
        return self.prefix_ids.shape[1]


def _split_batch(batch, num_rewrite: int, pad_id: int) -> _SplitBatch:
    rows = []
    for r in range(batch.input_ids.shape[0]):
        real = batch.input_ids[r][batch.attention_mask[r].bool()]
        start = int(batch.attention_mask[r].argmax()) if batch.attention_mask[r, 0] == 0 else 0
        subject = int(batch.span_last[r]) - start
        if r < num_rewrite:  # the last answer token is only ever a label: its own output is never read
            answer = int(batch.answer_first[r]) - start
            rows.append((real[:subject], real[subject:], answer - subject))
        else:  # KL prompt: only the subject's last token's output is read
            rows.append((real[:subject], real[subject:subject + 1], -1))
    width_prefix = max(len(p) for p, _, _ in rows)
    width_suffix = max(len(s) - (1 if r < num_rewrite else 0) for r, (_, s, _) in enumerate(rows))
    n = len(rows)
    prefix_ids = torch.full((n, width_prefix), pad_id, dtype=torch.long)
    suffix_ids = torch.full((n, width_suffix), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width_prefix + width_suffix), dtype=torch.long)
    label_rows, label_cols, label_tokens = [], [], []
    for r, (prefix, suffix, answer_col) in enumerate(rows):
        if len(prefix):
            prefix_ids[r, width_prefix - len(prefix):] = prefix
            mask[r, width_prefix - len(prefix):width_prefix] = 1
        fed = suffix[:-1] if r < num_rewrite else suffix
        suffix_ids[r, :len(fed)] = fed
        mask[r, width_prefix:width_prefix + len(fed)] = 1
        if r < num_rewrite:
            for col in range(answer_col, len(suffix)):
                label_rows.append(r)
                label_cols.append(col - 1)
                label_tokens.append(int(suffix[col]))
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return _SplitBatch(prefix_ids, suffix_ids, mask, positions, torch.tensor(label_rows),
                       torch.tensor(label_cols), torch.tensor(label_tokens))


class _ReplayBlock(torch.nn.Module):
    """Stands in for a transformer block during the optimisation: returns the output the real block gave in the
    first, δ-free pass over the same tokens (its input cannot depend on δ, which enters above it). Attributes the
    model's layer loop reads from its blocks (e.g. ``attention_type``) are looked up on the real block."""

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


def _detached(output):
    if isinstance(output, tuple):
        return tuple(item.detach() if isinstance(item, torch.Tensor) else item for item in output)
    return output.detach()


@contextlib.contextmanager
def _replaying(blocks: torch.nn.ModuleList, outputs: dict[int, object]):
    """While active, blocks[i] for each recorded i is a ``_ReplayBlock`` of its recorded output."""
    originals = {i: blocks[i] for i in outputs}
    try:
        for i, output in outputs.items():
            blocks[i] = _ReplayBlock(originals[i], output)
        yield {i: blocks[i] for i in outputs}
    finally:
        for i, block in originals.items():
            blocks[i] = block


def compute_target_values(model, tokenizer, site_module: torch.nn.Module, requests: list[EditRequest],
                          context_groups: list[list[str]], hp: TargetHParams,
                          blocks: torch.nn.ModuleList | None = None, site_layer: int | None = None) -> TargetResult:
    """Optimise δ for all ``requests`` together; ``site_module``'s output is where δ is added.

    With ``blocks`` (the model's transformer blocks) and ``site_layer`` (the index of the block that is or holds
    ``site_module``), the blocks below the site — and the site block itself when it is the site — are run once
    and replayed at every step. Without them every step runs every block (same numbers, slower).
    """
    device = next(model.parameters()).device
    full, owners, num_rewrite = build_target_batch(tokenizer, requests, context_groups)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    split = _split_batch(full, num_rewrite, pad_id)
    owners = owners.to(device)
    label_rows, label_cols, label_tok = (t.to(device) for t in (split.label_rows, split.label_cols,
                                                                split.label_tokens))
    n, num_rows = len(requests), split.suffix_ids.shape[0]
    all_rows = torch.arange(num_rows, device=device)
    subject_col = torch.zeros(num_rows, dtype=torch.long, device=device)  # suffixes start at the subject token
    kl_rows = torch.arange(num_rewrite, num_rows, device=device)
    read_rows = torch.cat([label_rows, kl_rows])  # the positions whose output distribution the loss reads
    read_cols = torch.cat([label_cols, torch.zeros_like(kl_rows)])
    tokens_per_row = torch.bincount(label_rows, minlength=num_rewrite).clamp(min=1).to(torch.float32)
    rows_per_request = torch.bincount(owners[:num_rewrite], minlength=n).to(torch.float32)
    # The first rewriting row of each request uses the plain "{}" template: its subject position gives h_j.
    plain_rows = torch.tensor([int((owners[:num_rewrite] == j).nonzero()[0]) for j in range(n)], device=device)

    base = model.base_model  # final hidden states only; logits are computed just where they are needed
    mask = split.attention_mask.to(device)
    positions = split.position_ids.to(device)
    prefix_len = split.prefix_len
    cache = None
    if prefix_len:
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.no_grad():
            base(input_ids=split.prefix_ids.to(device), attention_mask=mask[:, :prefix_len],
                 position_ids=positions[:, :prefix_len], past_key_values=cache, use_cache=True)
    suffix_ids = split.suffix_ids.to(device)

    def run_suffix() -> torch.Tensor:
        # A fresh copy of the prefix cache each step: the forward appends the suffix's keys/values (which carry
        # δ's autograd graph) to whatever cache it is given. The copy is small (prefix keys/values only).
        step_cache = copy.deepcopy(cache) if cache is not None else None
        return base(input_ids=suffix_ids, attention_mask=mask, position_ids=positions[:, prefix_len:],
                    past_key_values=step_cache, use_cache=step_cache is not None).last_hidden_state

    captured = {}

    def capture_h(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured["h"] = hidden[plain_rows, 0].detach().clone()

    replayed = {}  # block index -> its output on the suffix tokens, from this first pass
    if blocks is not None:
        if site_layer is None or not 0 <= site_layer < len(blocks):
            raise ValueError(f"site_layer must index the {len(blocks)} blocks, got {site_layer!r}")
        last_replayed = site_layer if blocks[site_layer] is site_module else site_layer - 1

        def recorder(index):
            def hook(module, inputs, output):
                replayed[index] = _detached(output)
            return hook

        handles = [blocks[i].register_forward_hook(recorder(i)) for i in range(last_replayed + 1)]
    else:
        handles = []
    handles.append(site_module.register_forward_hook(capture_h))
    try:
        with torch.no_grad():
            hidden = run_suffix()
    finally:
        for handle in handles:
            handle.remove()
    initial = captured["h"].float()
    kl_initial = F.log_softmax(_final_hidden_to_logits(model, hidden[kl_rows, 0]).float(), dim=-1)
    del hidden

    delta = torch.zeros_like(initial, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * initial.norm(dim=1)
    init_norm_sq = initial.norm(dim=1) ** 2
    frozen = torch.zeros(n, dtype=torch.bool, device=device)
    frozen_delta = torch.zeros_like(initial)
    final_loss = torch.full((n,), float("nan"), device=device)
    final_prob = torch.zeros(n, device=device)
    steps = 0
    with contextlib.ExitStack() as stack:
        stand_ins = stack.enter_context(_replaying(blocks, replayed)) if replayed else {}
        # δ goes onto the site's output; when the site block itself is replayed, onto its stand-in's.
        site_now = stand_ins.get(site_layer, site_module)
        stack.enter_context(add_at_positions(site_now, all_rows, subject_col, lambda: delta[owners]))
        for step in range(hp.v_num_grad_steps):
            steps = step + 1
            hidden = run_suffix()
            # Answer positions and KL positions through the output head together: one pass over its vocab × d
            # weight per direction instead of two.
            log_probs = F.log_softmax(_final_hidden_to_logits(model, hidden[read_rows, read_cols]).float(), dim=-1)
            num_labels = label_rows.shape[0]
            token_logp = log_probs[:num_labels].gather(1, label_tok[:, None]).squeeze(1)
            row_nll = -torch.zeros(num_rewrite, device=device).index_add(0, label_rows, token_logp) / tokens_per_row
            nll = torch.zeros(n, device=device).index_add(0, owners[:num_rewrite], row_nll) / rows_per_request
            kl_now = log_probs[num_labels:]
            kl = (kl_initial.exp() * (kl_initial - kl_now)).sum(dim=-1)
            decay = hp.v_weight_decay * delta.norm(dim=1) / init_norm_sq
            loss = nll + hp.kl_factor * kl + decay
            with torch.no_grad():
                prob = torch.zeros(n, device=device).index_add(0, owners[:num_rewrite], torch.exp(-row_nll))
                prob /= rows_per_request
                live = ~frozen
                final_loss[live] = loss[live]
                final_prob[live] = prob[live]
                newly_done = live & (loss < hp.early_stop_loss)
                frozen_delta[newly_done] = delta[newly_done]
                frozen |= newly_done
            if bool(frozen.all()) or step == hp.v_num_grad_steps - 1:
                break
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
            with torch.no_grad():
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
                delta.mul_(scale[:, None])
    with torch.no_grad():
        values = initial + torch.where(frozen[:, None], frozen_delta, delta)
    return TargetResult(values=values.detach(), initial=initial, target_prob=final_prob.detach().cpu(),
                        final_loss=final_loss.detach().cpu(), steps=steps)
