"""How much memory a trial needs, estimated from the model's configuration alone (no weights), before it loads.

``plan_memory(config, spec, ...)`` takes a transformers configuration (a ``config.json`` dict or a
``PretrainedConfig``) and the trial's settings (the resolved ``MethodSpec``, layers, batch size, weights' dtype, the
evaluation batch size) and returns a ``MemoryPlan``: bytes per component, each with the formula it was computed by,
their total, and a printable table (GB = 10⁹ bytes). ``check_budget`` refuses a plan whose total exceeds a budget,
naming every big component. The trial runner (grid/trial.py, via grid/memory_plan.py) computes the plan before it
loads the model, logs it and refuses with the numbers when it cannot fit.

Notation (docs/methods.md): d = hidden size (the edited matrix's value width), m = the MLP's intermediate size (its
key width), L = blocks, V = vocabulary, n = edits per batch, ℓ = edited layers, b_w = bytes per weight in the
model's dtype. The components, and what in the code each one counts:

  weights        P · b_w, P counted from the configuration (embeddings, lm_head unless tied, every block's
                 projections, biases and norms; Llama/Mistral/Qwen2/Qwen3, GPT-J, GPT-2, GPT-NeoX; any other
                 architecture is counted by building it on the ``meta`` device, which allocates nothing)
  statistics     ℓ · 8m²: C = E[kkᵀ] accumulated in float64 per layer (methods/stats.py GramAccumulator); the
                 float64 C stays on the device for the solvers and the drift diagnostic (grid/assembly.py)
  stats buffer   ℓ · 4·4096·m: the accumulators' float32 row buffers (GRAM_BUFFER_ROWS rows per layer)
  W₀ copies      ℓ · d·m · b_w: the unedited weights of the written layers (grid/assembly.py ``originals``)
  solver         MEMIT: ℓ · 2 · 8m² (λC and its Cholesky factor, methods/solvers/memit.py) + one layer's solve
                 workspace 8m² + 8dm (an m×m float64 system when it is solved directly, Δ = R·(…)ᵀ in float64);
                 AlphaEdit: ℓ · 3 · 8m² (projector P, K_pK_pᵀ, P·K_pK_pᵀ; methods/solvers/alphaedit.py) + 2·8m²
                 + 8dm (the system P(KKᵀ + K_pK_pᵀ) + αI and its LU, Δ);
                 LyapLock: ℓ · (8m² + 2·8dm) (S_kk, W₀ and S_vk in float64; C is the statistics' tensor) + 2·8m²
                 + 2·8dm (system, right-hand side, Δ); ROME: 2·8m² + 8dm; FT: ℓ · 3 · 4dm (gradient and Adam's
                 two moments)
  editor         UltraEdit: 2·8(m+d) per weight shape (the float64 running normaliser) + ℓ · 8dm (every layer's Δ
                 is solved before any is written) + 8m² (one layer's ridge system KᵀK + λI);
                 GRACE: a codebook of keys and values, ~N·(m + d)·4 for N = the trial's edits;
                 WISE: (3 + merge_freq/save_freq) copies of the edited layer (W_L, W′, W₀ and the shards) in b_w +
                 a boolean mask d·m
  v* activations the target optimisation (methods/targets.py), a rough formula: R = n · (T + 1) rows (T = 6
                 context templates plus the KL prompt), each ~32 tokens (16 before the subject's last token, 16
                 fed). One forward/backward holds min(R·32, max(v_chunk_tokens, 32)) tokens (the chunk cap) through
                 the L − s blocks above the edit site s, ~(8d + 4m) activations per token per block in b_a (the
                 weights' dtype, or v_autocast's): tokens · (L − s) · (8d + 4m) · b_a; plus the prefix key/value
                 caches of all R rows, R · 16 · L · 2 · kv · b_a (kv = key/value heads × head dim), the replayed
                 outputs R · 16 · d · b_a and the KL rows' initial log-probabilities n · V · 4.
                 UltraEdit/FT/GRACE/WISE run a full forward/backward on a micro-batch instead: the same per-token
                 formula over all L blocks for (micro-batch) · 32 tokens
  evaluation     logits of one evaluation batch: B · 16 positions · V · (b_w + 8) (only the answer's positions go
                 through the LM head, evals/teacher_forced.py; the logits in the weights' dtype, their float32 copy
                 and log-softmax) + one block's activations over the B · 64-token rows, B · 64 · (2d + 2m) · b_w

Every component is held at once in the total, which makes it an upper estimate: the statistics' row buffer and the
v* graph are not alive together, for instance. Not counted: the CUDA context and the allocator's slack (≈ 0.5–2 GB
on a GPU), the tokenizer and the Python process itself (≈ 1 GB of RAM on CPU).

Command line (no model is loaded; the configuration is read from a config.json or a model folder):
``python -m methods.infra.memory_plan --config tests/data/model_configs/meta-llama-3-8b.json --method memit
--batch-size 100 --dtype bfloat16``. The method's stages and hyper-parameters are read from its preset
(configs/presets/<method>.yaml) with the registry's defaults (methods/stages.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

GB = 10**9
GRAM_BUFFER_ROWS = 4096  # methods/stats.py GRAM_BUFFER_ROWS (not imported: this module must stay light)
CONTEXT_TEMPLATES = 6  # "{}" plus one continuation per starter (methods/context.py DEFAULT_STARTERS)
PREFIX_TOKENS = 16  # tokens of a v* row before the subject's last token (context template + prompt start), assumed
FED_TOKENS = 16  # tokens of a v* row from the subject's last token on (rest of the prompt + target), assumed
ROW_TOKENS = PREFIX_TOKENS + FED_TOKENS
EVAL_TOKENS = 64  # tokens of an evaluation row, assumed
EVAL_LOGIT_TOKENS = 16  # positions of a row whose logits are computed (the suffix / answer), assumed
DEFAULT_V_CHUNK_TOKENS = 1024  # methods/targets.py TargetHParams.v_chunk_tokens
DEFAULT_LARGE_FRACTION = 0.05  # components at least this share of the total are named in a refusal

DTYPE_BYTES = {"float32": 4, "fp32": 4, "auto": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
               "float64": 8}
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "phi3")


class MemoryPlanError(RuntimeError):
    """A plan that does not fit its budget, a size that cannot be read, or a configuration that cannot be planned."""


# -- sizes ---------------------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value) -> int:
    """Bytes from a number of bytes or a size such as ``"40GB"``, ``"1.5 GiB"``, ``"512MB"`` (GB = 10⁹, GiB = 2³⁰)."""
    if isinstance(value, bool):
        raise MemoryPlanError(f"{value!r} is not a size")
    if isinstance(value, (int, float)):
        if value <= 0 or value != value:
            raise MemoryPlanError(f"{value!r} must be a positive number of bytes")
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            size = float(match.group(1)) * _UNITS[match.group(2).lower()]
            if size > 0:
                return int(size)
    raise MemoryPlanError(f"{value!r} is not a size (a number of bytes, or e.g. \"40GB\", \"512MB\", \"1.5GiB\")")


def format_bytes(size: int) -> str:
    """``16.06 GB``, ``1.00 MB``, ``512 B`` (decimal units)."""
    for unit, scale in (("GB", GB), ("MB", 10**6), ("KB", 10**3)):
        if size >= (scale if unit == "KB" else 0.1 * scale):
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def device_total_memory(device) -> tuple[int, str]:
    """(bytes, description) of the memory a trial on ``device`` can use: the GPU's total memory on CUDA, the
    machine's RAM elsewhere."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(props.total_memory), f"{props.name} total memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024, "this machine's RAM (/proc/meminfo MemTotal)"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


# -- the model's shape ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int  # d
    intermediate: int  # m: the edited matrix's key width
    layers: int  # L
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    positions: int
    parameters: int


def _as_config(config):
    """A PretrainedConfig from a dict (the class defaults of its model_type filled in), or the config itself."""
    if isinstance(config, dict):
        from transformers import AutoConfig

        values = dict(config)
        model_type = values.pop("model_type", None)
        if not model_type:
            raise MemoryPlanError("the configuration has no model_type")
        try:
            return AutoConfig.for_model(model_type, **values)
        except ValueError as err:
            raise MemoryPlanError(f"transformers does not know model_type {model_type!r}: {err}") from err
    return config


def model_shape(config) -> ModelShape:
    """The sizes a plan needs, read from a config.json dict or a PretrainedConfig."""
    cfg = _as_config(config)
    get = lambda *names, default=None: next((getattr(cfg, n) for n in names  # noqa: E731
                                             if getattr(cfg, n, None) is not None), default)
    d = int(get("hidden_size", "n_embd"))
    heads = int(get("num_attention_heads", "n_head"))
    m = int(get("intermediate_size", "n_inner", default=4 * d))
    head_dim = int(get("head_dim", default=d // heads))
    shape = dict(model_type=str(cfg.model_type), hidden=d, intermediate=m,
                 layers=int(get("num_hidden_layers", "n_layer")), heads=heads,
                 kv_heads=int(get("num_key_value_heads", default=heads)), head_dim=head_dim,
                 vocab=int(cfg.vocab_size), tied=bool(getattr(cfg, "tie_word_embeddings", False)),
                 positions=int(get("max_position_embeddings", "n_positions", default=0)))
    return ModelShape(**shape, parameters=parameter_count(cfg, **shape))


def parameter_count(cfg, *, model_type, hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied,
                    positions) -> int:
    """Parameters of the model ``cfg`` describes: a formula per known family, else the model built on ``meta``."""
    d, m, L, V = hidden, intermediate, layers, vocab
    head = 0 if tied else V * d
    if model_type in LLAMA_LIKE:
        q, kv = heads * head_dim, kv_heads * head_dim
        attention = d * q + 2 * d * kv + q * d  # q, k, v, o projections
        if model_type == "qwen2":  # q/k/v biases
            attention += q + 2 * kv
        elif getattr(cfg, "attention_bias", False):  # q/k/v/o biases
            attention += q + 2 * kv + d
        if model_type == "qwen3":  # per-head q/k norms
            attention += 2 * head_dim
        elif model_type == "olmo2":  # q/k norms over the whole projections
            attention += q + kv
        mlp = 3 * d * m + ((2 * m + d) if getattr(cfg, "mlp_bias", False) else 0)  # gate, up, down
        norms = {"olmo": 0, "gemma2": 4 * d}.get(model_type, 2 * d)  # olmo: non-parametric LayerNorms
        final_norm = 0 if model_type == "olmo" else d
        return V * d + L * (attention + mlp + norms) + final_norm + head
    if model_type == "gptj":  # parallel block: one LayerNorm, q/k/v/out without bias, fc_in/fc_out with bias
        block = 2 * d + 4 * d * d + (d * m + m) + (m * d + d)
        return V * d + L * block + 2 * d + (0 if tied else V * d + V)  # lm_head has a bias
    if model_type == "gpt2":
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
        return V * d + positions * d + L * block + 2 * d + head
    if model_type == "gpt_neox":
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
        return V * d + L * block + 2 * d + head
    return meta_parameter_count(cfg)


def meta_parameter_count(cfg) -> int:
    """Parameters of the model built on the ``meta`` device (shapes only, nothing allocated); tied ones once."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


# -- the plan ------------------------------------------------------------------------------------------------------

@dataclass
class Component:
    name: str
    bytes: int
    formula: str


@dataclass
class MemoryPlan:
    model: str
    method: str
    shape: ModelShape
    layers: list[int]
    batch_size: int
    dtype: str
    components: list[Component] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components)

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def as_dict(self) -> dict:
        return {"model": self.model, "method": self.method, "layers": self.layers, "batch_size": self.batch_size,
                "dtype": self.dtype, "parameters": self.shape.parameters,
                "shape": {k: v for k, v in self.shape.__dict__.items()},
                "components": [{"name": c.name, "bytes": c.bytes, "gb": round(c.bytes / GB, 3), "formula": c.formula}
                               for c in self.components],
                "total_bytes": self.total, "total_gb": round(self.total / GB, 3)}

    def summary(self) -> str:
        """One line: the total and its three largest components."""
        big = sorted(self.components, key=lambda c: -c.bytes)[:3]
        return (f"memory plan for {self.model} ({self.method}, batch {self.batch_size}, {self.dtype}, layers "
                f"{self.layers}): {format_bytes(self.total)} (" + ", ".join(f"{c.name} {format_bytes(c.bytes)}"
                                                                            for c in big) + ")")

    def table(self) -> str:
        s = self.shape
        lines = [f"Memory plan: {self.model} — {self.method}, batch {self.batch_size}, weights {self.dtype}, "
                 f"layers {self.layers}",
                 f"  (d = {s.hidden}, m = {s.intermediate}, L = {s.layers}, V = {s.vocab}, "
                 f"{s.parameters / 1e9:.2f} B parameters{', tied embeddings' if s.tied else ''}; GB = 10^9 bytes)"]
        width = max(len(c.name) for c in self.components + [Component("total", 0, "")])
        for c in self.components:
            lines.append(f"  {c.name:<{width}}  {c.bytes / GB:9.2f} GB   {c.formula}")
        lines.append(f"  {'total':<{width}}  {self.total / GB:9.2f} GB")
        return "\n".join(lines)


def _bytes_of(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise MemoryPlanError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def default_layers(shape: ModelShape) -> tuple[int, ...]:
    """The architecture's default window (methods/infra/arch.py), read without a model."""
    from methods.infra.arch import ARCHITECTURES, default_layer_window

    spec = ARCHITECTURES.get(shape.model_type)
    return (spec.default_layers.get(shape.layers) if spec else None) or default_layer_window(shape.layers)


def plan_memory(config, spec, *, batch_size: int, dtype: str = "float32", layers: list[int] | None = None,
                eval_batch_size: int = 32, num_edits: int | None = None, model: str = "model",
                method: str | None = None) -> MemoryPlan:
    """The memory plan of one trial (see the module docstring for every formula).

    ``config``: a config.json dict or a PretrainedConfig; ``spec``: the resolved ``methods.stages.MethodSpec``;
    ``layers``: the edited layers (None = what the trial would resolve: the configured ones, else the defaults);
    ``num_edits``: the trial's edits (GRACE's codebook; None = one batch)."""
    shape = model_shape(config)
    d, m, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    b_w = _bytes_of(dtype)
    if layers is None:
        layers = list(spec.layers(default_layers(shape), L)) if spec.edits_model else []
    layers = sorted(int(x) for x in layers)
    ell, n = len(layers), int(batch_size)
    hp = spec.hparams
    plan = MemoryPlan(model=model, method=method or (spec.editor if spec.kind is not None else spec.solver),
                      shape=shape, layers=layers, batch_size=n, dtype=dtype)
    add = lambda name, size, formula: plan.components.append(Component(name, int(size), formula))  # noqa: E731

    # P · b_w
    add("weights", shape.parameters * b_w, f"{shape.parameters:,} parameters × {b_w} B")
    # UltraEdit on the MLP's other maps (ultra_targets) writes no output projection (unless one is named, which
    # this config-only plan cannot tell): no C, and one W₀ per target matrix
    targets = hp.get("ultra_targets") if spec.editor == "ultraedit" else None
    stat_layers = 0 if isinstance(targets, dict) else ell
    copies = sum(len(v) for v in targets.values()) if isinstance(targets, dict) else ell
    if spec.edits_weights and stat_layers:
        # float64 C per layer + float32 row buffer (GramAccumulator)
        add("statistics", stat_layers * 8 * m * m, f"{stat_layers} layers × m² × 8 B (float64 C), m = {m}")
        add("stats buffer", stat_layers * 4 * GRAM_BUFFER_ROWS * m,
            f"{stat_layers} layers × {GRAM_BUFFER_ROWS}·m × 4 B (float32 rows)")
    if spec.edits_weights and copies:
        add("W0 copies", copies * d * m * b_w, f"{copies} matrices × d·m × {b_w} B (unedited weights)")

    solver = spec.solver if spec.kind is None else None
    if solver == "memit":
        add("solver", ell * 2 * 8 * m * m + 8 * m * m + 8 * d * m,
            f"MEMIT: {ell} × 2 × m² × 8 B (λC, its Cholesky factor) + m² × 8 B system + d·m × 8 B Δ")
    elif solver == "alphaedit":
        add("solver", ell * 3 * 8 * m * m + 2 * 8 * m * m + 8 * d * m,
            f"AlphaEdit: {ell} × 3 × m² × 8 B (P, K_pK_pᵀ, P·K_pK_pᵀ) + 2 × m² × 8 B system/LU + d·m × 8 B Δ")
    elif solver == "lyaplock":
        add("solver", ell * (8 * m * m + 2 * 8 * d * m) + 2 * 8 * m * m + 2 * 8 * d * m,
            f"LyapLock: {ell} × (m² × 8 B S_kk + 2 × d·m × 8 B W₀, S_vk) + 2 × m² × 8 B + 2 × d·m × 8 B workspace")
    elif solver == "rome":
        add("solver", 2 * 8 * m * m + 8 * d * m, "ROME: 2 × m² × 8 B (C⁻¹ solve) + d·m × 8 B Δ")
    elif solver == "ft":
        add("solver", ell * 3 * 4 * d * m, f"FT: {ell} × 3 × d·m × 4 B (gradient, Adam's two moments)")

    kind = spec.editor if spec.kind is not None else None
    if kind == "ultraedit":
        # every edited matrix is d×m or m×d (the output projection, or gate/up with ultra_targets)
        matrices = copies
        shapes = (1 if not isinstance(targets, dict) else 2) if hp.get("ultra_norm_scope", "shape") == "shape" \
            else matrices
        add("editor state", shapes * 2 * 8 * (m + d) + matrices * 8 * d * m + 8 * m * m,
            f"UltraEdit: {shapes} normaliser(s) × 2 × (m+d) × 8 B + {matrices} × d·m × 8 B Δ + m² × 8 B ridge "
            "system")
    elif kind == "grace":
        edits = num_edits or n
        add("editor state", edits * (m + d) * 4, f"GRACE: {edits} edits × (m + d) × 4 B codebook")
    elif kind == "wise":
        copies = 3 + max(1, int(hp.get("wise_merge_freq", 1000)) // max(1, int(hp.get("wise_save_freq", 500))))
        add("editor state", copies * d * m * b_w + d * m,
            f"WISE: {copies} copies × d·m × {b_w} B (W_L, W′, W₀, shards) + d·m mask")
    elif kind == "memoir":
        edits = num_edits or n
        add("editor state", 2 * d * m * 4 + edits * m,
            f"MEMOIR: W_r and its training copy, d·m × 4 B each, + {edits} masks × m × 1 B")

    # activations of a forward/backward, per token per block: ~(8d + 4m) values (norms, q/k/v/attention output,
    # the residual stream, the MLP's gate/up/activation/product)
    per_token_block = 8 * d + 4 * m
    kv = shape.kv_heads * shape.head_dim
    if spec.edits_model and kind is None and solver not in ("ft", "none"):
        autocast = str(hp.get("v_autocast", "none"))
        b_a = _bytes_of(autocast) if autocast in DTYPE_BYTES else b_w
        chunk = int(hp.get("v_chunk_tokens", DEFAULT_V_CHUNK_TOKENS))
        rows = n * (CONTEXT_TEMPLATES + 1)
        graph_tokens = min(rows * ROW_TOKENS, max(chunk, ROW_TOKENS))
        site = max(layers) if layers else 0
        above = max(1, L - site)
        graph = graph_tokens * above * per_token_block * b_a
        caches = rows * PREFIX_TOKENS * L * 2 * kv * b_a + rows * FED_TOKENS * d * b_a
        kl = n * V * 4
        add("v* activations", graph + caches + kl,
            f"{graph_tokens} tokens (≤ v_chunk_tokens {chunk}) × {above} blocks × (8d+4m) × {b_a} B "
            f"+ {rows} rows × ({PREFIX_TOKENS}·L·2·kv + {FED_TOKENS}·d) × {b_a} B caches + n·V × 4 B")
    elif spec.edits_model and (kind is not None or solver == "ft"):
        micro = int(hp.get("ultra_micro_batch", n)) if kind == "ultraedit" else (1 if kind else n)
        tokens = max(1, min(micro, n)) * ROW_TOKENS
        add("edit activations", tokens * L * per_token_block * b_w + tokens * V * 8,
            f"{tokens} tokens × {L} blocks × (8d+4m) × {b_w} B + tokens × V × 8 B (logits, loss)")

    eval_b = int(eval_batch_size)
    add("evaluation", eval_b * EVAL_LOGIT_TOKENS * V * (b_w + 8) + eval_b * EVAL_TOKENS * (2 * d + 2 * m) * b_w,
        f"{eval_b} rows × ({EVAL_LOGIT_TOKENS} × V × ({b_w}+8) B logits + {EVAL_TOKENS} × (2d+2m) × {b_w} B)")
    return plan


def check_budget(plan: MemoryPlan, budget: int, where: str, large_fraction: float = DEFAULT_LARGE_FRACTION) -> None:
    """Raise MemoryPlanError naming the total, the budget and every component of at least ``large_fraction`` of
    the total when the plan does not fit in ``budget`` bytes."""
    if plan.total <= budget:
        return
    big = [c for c in sorted(plan.components, key=lambda c: -c.bytes) if c.bytes >= large_fraction * plan.total]
    raise MemoryPlanError(
        f"{plan.model} ({plan.method}, batch {plan.batch_size}, weights {plan.dtype}, layers {plan.layers}) needs "
        f"about {format_bytes(plan.total)}, more than the {format_bytes(budget)} of {where}: "
        + ", ".join(f"{c.name} {format_bytes(c.bytes)}" for c in big)
        + ". Use a smaller batch, fewer layers or bf16 weights, a larger device, or raise model_args.max_memory "
          "if the estimate is too high for your setup")


# -- reading a configuration without weights ------------------------------------------------------------------------

def read_config_file(path: str | Path) -> dict:
    """config.json (or a model folder holding one) as a dict."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MemoryPlanError(f"cannot read a model configuration from {path}: {err}") from err


def load_model_config(name_or_path: str, cache_dir: Path | None = None):
    """The configuration of a model as a trial names it (hub id, local folder, embedded name), weights not read: a
    local folder's config.json, an embedded model's converted folder, else the Hugging Face cache (offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() or path.suffix == ".json":
        return read_config_file(path)
    from methods.infra.models import EMBEDDED_MODELS, model_folder

    if name_or_path in EMBEDDED_MODELS:  # converted into the cache once (the trial's load needs it next anyway)
        return read_config_file(model_folder(name_or_path, cache_dir))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise MemoryPlanError(f"cannot read the configuration of {name_or_path!r} (not a local folder; hub ids need "
                              f"network or a filled Hugging Face cache): {err}") from err


# -- command line ---------------------------------------------------------------------------------------------------

def method_spec(method: str, hparams: dict | None = None):
    """A preset's MethodSpec (configs/presets/<method>.yaml over the stage registry's defaults), read without the
    grid package: the same resolution as grid/config.py ``method_settings`` for plain presets."""
    from dataclasses import replace

    import yaml

    from methods.stages import LOCATE_THEN_EDIT, NO_SOLVER, REQUIRED, MethodSpec

    path = Path(__file__).resolve().parents[2] / "configs" / "presets" / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise MemoryPlanError(f"method {method!r} has no preset {path} (known: {', '.join(known)})")
    preset = yaml.safe_load(path.read_text()) or {}
    editor = preset.get("editor", LOCATE_THEN_EDIT)
    spec = MethodSpec(solver=preset.get("solver", method if editor == LOCATE_THEN_EDIT else NO_SOLVER),
                      editor=editor, transforms=tuple(preset.get("transforms") or ()),
                      restraint=preset.get("restraint"), retrieval=preset.get("retrieval"))
    defaults = {k: v for k, v in spec.defaults().items() if v is not REQUIRED}
    return replace(spec, hparams={**defaults, **(preset.get("hparams") or {}), **(hparams or {})})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m methods.infra.memory_plan",
                                     description="Print a trial's memory plan from a model configuration (no weights).")
    parser.add_argument("--config", required=True,
                        help="config.json, a model folder, an embedded model name or a cached hub id")
    parser.add_argument("--method", default="memit", help="a preset name (configs/presets)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="the weights' dtype (float32, bfloat16, float16)")
    parser.add_argument("--layers", type=int, nargs="+", help="edited layers (default: the method's/architecture's)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-memory", help="a budget, e.g. 40GB: exit 1 with the refusal when the plan exceeds it")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        spec = method_spec(args.method)
        config = load_model_config(args.config)
        plan = plan_memory(config, spec, batch_size=args.batch_size, dtype=args.dtype, layers=args.layers,
                           eval_batch_size=args.eval_batch_size, model=str(args.config), method=args.method)
        print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.table())
        if args.max_memory:
            check_budget(plan, parse_size(args.max_memory), f"--max-memory {args.max_memory}")
    except MemoryPlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
