"""Peak memory and time of the teacher-forced evaluation of N CounterFact records on the unedited model (the
pre-edit reference + every edit/* metric, as a trial's step 0 computes them): the check that evaluation memory
stays flat in N (benchmarks/RESULTS.md, "Evaluation memory").

    .venv/bin/python benchmarks/bench_eval_memory.py --num 1000 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.datasets import load_records  # noqa: E402
from evals.teacher_forced import compute_reference, evaluate_records  # noqa: E402
from methods.infra.models import load_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True,
                        help="CounterFact records (JSON), e.g. counterfact/counterfact-edit.json of the shared data")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    records = load_records(args.data, limit=args.num, offset=args.offset)
    started = time.perf_counter()
    reference = compute_reference(loaded.model, loaded.tokenizer, records, batch_size=args.batch_size)
    result = evaluate_records(loaded.model, loaded.tokenizer, records, reference=reference,
                              batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    headline = {k: round(v, 3) for k, v in result.metrics.items()
                if k in ("edit/efficacy", "edit/generalization", "edit/specificity")}
    print(f"{len(records)} records, {torch.get_num_threads()} threads, linear plan: {loaded.linear_plan}")
    print(f"{seconds:.0f} s, peak RSS {peak_gb:.2f} GB, {headline}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
