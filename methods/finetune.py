"""FT (docs/methods.md, "ROME and FT"):
constrained fine-tuning of the edited layers' MLP output weights on the target NLL.

The simplest parametric baseline of the LyapLock and Revisiting papers. Per batch: Adam on the MLP output
projections of the edited layers, minimising the mean target-token NLL of ``prompt + target`` (loss on the target
tokens only, as FT-M), for ``num_steps`` steps; after every step each weight is clipped elementwise into
[W_start − ε, W_start + ε] with ε = ``norm_constraint`` (the L∞ ball around the weights at the start of the
batch, as FT-L). The batch's Δ = W_end − W_start then goes through the method's update transforms, like any
solver's Δ, so FT composes with RECT, SRFusion and PRUNE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.infra.arch import EditableModel
from methods.editor import BatchReport, UpdateTransform, load_transform_states, transform_states
from methods.requests import EditRequest
from methods.infra.tokens import TextSpan, encode_spans


@dataclass(frozen=True)
class FineTuneHParams:
    ft_lr: float = 5e-4
    ft_num_steps: int = 25
    ft_norm_constraint: float = 5e-4
    early_stop_loss: float = 5e-2


def target_nll_batch(tokenizer, requests: list[EditRequest]):
    """Right-padded ``prompt + target`` rows, and (row, position predicting it, token) for every target token."""
    spans = []
    for req in requests:
        filled = req.prompt.replace("{}", req.subject, 1)
        spans.append(TextSpan(text=filled + req.target_with_space, start=req.prompt.find("{}"),
                              end=req.prompt.find("{}") + len(req.subject), answer_start=len(filled)))
    batch = encode_spans(tokenizer, spans, padding_side="right")
    return (batch, *answer_positions(batch, len(requests)))


def answer_positions(batch, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position predicting it, token) for every answer token of the first ``num_rows`` rows of a
    right-padded batch."""
    rows, cols, tokens = [], [], []
    for r in range(num_rows):
        for pos in range(int(batch.answer_first[r]), int(batch.lengths[r])):
            rows.append(r)
            cols.append(pos - 1)
            tokens.append(int(batch.input_ids[r, pos]))
    return torch.tensor(rows), torch.tensor(cols), torch.tensor(tokens)


class FineTuneEditor:
    writes_weights = True

    def remove(self) -> None:  # nothing wraps the model
        pass

    def __init__(self, editable: EditableModel, tokenizer, layers: list[int], hparams: FineTuneHParams,
                 transforms: list[UpdateTransform] | None = None):
        self.editable = editable
        self.tokenizer = tokenizer
        self.layers = sorted(layers)
        self.hparams = hparams
        self.transforms = transforms or []

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for transform in self.transforms:
            out.update(transform.metrics())
        return out

    # Adam starts afresh for every batch, so only the transforms can carry state from one batch to the next.
    def state_dict(self) -> dict:
        return {"transforms": transform_states(self.transforms)}

    def load_state_dict(self, state: dict) -> None:
        load_transform_states(self.transforms, state["transforms"])

    def _per_request_nll(self, batch, rows, cols, tokens, n: int) -> torch.Tensor:
        logits = self.editable.model(**batch.model_inputs()).logits
        logp = F.log_softmax(logits[rows, cols].float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
        counts = torch.bincount(rows, minlength=n).clamp(min=1).float()
        return -torch.zeros(n, device=logp.device).index_add(0, rows, logp) / counts

    def apply(self, requests: list[EditRequest]) -> BatchReport:
        start = time.perf_counter()
        hp = self.hparams
        device = self.editable.parameter_device()
        batch, rows, cols, tokens = target_nll_batch(self.tokenizer, requests)
        batch, rows, cols, tokens = batch.to(device), rows.to(device), cols.to(device), tokens.to(device)
        params = [self.editable.mlp_out(layer).weight for layer in self.layers]
        starts = [p.detach().clone() for p in params]
        n = len(requests)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=hp.ft_lr)
        try:
            for _ in range(hp.ft_num_steps):
                nll = self._per_request_nll(batch, rows, cols, tokens, n)
                if float(nll.detach().mean()) < hp.early_stop_loss:
                    break
                optimizer.zero_grad()
                nll.mean().backward()
                optimizer.step()
                with torch.no_grad():
                    for p, w0 in zip(params, starts):
                        p.copy_(torch.clamp(p, w0 - hp.ft_norm_constraint, w0 + hp.ft_norm_constraint))
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        update_norm = {}
        with torch.no_grad():
            for layer, p, w0 in zip(self.layers, params, starts):
                weight = self.editable.weight(layer)  # d×m view of p
                delta = weight.double() - (w0.t() if self.editable.is_transposed(layer) else w0).double()
                weight.sub_(delta.to(weight.dtype))  # back to W_start, then add the transformed Δ
                for transform in self.transforms:
                    delta = transform(layer, delta, weight)
                weight.add_(delta.to(weight.dtype))
                update_norm[layer] = float(delta.norm())
            prob = torch.exp(-self._per_request_nll(batch, rows, cols, tokens, n)).cpu()
        seconds = time.perf_counter() - start
        return BatchReport(num_requests=n, seconds=seconds, target_seconds=0.0, solve_seconds=seconds,
                           target_prob=[float(p) for p in prob], target_steps=hp.ft_num_steps,
                           update_norm=update_norm)
