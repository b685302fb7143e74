"""Audit judges on items whose right verdict is known by construction (evals/judge_audit.py), and time them.

Example (the run behind docs/second_protocol.md, "How far the judge can be trusted"):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/judge_audit.py \
        --counterfact ../shared/data/counterfact/counterfact-edit.json \
        --zsre ../shared/data/zsre/zsre_mend_train-1k.json \
        --n-counterfact 20 --n-zsre 6 --judges contains,qwen-logit,smollm2-logit,smollm2-letter \
        --output-stem judge_audit --record

Judges: ``<model>-logit`` (evals/judge.py LogitJudge: log P(A) − log P(B) behind the worked examples),
``<model>-letter`` (the generated letter, zero-shot, parsed; today's hf backend), ``contains`` (the contains-match
rule), with ``<model>`` one of qwen (qwen2.5-coder-1.5b-instruct) and smollm2 (smollm2-135m). Writes
``<output-dir>/<stem>.json`` (every row) and ``.md`` (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evals.autoregressive import GenerationSettings, generate_answers  # noqa: E402
from evals.judge import Judge, LogitJudge, TransformersJudge  # noqa: E402
from evals.judge_audit import (CATEGORIES, AuditResult, build_audit, contains_rule, record_audits,  # noqa: E402
                               run_audit)
from methods.infra.linear_plan import machine_identity  # noqa: E402
from methods.infra.models import load_model  # noqa: E402

MODELS = {"qwen": "qwen2.5-coder-1.5b-instruct", "smollm2": "smollm2-135m"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counterfact", required=True, help="CounterFact JSON (e.g. ../shared/data/counterfact/...)")
    parser.add_argument("--zsre", default=None, help="zsRE JSON (e.g. ../shared/data/zsre/zsre_mend_train-1k.json)")
    parser.add_argument("--n-counterfact", type=int, default=25)
    parser.add_argument("--n-zsre", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--disjoint-from-seed", type=int, default=None,
                        help="leave out the records the audit of this seed uses (a development audit: change a "
                             "judge's prompt on it, report on the other)")
    parser.add_argument("--judges", default="qwen-logit,qwen-letter,smollm2-letter,smollm2-logit,contains")
    parser.add_argument("--continuations", default="smollm2", choices=[*MODELS, "none"],
                        help="the model whose greedy continuations (the second protocol's generation settings) make "
                             "the continuation and gold_continuation items; none = written items only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--output-stem", default=None, help="write <stem>.json and <stem>.md (default: print only)")
    parser.add_argument("--record", action="store_true",
                        help="also record each model judge's accuracy and kappa in evals/data/judge_audits.json, "
                             "where trials read the audit of the judge they use")
    return parser.parse_args(argv)


def model_continuations(lm, batch_size: int):
    """Greedy continuations as the second protocol generates answers (its default GenerationSettings)."""
    settings = GenerationSettings()
    return lambda prompts: generate_answers(lm.model, lm.tokenizer, prompts, settings, batch_size)


def table(results: list[AuditResult], seconds: dict[str, float]) -> str:
    head = ["judge", "accuracy", "κ", "unparsable", "judgments/s"] + list(CATEGORIES)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rate = r.items / seconds[r.judge] if seconds.get(r.judge) else float("nan")
        cells = [r.judge, f"{r.accuracy:.3f}", f"{r.kappa:.3f}", f"{r.unparsable:.3f}", f"{rate:.2f}"]
        cells += [f"{r.by_category.get(c, float('nan')):.2f}" for c in CATEGORIES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    loaded: dict[str, object] = {}
    continuations = None
    if args.continuations != "none":
        loaded[args.continuations] = load_model(MODELS[args.continuations])
        continuations = model_continuations(loaded[args.continuations], args.batch_size)
    exclude = frozenset()
    if args.disjoint_from_seed is not None:
        exclude = frozenset(a.source for a in build_audit(args.counterfact, args.zsre, args.n_counterfact,
                                                          args.n_zsre, seed=args.disjoint_from_seed))
    items = build_audit(args.counterfact, args.zsre, args.n_counterfact, args.n_zsre, seed=args.seed,
                        continuations=continuations, exclude=exclude)
    print(f"{len(items)} audit items from {args.n_counterfact} CounterFact + {args.n_zsre} zsRE records"
          f"{'' if continuations is None else f' (continuations by {MODELS[args.continuations]})'}", flush=True)
    results, seconds, names = [], {}, {}
    for spec in [s.strip() for s in args.judges.split(",") if s.strip()]:
        started = time.perf_counter()
        if spec == "contains":
            result = run_audit(spec, items, contains_rule)
        else:
            model_key, _, mode = spec.partition("-")
            if model_key not in MODELS or mode not in ("logit", "letter"):
                raise SystemExit(f"--judges: {spec!r} is not contains or <{'|'.join(MODELS)}>-<logit|letter>")
            if model_key not in loaded:
                loaded[model_key] = load_model(MODELS[model_key])
            lm = loaded[model_key]
            name = f"hf:{MODELS[model_key]}@{lm.fingerprint}"
            backend = (LogitJudge(lm.model, lm.tokenizer, name, batch_size=args.batch_size) if mode == "logit" else
                       TransformersJudge(lm.model, lm.tokenizer, name, batch_size=args.batch_size))
            names[spec] = backend.name
            started = time.perf_counter()  # model loading is not judging
            result = run_audit(spec, items, Judge(backend, cache=None, batch_size=args.batch_size).grade)
        seconds[spec] = time.perf_counter() - started
        results.append(result)
        print(result.summary(), f"[{seconds[spec]:.0f} s]", flush=True)
    text = table(results, seconds)
    print(text)
    if args.output_stem:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "continuations": args.continuations, "machine": machine_identity(), "torch_threads": torch.get_num_threads(),
                "items": len(items), "date": time.strftime("%Y-%m-%d")}
        (args.output_dir / f"{args.output_stem}.json").write_text(json.dumps(
            {"meta": meta, "seconds": seconds, "judge_names": names,
             "results": [{k: v for k, v in r.__dict__.items()} for r in results]}, indent=1))
        if args.record:
            record_audits(results, names, {"date": meta["date"], "command": meta["command"]})
        (args.output_dir / f"{args.output_stem}.md").write_text(
            f"{len(items)} items; {meta['machine']}; {meta['torch_threads']} torch threads; {meta['date']}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
