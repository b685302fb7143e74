"""Keys and current values at the subject's last token (ROME/MEMIT; docs/methods.md).

Key of request j at layer ℓ: the input of the MLP output projection at the subject's last token, averaged over the
context templates of each group, then across groups: ``k = ½·k("{}") + ½·mean_g k(g + ". {}")`` for the default
two groups. Read with the model as it is now (earlier layers of the same batch already updated).
"""

from __future__ import annotations

import torch

from methods.infra.arch import EditableModel
from methods.context import flatten_templates
from methods.infra.hooks import CaptureSite, capture
from methods.requests import EditRequest
from methods.infra.tokens import encode_spans, subject_span


def _subject_batch(tokenizer, requests: list[EditRequest], templates: list[str]):
    spans = [subject_span(t.replace("{}", r.prompt, 1), r.subject) for r in requests for t in templates]
    return encode_spans(tokenizer, spans)


def compute_keys(editable: EditableModel, tokenizer, requests: list[EditRequest], layers: list[int],
                 context_groups: list[list[str]]) -> dict[int, torch.Tensor]:
    """{layer: K} with K of shape [m, n] (one column per request), float32, on the model's device."""
    keys, _ = compute_keys_and_site_outputs(editable, tokenizer, requests, layers, context_groups, None)
    return keys


def compute_keys_and_site_outputs(editable: EditableModel, tokenizer, requests: list[EditRequest],
                                  layers: list[int], context_groups: list[list[str]], site: torch.nn.Module | None
                                  ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """``compute_keys`` and, from the same forward pass, ``compute_site_outputs`` ([d, n]) of ``site``.

    The plain "{}" template's row of each request is exactly the plain prompt, so its site output is h; one pass
    instead of two per edited layer. Without a "{}" template (or without a site) h is read in a pass of its own.
    """
    templates, group_of = flatten_templates(context_groups)
    batch = _subject_batch(tokenizer, requests, templates)
    rows = torch.arange(batch.input_ids.shape[0])
    sites = [CaptureSite(editable.mlp_out(layer), "input") for layer in layers]
    plain = templates.index("{}") if "{}" in templates else None
    if site is not None and plain is not None:
        sites.append(CaptureSite(site, "output"))
    outs = capture(editable.model, batch, sites, rows, batch.span_last)
    n, t = len(requests), len(templates)
    site_outputs = None
    if site is not None:
        if plain is None:
            site_outputs = compute_site_outputs(editable, tokenizer, requests, site)
        else:  # rows are request-major: request j's plain row is j·t + plain
            site_outputs = outs.pop()[torch.arange(n) * t + plain].float().t().contiguous()
    groups = torch.tensor(group_of)
    num_groups = int(groups.max()) + 1
    result = {}
    for layer, acts in zip(layers, outs):
        acts = acts.float().reshape(n, t, -1)  # rows are ordered request-major
        group_means = torch.stack([acts[:, groups == g].mean(dim=1) for g in range(num_groups)], dim=1)
        result[layer] = group_means.mean(dim=1).t().contiguous()
    return result, site_outputs


def compute_site_outputs(editable: EditableModel, tokenizer, requests: list[EditRequest],
                         site: torch.nn.Module) -> torch.Tensor:
    """[d, n]: the site module's output at the subject's last token of each plain prompt (no context template)."""
    batch = _subject_batch(tokenizer, requests, ["{}"])
    rows = torch.arange(batch.input_ids.shape[0])
    (acts,) = capture(editable.model, batch, [CaptureSite(site, "output")], rows, batch.span_last)
    return acts.float().t().contiguous()
