"""GPU readiness check: EditGrid's editing core on a Llama-3-8B-sized model, in one command of a few minutes.

    python benchmarks/gpu_check.py                          # Llama-3-8B's configuration, random bf16 weights, cuda
    python benchmarks/gpu_check.py --device cpu --tiny      # the same steps on a tiny configuration (seconds; CI)

No weights are loaded and nothing is downloaded: the model is Llama-3-8B's configuration (32 layers, d = 4096,
m = 14,336) with random weights created in bf16 directly on the device, and the text is synthetic — a word-level
tokenizer over the words ``w0 … w3999`` built here. Only torch, transformers and EditGrid's editing core
(methods/, grid/assembly.py, grid/config.py's presets) are imported: no MLflow, Ray or FAISS.

Steps (each with its seconds and the peak device memory of the phase):
  1. the model, random bf16 weights on the device;
  2. second-moment statistics C of the default 5 layers (m × m, float64 accumulators) on a synthetic corpus:
     tokens per second;
  3. MEMIT, AlphaEdit and UltraEdit on batches of 1 and 100 synthetic requests (prompt, subject, target words):
     seconds per edit, split into v* (target values) and the solve; the v* target probability is printed but means
     little on random weights;
  4. the precision path GPU users take, checked against float32 on the CPU with a tiny model: C from bf16 weights
     on the device vs float32 weights on the CPU, and the float64 solve on the device vs on the CPU (same inputs),
     each within a tolerance; a bf16 edit's Δ against the float32 edit's is reported (v* runs in the weights'
     precision, so they differ by more than rounding).

The check exits 1 when a step of 4 is out of tolerance. Figures from a run go to benchmarks/RESULTS.md ("GPU
check") with the device, the command and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from grid.assembly import assemble_method, resolve_layers  # noqa: E402
from grid.config import method_settings  # noqa: E402
from methods.corpus import parse_corpus  # noqa: E402
from methods.infra.arch import EditableModel  # noqa: E402
from methods.infra.linear_plan import machine_identity  # noqa: E402
from methods.requests import EditRequest  # noqa: E402
from methods.stats import second_moments  # noqa: E402

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json); random weights, so only the shapes matter.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
WORDS = 4000  # the synthetic vocabulary: w0 … w3999 (+ 4 special tokens)
METHODS = ("memit", "alphaedit", "ultraedit", "grace")


def synthetic_tokenizer():
    """A word-level fast tokenizer over ``w0 … w{WORDS-1}`` (whitespace-split, offsets for subject positions)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(WORDS)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def synthetic_requests(count: int, seed: int) -> list[EditRequest]:
    """``count`` requests "<context words> <subject> <relation words>" → a one- or two-word target."""
    generator = torch.Generator().manual_seed(seed)

    def words(n: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(4, WORDS, (n,), generator=generator))

    requests = []
    for _ in range(count):
        subject = words(2)
        requests.append(EditRequest(prompt=f"{words(3)} {{}} {words(3)}", subject=subject,
                                    target=words(1 + int(torch.randint(0, 2, (1,), generator=generator)))))
    return requests


def write_corpus(folder: Path, num_tokens: int, seed: int) -> Path:
    """A text file of synthetic documents (~``num_tokens`` words) for the statistics pass."""
    generator = torch.Generator().manual_seed(seed)
    lines, total = [], 0
    while total < num_tokens:
        length = int(torch.randint(32, 256, (1,), generator=generator))
        lines.append(" ".join(f"w{int(i)}" for i in torch.randint(4, WORDS, (length,), generator=generator)))
        total += length
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "synthetic_corpus.txt"
    path.write_text("\n\n".join(lines))
    return path


def build_model(config: dict, dtype: torch.dtype, device: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**config, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class Memory:
    """Peak device memory of a phase (CUDA: allocator peak; CPU: the process's peak RSS so far)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class Row:
    phase: str
    seconds: float
    peak_gb: float
    detail: str


def _hparams(method: str, args) -> dict:
    overrides = {"layers": args.layers} if args.layers else {}
    if method not in ("ultraedit", "grace", "wise") and args.v_steps:  # v* belongs to locate-then-edit methods
        overrides["v_num_grad_steps"] = args.v_steps
    return overrides


def edit_cells(model, tokenizer, moments, layers, args, memory: Memory, cache_dir: Path) -> list[dict]:
    editable = EditableModel.wrap(model)
    originals = {layer: editable.weight(layer).detach().clone() for layer in layers}
    cells = []
    for method in args.methods:
        spec = method_settings(method, _hparams(method, args))
        for batch_size in args.batch_sizes:
            num = max(batch_size, args.min_edits)
            requests = synthetic_requests(num, seed=args.seed + batch_size)
            with torch.no_grad():
                for layer, weight in originals.items():
                    editable.weight(layer).copy_(weight)
            memory.reset()
            # Memory editors (GRACE, WISE) wrap their kind's default layer; the others edit the statistics' window.
            cell_layers = layers if spec.kind is None or args.layers else resolve_layers(editable, spec, method)
            assembly = assemble_method(spec, editable, tokenizer, cell_layers, moments, seed=args.seed,
                                       cache_dir=cache_dir, context_groups=[["{}"]])
            total = target = solve = 0.0
            probs: list[float] = []
            for start in range(0, num, batch_size):
                report = assembly.editor.apply(requests[start:start + batch_size])
                total += report.seconds
                target += report.target_seconds
                solve += report.solve_seconds
                probs.extend(report.target_prob)
            # Memory editors keep their state beside the weights (GRACE's codebook, WISE's mask), not on the CPU.
            held = [t for t in (getattr(getattr(assembly.editor, "codebook", None), "keys", None),
                                getattr(assembly.editor, "mask", None)) if isinstance(t, torch.Tensor)]
            state_on_device = all(t.device == editable.parameter_device() for t in held) if held else None
            assembly.editor.remove()
            finite = all(torch.isfinite(editable.weight(layer)).all() for layer in layers)
            cells.append({"method": method, "batch_size": batch_size, "edits": num,
                          "seconds_per_edit": total / num, "vstar_seconds_per_edit": target / num,
                          "solve_seconds_per_edit": solve / num, "peak_gb": memory.peak_gb(),
                          "vstar_target_prob": sum(probs) / len(probs) if probs else None, "finite": bool(finite),
                          "editor_state_on_model_device": state_on_device})
            print(f"  {method:<10} b={batch_size:<4} {total / num:8.3f} s/edit  (v* {target / num:.3f}, "
                  f"solve {solve / num:.3f})  peak {cells[-1]['peak_gb']:.1f} GB", flush=True)
    with torch.no_grad():
        for layer, weight in originals.items():
            editable.weight(layer).copy_(weight)
    return cells


# ----------------------------------------------------------------------------------------------------------------
# The precision path, against float32 on the CPU
# ----------------------------------------------------------------------------------------------------------------

def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def precision_checks(device: str, dtype: torch.dtype, seed: int, cache_dir: Path) -> list[dict]:
    """Tiny model: bf16 (or the run's dtype) on ``device`` vs float32 on the CPU."""
    tokenizer = synthetic_tokenizer()
    reference = build_model(TINY, torch.float32, "cpu", seed)
    lowered = build_model(TINY, torch.float32, "cpu", seed).to(device=device, dtype=dtype)
    layers = [2, 3]
    corpus = parse_corpus(str(write_corpus(cache_dir, 4000, seed)))
    checks = []

    def moments_of(model, key):
        return second_moments(EditableModel.wrap(model), tokenizer, layers, corpus, 4000, model_key=key,
                              cache_dir=cache_dir / key, progress=False).moments

    c_ref, c_low = moments_of(reference, "fp32-cpu"), moments_of(lowered, f"{dtype}-{device}")
    error = max(_relative(c_low[layer].cpu(), c_ref[layer]) for layer in layers)
    tolerance = 2e-2 if dtype != torch.float32 else 1e-6
    checks.append({"check": f"C from {str(dtype).removeprefix('torch.')} weights on {device} vs float32 on cpu",
                   "relative_error": error, "tolerance": tolerance, "ok": error <= tolerance})

    # The solve: identical float64 inputs, on the device and on the CPU.
    spec = method_settings("memit", {"layers": layers})
    solver_inputs = torch.Generator().manual_seed(seed)
    keys = torch.randn(160, 12, generator=solver_inputs, dtype=torch.float64)
    residuals = torch.randn(64, 12, generator=solver_inputs, dtype=torch.float64)
    deltas = []
    for where in ("cpu", device):
        from methods.stages import build_solver
        solver = build_solver(spec.solver, spec.hparams, None)
        weights = {layer: reference.model.layers[layer].mlp.down_proj.weight.detach().double().to(where)
                   for layer in layers}
        solver.prepare(layers, {layer: c_ref[layer].to(where) for layer in layers}, weights)
        deltas.append(solver.solve(layers[0], keys.to(where), residuals.to(where), weights[layers[0]]).cpu())
    error = _relative(deltas[1], deltas[0])
    checks.append({"check": f"MEMIT float64 solve on {device} vs cpu (same K, R, C)", "relative_error": error,
                   "tolerance": 1e-9, "ok": error <= 1e-9})

    # A whole edit: the lowered model's Δ against the float32 one. v* is optimised in the weights' precision, so
    # the two differ by more than rounding; the figure is reported, not judged (a real model's edit is judged by
    # the bf16 SmolLM2 trial of the test suite).
    requests = synthetic_requests(3, seed)
    deltas = []
    for model, moments in ((reference, c_ref), (lowered, c_low)):
        editable = EditableModel.wrap(model)
        before = {layer: editable.weight(layer).detach().double().cpu().clone() for layer in layers}
        assembly = assemble_method(method_settings("memit", {"layers": layers, "v_num_grad_steps": 5}), editable,
                                   tokenizer, layers, moments, seed=seed, cache_dir=cache_dir,
                                   context_groups=[["{}"]])
        assembly.editor.apply(requests)
        deltas.append(torch.cat([(editable.weight(layer).detach().double().cpu() - before[layer]).flatten()
                                 for layer in layers]))
    finite = bool(torch.isfinite(deltas[1]).all())
    checks.append({"check": f"MEMIT Δ with {str(dtype).removeprefix('torch.')} weights on {device} vs float32 on cpu "
                            "(5 v* steps in that precision; reported)", "relative_error": _relative(deltas[1], deltas[0]),
                   "tolerance": None, "ok": finite})
    return checks


# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny configuration instead of Llama-3-8B's (seconds)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="model weights' dtype (statistics accumulate in float64, solves in float64)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated presets")
    parser.add_argument("--batch-sizes", default="1,100")
    parser.add_argument("--min-edits", type=int, default=2, help="edits per cell at least (batch 1: 2 batches)")
    parser.add_argument("--stats-tokens", type=int, default=None, help="default 100,000 (tiny: 20,000)")
    parser.add_argument("--v-steps", type=int, default=None, help="v* steps (default: the preset's)")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: the architecture's)")
    parser.add_argument("--skip-precision", action="store_true", help="skip step 4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    args.stats_tokens = args.stats_tokens or (20_000 if args.tiny else 100_000)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --tiny for the CPU form)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    memory = Memory(args.device)
    config = TINY if args.tiny else LLAMA3_8B
    device_name = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                   else machine_identity()["cpu"])
    print(f"gpu_check: {'tiny' if args.tiny else 'Llama-3-8B'} configuration, {args.dtype} weights on {args.device} "
          f"({device_name}); torch {torch.__version__}", flush=True)
    rows: list[Row] = []
    results: dict = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
                     "config": "tiny" if args.tiny else "llama-3-8b", "dtype": args.dtype, "argv": sys.argv[1:]}
    with tempfile.TemporaryDirectory(prefix="editgrid-gpu-check-") as folder:
        cache_dir = Path(folder)
        memory.reset()
        started = time.perf_counter()
        model = build_model(config, dtype, args.device, args.seed)
        rows.append(Row("model (random weights)", time.perf_counter() - started, memory.peak_gb(),
                        f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters"))
        tokenizer = synthetic_tokenizer()
        editable = EditableModel.wrap(model)
        layers = args.layers or editable.default_layers()

        memory.reset()
        corpus = parse_corpus(str(write_corpus(cache_dir, args.stats_tokens, args.seed)))
        stats = second_moments(editable, tokenizer, layers, corpus, args.stats_tokens, model_key="gpu-check",
                               cache_dir=cache_dir, progress=False)
        rate = stats.tokens / stats.seconds
        rows.append(Row(f"statistics C, layers {layers}", stats.seconds, memory.peak_gb(),
                        f"{stats.tokens} tokens, {rate:,.0f} tokens/s, m = {editable.key_dim(layers[0])}"))
        moments = {layer: stats.moments[layer].to(args.device) for layer in layers}
        print("editing:", flush=True)
        cells = edit_cells(model, tokenizer, moments, layers, args, memory, cache_dir)
        del moments, model, editable
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        checks = [] if args.skip_precision else precision_checks(args.device, dtype, args.seed, cache_dir / "precision")

    print(f"\n{'phase':<34} {'seconds':>9} {'peak GB':>8}  detail")
    for row in rows:
        print(f"{row.phase:<34} {row.seconds:9.2f} {row.peak_gb:8.2f}  {row.detail}")
    print(f"\n{'method':<10} {'batch':>5} {'edits':>5} {'s/edit':>8} {'v* s/edit':>9} {'solve s/edit':>12} "
          f"{'peak GB':>8} {'v* P(target)':>12}")
    for cell in cells:
        prob = f"{cell['vstar_target_prob']:.3f}" if cell["vstar_target_prob"] is not None else "-"
        print(f"{cell['method']:<10} {cell['batch_size']:>5} {cell['edits']:>5} {cell['seconds_per_edit']:8.3f} "
              f"{cell['vstar_seconds_per_edit']:9.3f} {cell['solve_seconds_per_edit']:12.3f} {cell['peak_gb']:8.2f} "
              f"{prob:>12}{'' if cell['finite'] else '  NaN/Inf!'}")
    if checks:
        print("\nprecision path:")
        for check in checks:
            bound = "" if check["tolerance"] is None else f" (≤ {check['tolerance']:.0e})"
            error = f"  relative error {check['relative_error']:.2e}{bound}"
            print(f"  [{'ok' if check['ok'] else 'FAILED'}] {check['check']}{error}")
    results.update(phases=[row.__dict__ for row in rows], cells=cells, precision=checks)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    failed = [c for c in checks if not c["ok"]] + [c for c in cells if not c["finite"]]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
