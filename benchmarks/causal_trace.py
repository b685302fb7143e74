"""Causal tracing of MLP indirect effects on CounterFact, to choose a model's edited layers with evidence.

Example (the run behind docs/methods.md, "How the default layers were chosen"):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/causal_trace.py --model smollm2-135m --num-facts 60 \
        --output-stem causal_trace_smollm2

Writes ``<output-dir>/<output-stem>.json`` (per-layer AIE, counts, settings, peak and recommended layers) and
``.png`` (AIE against layer), and prints a paragraph for docs/methods.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from evals.causal_trace import (HIDDEN, MLP, CausalTracer, TracingError, bootstrap_peak_frequencies,
                                eligible_centres, embedding_noise_std, prepare_prompt, recommend_edit_layers,
                                select_known_facts, summarise)
from methods.infra.arch import EditableModel
from methods.infra.models import load_model

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "counterfact" / "counterfact-edit.json"
EDIT_WIDTH = 5  # layers per recommended edit window, as in MEMIT/AlphaEdit's published tables


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder or embedded model name")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="CounterFact-style JSON list with prompt, subject, ground_truth")
    parser.add_argument("--num-facts", type=int, default=60, help="known facts to trace")
    parser.add_argument("--max-scan", type=int, default=5000, help="stop scanning for known facts after this many")
    parser.add_argument("--noise-multiple", type=float, default=3.0,
                        help="noise std as a multiple of the embedding matrix's std (ROME: 3)")
    parser.add_argument("--num-samples", type=int, default=5, help="noise samples per fact")
    parser.add_argument("--window", type=int, default=5, help="wide MLP restoration window (window 1 is always traced)")
    parser.add_argument("--hidden-window", type=int, default=1,
                        help="window for the block-output (hidden state) trace; 0 skips it")
    parser.add_argument("--min-edit-layer", type=int, default=1,
                        help="lowest layer a recommended edit window (and the restoration windows competing for "
                             "the peak) may hold; 1 leaves out the first MLP, an extended token embedding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-rows", type=int, default=256, help="rows per forward pass (memory bound)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--output-stem", default=None, help="file name stem; default causal_trace_<model>")
    return parser.parse_args(argv)


def find_known_facts(model, tokenizer, records: list[dict], wanted: int, max_scan: int, chunk: int = 200):
    """Scan records in file order until ``wanted`` facts are known; returns (known, scanned, untraceable)."""
    known, scanned, untraceable = [], 0, 0
    while len(known) < wanted and scanned < min(max_scan, len(records)):
        batch = records[scanned:min(scanned + chunk, max_scan, len(records))]
        scanned += len(batch)
        prepared = []
        for record in batch:
            try:
                prepared.append((record, prepare_prompt(tokenizer, record["prompt"], record["subject"],
                                                        record["ground_truth"])))
            except TracingError:
                untraceable += 1
        flags = select_known_facts(model, [traced for _, traced in prepared])
        known.extend(pair for pair, flag in zip(prepared, flags) if flag)
    return known, scanned, untraceable


def plot(summary, num_layers: int, keys: dict, choice: dict, literal: dict, min_layer: int, title: str,
         path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(num_layers))
    panels = [MLP] + ([HIDDEN] if HIDDEN in keys else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.6 * len(panels), 4.6), squeeze=False)
    for axis, kind in zip(axes[0], panels):
        for window in keys[kind]:
            mean = torch.tensor(summary.average_effect[(kind, window)])
            error = torch.tensor(summary.standard_error[(kind, window)])
            label = f"window {window}" + (" (single layer ℓ)" if window == 1 else f" (layers ℓ−{window // 2}…ℓ+{(window - 1) // 2})")
            line, = axis.plot(layers, mean, marker="o", markersize=3, label=label + ", ±1 s.e.")
            axis.fill_between(layers, mean - error, mean + error, color=line.get_color(), alpha=0.2)
        axis.axhline(0, color="grey", linewidth=0.6)
        axis.set_xlabel("layer ℓ (state restored at the subject's last token)")
        axis.set_ylabel("average indirect effect on p(true answer)")
        axis.grid(alpha=0.3)
        if kind == MLP:
            first, last = choice["edit_layers"][0], choice["edit_layers"][-1]
            axis.axvspan(first - 0.5, last + 0.5, color="tab:green", alpha=0.15,
                         label=f"recommended edit layers {first}–{last}")
            axis.axvline(choice["peak_layer"], color="tab:red", linestyle="--", linewidth=1,
                         label=f"peak of windows above layer {min_layer - 1} (ℓ={choice['peak_layer']})")
            if literal["peak_layer"] != choice["peak_layer"]:
                axis.axvline(literal["peak_layer"], color="grey", linestyle=":", linewidth=1,
                             label=f"overall peak (ℓ={literal['peak_layer']}, window holds layer 0)")
            axis.set_title("MLP output restored")
        else:
            axis.axhline(summary.mean_p_clean - summary.mean_p_corrupted, color="black", linestyle=":",
                         linewidth=1, label="average total effect (clean − corrupted)")
            axis.set_title("Block output (hidden state) restored")
        axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def curve_name(key: tuple[str, int]) -> str:
    return f"{key[0]}_window_{key[1]}"


def readme_paragraph(result: dict) -> str:
    counts, settings, choice = result["counts"], result["settings"], result["recommendation"]
    window = settings["window"]
    wide = result["aie"][f"mlp_window_{window}"]
    single = result["aie"]["mlp_window_1"]
    hidden = result["aie"].get(f"hidden_window_{settings['hidden_window']}")
    literal = choice["without_min_layer"]
    first, last = choice["edit_layers"][0], choice["edit_layers"][-1]
    peak = choice["peak_layer"]
    share = choice["bootstrap_peak_share"]
    frequent_peaks = [layer for layer in sorted(range(len(share)), key=lambda layer: -share[layer])[:3]
                      if share[layer] > 0]
    later_single = max(single[1:])
    hidden_note = (f" (restoring the whole block-0 output gives {hidden[0]:.3f}, about the same)"
                   if hidden is not None else "")
    return (
        f"**How the {result['model']} layers were chosen.** ROME-style causal tracing (`benchmarks/causal_trace.py`) on "
        f"{result['model']}: of the first {counts['scanned']} CounterFact records, {counts['known_found']} are facts "
        f"the model knows (the true answer's first token is its argmax on the prompt); we traced "
        f"{counts['traced']}. Gaussian noise ({settings['noise_multiple']:g}× the embedding std = "
        f"{settings['noise_std']:.3f}, {settings['num_samples']} samples per fact) on the subject's token "
        f"embeddings drops p(true answer) from {result['mean_p_clean']:.3f} to {result['mean_p_corrupted']:.3f} on "
        f"average. Restoring one clean MLP output at the subject's last token has an average indirect effect (AIE) "
        f"of {single[0]:.3f} at layer 0{hidden_note} and at most {later_single:.3f} at any later layer. We treat "
        f"the first MLP as an extended token embedding (its output at a token depends mostly on that token, so "
        f"restoring it mainly undoes the noise on the last subject token rather than restoring a stored fact) and "
        f"leave windows that contain layer 0 out of the peak search and the edit window. "
        f"Restoring {window}-layer "
        f"windows, the AIE is highest when centred on layer {peak} (AIE {wide[peak]:.3f} ± "
        f"{result['aie_standard_error'][f'mlp_window_{window}'][peak]:.3f}); centres within one standard error of "
        f"it: {', '.join(map(str, choice['plateau']))}; resampling the "
        f"facts puts the peak at layers {', '.join(f'{layer} ({share[layer]:.0%})' for layer in frequent_peaks)}. "
        f"AdaEdit §4.2's rule (edit L−4…L for the peak layer L) then gives layers {first}–{last}; applied without "
        f"excluding layer 0 it would give {literal['edit_layers'][0]}–{literal['edit_layers'][-1]} (peak "
        f"{literal['peak_layer']}, AIE {wide[literal['peak_layer']]:.3f}). Numbers and plot: "
        f"`benchmarks/results/{result['output_stem']}.json` and `.png`.")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = args.output_stem or "causal_trace_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model).strip("_")
    started = time.time()
    loaded = load_model(args.model, device=args.device)
    editable = EditableModel.wrap(loaded.model)
    records = json.loads(args.data.read_text())

    scan_started = time.time()
    known, scanned, untraceable = find_known_facts(loaded.model, loaded.tokenizer, records, args.num_facts,
                                                   args.max_scan)
    scan_seconds = time.time() - scan_started
    known_found = len(known)
    known = known[:args.num_facts]
    print(f"scanned {scanned} records: {known_found} known, {len(known)} kept, {untraceable} untraceable "
          f"({scan_seconds:.0f} s)", flush=True)
    if not known:
        print("no known facts found; nothing to trace", file=sys.stderr)
        return 1

    windows = {MLP: sorted({1, args.window})}
    if args.hidden_window > 0:
        windows[HIDDEN] = [args.hidden_window]
    noise_std = embedding_noise_std(loaded.model, args.noise_multiple)
    tracer = CausalTracer(editable, noise_std=noise_std, num_samples=args.num_samples,
                          max_batch_rows=args.max_batch_rows)
    trace_started = time.time()
    traces, per_fact = [], []
    for index, (record, traced) in enumerate(known):
        trace = tracer.trace(traced, windows, fact_seed=args.seed * 1_000_003 + index)
        traces.append(trace)
        per_fact.append({
            "case_id": record.get("case_id"), "subject": record["subject"], "answer": record["ground_truth"],
            "prompt": record["prompt"], "subject_tokens": [traced.subject_start, traced.subject_last],
            "prompt_tokens": len(traced.input_ids), "p_clean": round(trace.p_clean, 5),
            "p_corrupted": round(trace.p_corrupted, 5),
            "indirect_effect": {curve_name(key): [round(value, 5) for value in trace.indirect_effect(*key).tolist()]
                                for key in trace.restored}})
        elapsed = time.time() - trace_started
        print(f"[{index + 1}/{len(known)}] {record['subject']!r} p_clean {trace.p_clean:.3f} "
              f"p_corrupted {trace.p_corrupted:.3f}  ({elapsed:.0f} s, "
              f"~{elapsed / (index + 1) * (len(known) - index - 1):.0f} s left)", flush=True)
    trace_seconds = time.time() - trace_started

    summary = summarise(traces)
    num_layers = editable.num_layers
    wide_key = (MLP, args.window)
    wide_curve = summary.average_effect[wide_key]
    peak, edit_layers = recommend_edit_layers(wide_curve, EDIT_WIDTH, args.window, args.min_edit_layer)
    literal_peak, literal_layers = recommend_edit_layers(wide_curve, EDIT_WIDTH, args.window, 0)
    single_peak, single_layers = recommend_edit_layers(summary.average_effect[(MLP, 1)], EDIT_WIDTH, 1,
                                                       args.min_edit_layer)
    centres = eligible_centres(num_layers, args.window, args.min_edit_layer)
    per_fact_wide = torch.stack([trace.indirect_effect(*wide_key) for trace in traces])
    peak_share = bootstrap_peak_frequencies(per_fact_wide, centres, seed=args.seed)
    # Centres whose AIE is within one standard error of the peak: the layers the data cannot tell apart.
    threshold = wide_curve[peak] - summary.standard_error[wide_key][peak]
    plateau = [centre for centre in centres if wide_curve[centre] >= threshold]
    result = {
        "model": args.model,
        "model_fingerprint": loaded.fingerprint,
        "num_layers": num_layers,
        "output_stem": stem,
        "data": str(args.data),
        "command": " ".join(sys.argv),
        "counts": {"scanned": scanned, "untraceable": untraceable, "known_found": known_found,
                   "traced": len(traces)},
        "settings": {"noise_multiple": args.noise_multiple, "noise_std": noise_std,
                     "num_samples": args.num_samples, "window": args.window,
                     "hidden_window": args.hidden_window, "min_edit_layer": args.min_edit_layer,
                     "seed": args.seed, "known_rule":
                     "first token of ' ' + ground_truth is the argmax of the next-token distribution on the prompt",
                     "state_position": "subject's last token (from the tokenizer's offset mapping)",
                     "indirect_effect": "p_restored − p_corrupted of the true answer's first token, mean over noise "
                                        "samples; AIE = mean over facts",
                     "threads": args.threads, "device": str(editable.parameter_device())},
        "mean_p_clean": summary.mean_p_clean,
        "mean_p_corrupted": summary.mean_p_corrupted,
        "aie": {curve_name(key): values for key, values in summary.average_effect.items()},
        "aie_standard_error": {curve_name(key): values for key, values in summary.standard_error.items()},
        "peaks": {curve_name(key): int(torch.tensor(values).argmax())
                  for key, values in summary.average_effect.items()},
        "recommendation": {
            "peak_layer": peak,
            "edit_layers": list(edit_layers),
            "rule": (f"L = argmax over centres ℓ of the MLP AIE restored over a {args.window}-layer window "
                     f"(ROME/MEMIT trace MLPs with a window), among windows that stay at or above layer "
                     f"{args.min_edit_layer} (the first MLP acts as an extended token embedding); edit the "
                     f"{EDIT_WIDTH} layers L−{EDIT_WIDTH - 1}…L (AdaEdit §4.2: 'denote L as the max AIE value "
                     "layer, select L−4, …, L−1, L')"),
            "plateau": plateau,
            "plateau_threshold": threshold,
            "bootstrap_peak_share": peak_share,
            "without_min_layer": {"peak_layer": literal_peak, "edit_layers": list(literal_layers)},
            "from_single_layer_curve": {"peak_layer": single_peak, "edit_layers": list(single_layers)},
        },
        "seconds": {"scan": round(scan_seconds, 1), "trace": round(trace_seconds, 1),
                    "total": round(time.time() - started, 1)},
        "facts": per_fact,
    }
    result["readme_paragraph"] = readme_paragraph(result)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    title = f"Causal tracing of {args.model}: {len(traces)} known CounterFact facts"
    plot(summary, num_layers, windows, result["recommendation"], result["recommendation"]["without_min_layer"],
         args.min_edit_layer, title, args.output_dir / f"{stem}.png")

    for key, values in summary.average_effect.items():
        print(f"AIE {curve_name(key)}: " + " ".join(f"{layer}:{value:.3f}" for layer, value in enumerate(values)))
    print(f"peak layer {peak}; recommended edit layers {list(edit_layers)} (without excluding layer 0: peak "
          f"{literal_peak}, layers {list(literal_layers)}); bootstrap peak shares "
          + " ".join(f"{layer}:{share:.2f}" for layer, share in enumerate(peak_share) if share > 0))
    print(f"wrote {json_path} and .png")
    print()
    print(result["readme_paragraph"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
