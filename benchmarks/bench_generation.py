"""Greedy generation with and without the shared-prefix cache (evals/generation.py): a paired comparison.

The workload is SCR's selection step as a trial runs it at a checkpoint (grid/scr_stage.py): a fact memory of
``--memory`` CounterFact edits, every evaluation prompt of ``--records`` of those edits (rewrite, paraphrases,
neighbourhood), the top-5 facts retrieved for each and the selection prompt asking the model which one answers it
(greedy, at most 50 tokens, first line). Both ways run the same prompts alternately in one process on one loaded
model (the order flips every round, since this machine's speed drifts 10-20 % within minutes); the table gives
the median seconds per prompt of each, their ratio per round (median, min-max), and how many replies differ.

    .venv/bin/python benchmarks/bench_generation.py --data <data>            # 20 records, 3 rounds
    .venv/bin/python benchmarks/bench_generation.py --data <data> --records 40 --rounds 5 --batch-size 32

``<data>``: a folder of the data sets laid out like the project's shared data folder (``counterfact/`` is read).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.bench_editing import git_commit  # noqa: E402
from evals.datasets import load_records  # noqa: E402
from evals.generation import generate_greedy, shared_prefix_length  # noqa: E402
from grid.scr_stage import SELECTION_MAX_TOKENS, scr_queries  # noqa: E402
from methods.infra.linear_plan import machine_identity  # noqa: E402
from methods.infra.models import load_model  # noqa: E402
from retrieval.embedder import Embedder  # noqa: E402
from retrieval.memory import FactMemory  # noqa: E402
from retrieval.prompts import fact_sentence, selection_prompt  # noqa: E402


def selection_prompts(data: Path, memory_size: int, records: int, top_k: int) -> list[str]:
    edits = load_records(data / "counterfact" / "counterfact-edit.json", limit=memory_size)
    memory = FactMemory(Embedder("default"), "flat")
    memory.add([fact_sentence(r.prompt, r.target_new) for r in edits], [r.case_id for r in edits])
    queries = list(dict.fromkeys(q.text for q in scr_queries(edits[:records])))
    hits = memory.search(queries, top_k)
    return [selection_prompt(q, [h.fact for h in found]) for q, found in zip(queries, hits) if found]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder (counterfact/ is read)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--memory", type=int, default=500, help="edits in SCR's fact memory")
    parser.add_argument("--records", type=int, default=20, help="edits whose evaluation prompts are selected for")
    parser.add_argument("--batch-size", type=int, default=32, help="the trial's eval.batch_size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    loaded = load_model(args.model, device="cpu" if not torch.cuda.is_available() else "auto")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = selection_prompts(args.data, args.memory, args.records, top_k=5)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    shared = shared_prefix_length(encoded)
    mean_tokens = sum(map(len, encoded)) / len(encoded)

    seconds: dict[bool, list[float]] = {True: [], False: []}
    replies: dict[bool, list[str]] = {}
    for round_index in range(args.rounds):
        for share in ((True, False) if round_index % 2 == 0 else (False, True)):
            started = time.perf_counter()
            generations = generate_greedy(model, tokenizer, prompts, max_new_tokens=SELECTION_MAX_TOKENS,
                                          stop=("\n",), batch_size=args.batch_size, share_prefix=share)
            seconds[share].append((time.perf_counter() - started) / len(prompts))
            replies[share] = [g.raw for g in generations]
    ratios = [s / u for s, u in zip(seconds[True], seconds[False])]
    differ = sum(a != b for a, b in zip(replies[True], replies[False]))
    result = {
        "workload": f"SCR selection: {len(prompts)} prompts ({args.records} records' evaluation prompts, memory of "
                    f"{args.memory} edits, top-5), {mean_tokens:.0f} tokens on average, {shared} shared",
        "model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "cpu": machine_identity()["cpu"], "commit": git_commit(),
        "seconds_per_prompt_unshared": statistics.median(seconds[False]),
        "seconds_per_prompt_shared": statistics.median(seconds[True]),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "replies_differing": differ, "prompts": len(prompts),
    }
    print(result["workload"])
    print(f"machine: {result['cpu']}, {result['threads']} torch threads, commit {result['commit']}")
    print("| way | s/prompt (median of rounds) | shared ÷ unshared per round: median [min, max] | replies differing |")
    print("|---|---|---|---|")
    print(f"| every token in every row | {result['seconds_per_prompt_unshared']:.3f} | | |")
    print(f"| shared prefix once | {result['seconds_per_prompt_shared']:.3f} | {result['ratio_median']:.2f} "
          f"[{result['ratio_min']:.2f}, {result['ratio_max']:.2f}] | {differ} of {len(prompts)} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
