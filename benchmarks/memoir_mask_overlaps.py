"""How MEMOIR's TopHash masks overlap on a model: the evidence for ``memoir_threshold`` (docs/lifelong_editors.md).

An edit stores the mask of its prompt; a query is served by the stored mask it overlaps most, if that overlap
|M_q ∩ M_i| / k reaches the threshold. For ``--num`` CounterFact records this prints percentiles of the overlap of
each edit's mask with (a) its own paraphrases' query masks, (b) its own neighbourhood prompts' masks, (c) the
nearest other edit's mask; then, for a list of thresholds, with all ``--num`` masks stored as after that many edits:
the share of paraphrases served by their own edit's mask, and the share of neighbourhood prompts served by any
mask. Queries are read at the last prompt token (the mean over the whole prompt), with the editor's own background
mean and permutation; k/m of chance overlap is printed beside them.

    .venv/bin/python benchmarks/memoir_mask_overlaps.py --data <data>/counterfact/counterfact-edit.json --num 300

``<data>``: a folder of the data sets laid out like the project's shared data folder (``counterfact/``, …).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.batching import left_padded  # noqa: E402
from evals.datasets import load_records  # noqa: E402
from grid.config import method_settings  # noqa: E402
from methods.editors.memoir import best_overlaps  # noqa: E402
from methods.infra.arch import EditableModel  # noqa: E402
from methods.infra.models import load_model  # noqa: E402
from methods.stages import build_editor  # noqa: E402

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def prompt_masks(editor, tokenizer, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    masks = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(prompts), batch_size):
        ids, attention = left_padded([tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]], pad)
        a = editor._layer_inputs(ids, attention)
        masks += [editor.prompt_mask(a[row][attention[row].bool()]) for row in range(len(ids))]
    return torch.stack(masks)


def describe(name: str, values: torch.Tensor) -> str:
    q = torch.quantile(values.float(), torch.tensor(QUANTILES))
    return f"{name:<42} " + "  ".join(f"{x:.3f}" for x in q.tolist()) + f"   (n={len(values)})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, help="default: the memoir preset's layer for the model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--num", type=int, default=300)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    loaded = load_model(args.model)
    editable = EditableModel.wrap(loaded.model)
    spec = method_settings("memoir", {"layers": [args.layer]} if args.layer is not None else {})
    layers = spec.layers(editable.default_layers(), editable.num_layers)
    editor = build_editor(spec, editable, loaded.tokenizer, layers, {}, [])
    records = load_records(args.data, limit=args.num, offset=args.offset)
    tok = loaded.tokenizer
    edits = prompt_masks(editor, tok, [r.prompt for r in records])
    para_owner = [i for i, r in enumerate(records) for _ in r.paraphrase_prompts]
    near_owner = [i for i, r in enumerate(records) for _ in r.neighborhood]
    para = prompt_masks(editor, tok, [p for r in records for p in r.paraphrase_prompts])
    near = prompt_masks(editor, tok, [n.prompt for r in records for n in r.neighborhood])
    editor.remove()
    k = editor.k
    pairwise = edits.float() @ edits.float().t() / k
    pairwise.fill_diagonal_(-1)
    own_para = (para.float() * edits[para_owner].float()).sum(1) / k
    own_near = (near.float() * edits[near_owner].float()).sum(1) / k
    print(f"model {args.model}, layer {layers[0]}, m = {editor.width}, k = {k} (chance overlap k/m = "
          f"{k / editor.width:.3f}); {len(records)} records from offset {args.offset} of {args.data}")
    print(f"{'overlap with the edit mask (quantiles ' + '/'.join(str(q) for q in QUANTILES) + ')':<42}")
    print(describe("(a) own paraphrases", own_para))
    print(describe("(b) own neighbourhood prompts", own_near))
    print(describe("(c) nearest other edit", pairwise.max(dim=1).values))
    para_best, para_index = best_overlaps(para, edits, k)
    near_best, _ = best_overlaps(near, edits, k)
    owners = torch.tensor(para_owner)
    print(f"\nwith all {len(records)} masks stored:")
    print(f"{'threshold':>9}  {'paraphrase served by its own edit':>34}  {'neighbourhood served by any edit':>33}")
    for threshold in THRESHOLDS:
        own = ((para_best >= threshold) & (para_index == owners)).float().mean()
        stolen = (near_best >= threshold).float().mean()
        print(f"{threshold:>9.2f}  {float(own):>34.3f}  {float(stolen):>33.3f}")
    print(f"\n{time.perf_counter() - start:.0f} s; command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
