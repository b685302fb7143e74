"""GRACE (Hartvigsen et al. 2023; docs/lifelong_editors.md): a discrete key–value codebook wrapped around one layer.

The model's weights never change. The MLP output projection of one layer is wrapped: its input at a token is a
query q; if the nearest codebook key k_i lies within its radius ε_i (‖q − k_i‖₂ ≤ ε_i) the layer's output at that
token is replaced by the trained value v_i, otherwise the layer computes as before.

One edit (requests one at a time, as the paper runs them): the query is the layer input at the last prompt token of
``prompt + " " + target``. Codebook update, once per edit, with d* = min_i ‖q − k_i‖ and i* its key:
  * empty codebook, or d* > ε_init + ε_{i*}: add (q, v, ε_init);
  * else, another target (label) at i*: add (q, v) and split the two balls: ε_{i*} = d*/2 − 1e-5, ε_new = d*/2;
  * else (same label): ``coverage`` grows ε_{i*} to d* if needed (``moving_average`` also moves k_{i*} halfway
    to q); no new key — the existing value is trained further.
A new value starts as U[0,1)^{d_out} (``cold``) or the layer's own output at q (``warm``). Then a fresh Adam
(lr ``grace_lr``) trains the codebook values for exactly ``grace_n_iter`` steps on the mean NLL of the target
tokens, with the wrapped layer in the forward pass.

Which tokens are queries: every token position is looked up on its own (``replace_last`` at every position). In a
causal model position t sees only its prefix, so this is the original's ``replace_last`` with the query at the last
token, evaluated at every prefix at once: the teacher-forced scoring of ``prompt + target`` queries the last prompt
token exactly as the edit did, and generation queries each new token. It avoids the stale ``key_id`` of EasyEdit's
port; the port's other two traps are avoided too: labels are compared as token sequences (not the mean
of a label tensor that includes −100s), and keys, labels and edit ids are appended together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.infra.arch import EditableModel
from methods.editor import BatchReport
from methods.finetune import target_nll_batch
from methods.infra.hooks import CaptureSite, capture, hidden_of, replace_hidden
from methods.infra.tokens import positions_from_mask
from methods.requests import EditRequest
from methods.targets import logits_at, replaying_below

SPLIT_MARGIN = 1e-5  # the original's gap between two split balls


@dataclass(frozen=True)
class GraceHParams:
    grace_eps_init: float = 1.0  # ε of a new key: an absolute distance in the layer-input space
    grace_lr: float = 1.0
    grace_n_iter: int = 100
    grace_value_init: str = "cold"  # "cold": U[0,1); "warm": the layer's output at the query
    grace_eps_expand: str = "coverage"  # "coverage" or "moving_average"


class Codebook:
    """Keys [n, d_in] (float32), values [n, d_out] (trainable), radii [n], labels and the edit that made each key."""

    def __init__(self, key_dim: int, value_dim: int, device: torch.device | str = "cpu"):
        # On the wrapped layer's device: every forward looks keys up there, and the values train there.
        self.device = torch.device(device)
        self.keys = torch.zeros(0, key_dim, device=self.device)
        self.values = torch.nn.Parameter(torch.zeros(0, value_dim, device=self.device))
        self.radii = torch.zeros(0, device=self.device)
        self.labels: list[tuple[int, ...]] = []
        self.edit_ids: list[int] = []
        self.splits = 0
        self.expansions = 0
        self.replacements = 0

    def __len__(self) -> int:
        return len(self.labels)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to and index of the nearest key for each query row [M, d_in]."""
        # Exact differences, not ‖q‖² + ‖k‖² − 2q·k: with ‖q‖² ~ 10⁴ in float32 that form is off by ~0.03, more than
        # a split ball's radius can be, and a query could then miss the key made from it.
        distances = torch.cdist(queries.float(), self.keys.to(queries.device),
                                compute_mode="donot_use_mm_for_euclid_dist")
        return distances.min(dim=1)

    def add(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: tuple[int, ...], edit_id: int) -> int:
        self.keys = torch.cat([self.keys, key.detach().float().reshape(1, -1).to(self.keys.device)])
        values = torch.cat([self.values.detach(), value.detach().reshape(1, -1).to(self.values)])
        self.values = torch.nn.Parameter(values)
        self.radii = torch.cat([self.radii, torch.tensor([float(radius)], device=self.radii.device)])
        self.labels.append(tuple(label))
        self.edit_ids.append(int(edit_id))
        return len(self) - 1

    def update(self, query: torch.Tensor, label: tuple[int, ...], edit_id: int, eps_init: float, eps_expand: str,
               new_value) -> tuple[int, str]:
        """Apply the codebook rule for one edit's query; the key index to train and what happened
        ("added", "split", "replaced", "expanded" or "covered"). ``new_value()`` makes the value of a new key."""
        query = query.detach().float().reshape(-1)
        if len(self) == 0:
            return self.add(query, new_value(), eps_init, label, edit_id), "added"
        distance, index = self.nearest(query[None])
        d, i = float(distance[0]), int(index[0])
        if d > eps_init + float(self.radii[i]):
            return self.add(query, new_value(), eps_init, label, edit_id), "added"
        if self.labels[i] != tuple(label):
            if d / 2 <= SPLIT_MARGIN:  # the same key with another answer: the newer edit replaces the older one
                self.labels[i], self.edit_ids[i] = tuple(label), int(edit_id)
                with torch.no_grad():
                    self.values[i] = new_value().detach().reshape(-1).to(self.values)
                self.replacements += 1
                return i, "replaced"
            self.radii[i] = d / 2 - SPLIT_MARGIN
            self.splits += 1
            return self.add(query, new_value(), d / 2, label, edit_id), "split"
        if eps_expand == "moving_average":
            self.keys[i] = (self.keys[i] + query) / 2
        if d > float(self.radii[i]):
            self.radii[i] = d
            self.expansions += 1
            return i, "expanded"
        return i, "covered"

    def state_dict(self) -> dict:
        # Saved on the CPU, so that a checkpoint loads on any device.
        return {"keys": self.keys.cpu().clone(), "values": self.values.detach().cpu().clone(),
                "radii": self.radii.cpu().clone(),
                "labels": [list(label) for label in self.labels], "edit_ids": list(self.edit_ids),
                "splits": self.splits, "expansions": self.expansions, "replacements": self.replacements}

    def load_state_dict(self, state: dict) -> None:
        self.keys, self.radii = state["keys"].to(self.device).clone(), state["radii"].to(self.device).clone()
        self.values = torch.nn.Parameter(state["values"].to(self.device).clone())
        self.labels = [tuple(label) for label in state["labels"]]
        self.edit_ids = list(state["edit_ids"])
        self.splits, self.expansions = int(state["splits"]), int(state["expansions"])
        self.replacements = int(state.get("replacements", 0))


class GraceEditor:
    writes_weights = False  # inference changes through the wrapped layer; the codebook is the editor's state

    def __init__(self, editable: EditableModel, tokenizer, layers: list[int], hparams: GraceHParams, seed: int = 0):
        if len(layers) != 1:
            raise ValueError(f"GRACE wraps exactly one layer, got {layers}")
        self.editable = editable
        self.tokenizer = tokenizer
        self.layers = list(layers)
        self.hparams = hparams
        self.module = editable.mlp_out(layers[0])
        self.codebook = Codebook(editable.key_dim(layers[0]), editable.value_dim(layers[0]),
                                 device=self.module.weight.device)
        self.generator = torch.Generator().manual_seed(seed)  # cold values
        self.edits = 0
        self.unserved = 0  # edits whose own query the codebook did not serve while training (nothing to train)
        self._last: dict[str, float] = {}
        self._hits: list[torch.Tensor] | None = None  # while served_rows runs: the hit map of each forward
        self._handle = self.module.register_forward_hook(self._lookup)

    def remove(self) -> None:
        """Unwrap the layer (the model computes as if never edited)."""
        self._handle.remove()

    def _lookup(self, module, args, output):
        queries = args[0]
        if len(self.codebook) == 0:
            if self._hits is not None:
                self._hits.append(torch.zeros(queries.shape[:-1], dtype=torch.bool))
            return None
        hidden = hidden_of(output)
        distance, index = self.codebook.nearest(queries.reshape(-1, queries.shape[-1]))
        hit = distance <= self.codebook.radii.to(distance.device)[index]
        if self._hits is not None:
            self._hits.append(hit.reshape(queries.shape[:-1]).cpu())
        if not bool(hit.any()):
            return None
        values = self.codebook.values.to(device=hidden.device, dtype=hidden.dtype)[index]
        replaced = torch.where(hit[:, None], values, hidden.reshape(-1, hidden.shape[-1]))
        return replace_hidden(output, replaced.reshape(hidden.shape))

    @torch.no_grad()
    def served_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Which rows of a (left-padded) batch the codebook serves: a real token's key within its nearest key's
        radius, so the layer's output there is the stored value (one forward of the model)."""
        device = self.editable.parameter_device()
        self._hits = []
        try:
            self.editable.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                position_ids=positions_from_mask(attention_mask).to(device), use_cache=False)
            (hits,) = self._hits
        finally:
            self._hits = None
        return (hits & attention_mask.bool()).any(dim=1)

    def _query(self, batch, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input at ``position`` of the single row of ``batch``, and the layer's own (unreplaced)
        output there."""
        (query,) = capture(self.editable.model, batch, [CaptureSite(self.module, "input")],
                           torch.tensor([0]), torch.tensor([position]))
        query = query[0]
        with torch.no_grad():
            own = self.editable.weight(self.layers[0]) @ query
            if getattr(self.module, "bias", None) is not None:
                own = own + self.module.bias
        return query, own

    def _edit_one(self, request: EditRequest) -> tuple[float, str]:
        hp = self.hparams
        device = self.editable.parameter_device()
        batch, rows, cols, tokens = target_nll_batch(self.tokenizer, [request])
        batch, rows, cols, tokens = batch.to(device), rows.to(device), cols.to(device), tokens.to(device)
        # the last prompt token predicts the first answer token
        query, own_output = self._query(batch, int(cols[0]))

        def new_value():
            if hp.grace_value_init == "warm":
                return own_output.float()
            return torch.rand(self.codebook.values.shape[1], generator=self.generator)

        _, event = self.codebook.update(query, tuple(int(t) for t in tokens), self.edits, hp.grace_eps_init,
                                        hp.grace_eps_expand, new_value)
        optimizer = torch.optim.Adam([self.codebook.values], lr=hp.grace_lr)
        # The blocks below the wrapped layer cannot see the codebook: each step runs only the blocks from it up.
        with replaying_below(self.editable.model, self.editable.blocks, self.layers[0], batch.model_inputs()):
            with torch.enable_grad():
                for _ in range(hp.grace_n_iter):
                    logits = logits_at(self.editable.model, batch.model_inputs(), rows, cols)
                    loss = F.cross_entropy(logits.float(), tokens)
                    if not loss.requires_grad:  # no key serves the edit's positions: counted, not a crash
                        self.unserved += 1
                        break
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            with torch.no_grad():
                logits = logits_at(self.editable.model, batch.model_inputs(), rows, cols)
                prob = float(torch.exp(-F.cross_entropy(logits.float(), tokens)))
        self.codebook.values.grad = None
        self.edits += 1
        return prob, event

    def apply(self, requests: list[EditRequest]) -> BatchReport:
        start = time.perf_counter()
        probs, events = [], []
        for request in requests:
            prob, event = self._edit_one(request)
            probs.append(prob)
            events.append(event)
        radii = self.codebook.radii
        self._last = {"grace/codebook_size": float(len(self.codebook)), "grace/splits": float(self.codebook.splits),
                      "grace/expansions": float(self.codebook.expansions),
                      "grace/replacements": float(self.codebook.replacements),
                      "grace/unserved_edits": float(self.unserved),
                      "grace/new_keys": float(sum(e in ("added", "split") for e in events)),
                      "grace/radius_mean": float(radii.mean()), "grace/radius_min": float(radii.min()),
                      "grace/value_norm_mean": float(self.codebook.values.detach().norm(dim=1).mean())}
        seconds = time.perf_counter() - start
        return BatchReport(num_requests=len(requests), seconds=seconds, target_seconds=seconds, solve_seconds=0.0,
                           target_prob=probs, target_steps=self.hparams.grace_n_iter)

    def metrics(self) -> dict[str, float]:
        return dict(self._last)

    def state_dict(self) -> dict:
        return {"codebook": self.codebook.state_dict(), "edits": self.edits, "unserved": self.unserved,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.codebook.load_state_dict(state["codebook"])
        self.edits = int(state["edits"])
        self.unserved = int(state.get("unserved", 0))
        self.generator.set_state(state["generator"])
