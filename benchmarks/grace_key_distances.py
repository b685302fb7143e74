"""How far apart GRACE's queries are on a model: the evidence for ``grace_eps_init`` (docs/lifelong_editors.md).

GRACE's key for an edit is the wrapped layer's input at the last prompt token; ε_init is an absolute distance in
that space. This prints percentiles of the distance between an edit prompt's query and (a) every other edit
prompt's, (b) the nearest other edit prompt's, (c) its own first paraphrase's, (d) its own first neighbourhood
prompt's. A useful ε_init covers (c) without reaching (b) and (d).

    .venv/bin/python benchmarks/grace_key_distances.py --layer 25 --data <data>/counterfact/counterfact-edit.json --offset 5000 --num 100

``<data>``: a folder of the data sets laid out like the project's shared data folder (``counterfact/``,
``general/``, …).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.datasets import load_records  # noqa: E402
from methods.infra.arch import EditableModel  # noqa: E402
from methods.infra.hooks import CaptureSite, capture  # noqa: E402
from methods.infra.models import load_model  # noqa: E402
from methods.infra.tokens import TextSpan, encode_spans  # noqa: E402

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def last_token_queries(loaded, editable: EditableModel, layer: int, texts: list[str]) -> torch.Tensor:
    rows = []
    for text in texts:
        batch = encode_spans(loaded.tokenizer, [TextSpan(text=text, start=0, end=1)], padding_side="right")
        (query,) = capture(loaded.model, batch, [CaptureSite(editable.mlp_out(layer), "input")], torch.tensor([0]),
                           torch.tensor([int(batch.lengths[0]) - 1]))
        rows.append(query[0])
    return torch.stack(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--num", type=int, default=100)
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    editable = EditableModel.wrap(loaded.model)
    records = load_records(args.data, limit=args.num, offset=args.offset)
    prompts = last_token_queries(loaded, editable, args.layer, [r.prompt for r in records])
    paraphrased = [(i, r.paraphrase_prompts[0]) for i, r in enumerate(records) if r.paraphrase_prompts]
    neighbours = [(i, r.neighborhood[0].prompt) for i, r in enumerate(records) if r.neighborhood]
    para = last_token_queries(loaded, editable, args.layer, [p for _, p in paraphrased])
    near = last_token_queries(loaded, editable, args.layer, [p for _, p in neighbours])
    pairwise = torch.cdist(prompts, prompts)
    self_mask = torch.eye(len(prompts), dtype=torch.bool)
    rows = {"a prompt and any other edit's prompt": pairwise[~self_mask],
            "a prompt and its nearest other prompt": pairwise.masked_fill(self_mask, float("inf")).min(1).values,
            "a prompt and its own paraphrase": torch.stack([(prompts[i] - para[j]).norm()
                                                           for j, (i, _) in enumerate(paraphrased)]),
            "a prompt and its own neighbourhood prompt": torch.stack([(prompts[i] - near[j]).norm()
                                                                     for j, (i, _) in enumerate(neighbours)])}
    print(f"{args.model}, layer {args.layer} input at the last prompt token, {len(records)} records of {args.data} "
          f"from offset {args.offset}; median |q| = {float(prompts.norm(dim=1).median()):.1f}")
    print("| pair | " + " | ".join(f"{int(q * 100)} %" for q in QUANTILES) + " |")
    print("|---|" + "---|" * len(QUANTILES))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{float(torch.quantile(values, q)):.1f}" for q in QUANTILES) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
