"""The stage registry: which hyper-parameters each stage takes, their valid ranges, and how to build it.

A method preset (configs/presets/*.yaml) names a solver and gives hyper-parameters; every key must belong to one
of the stages the method uses. Checked before any model is loaded, so a typo or an impossible value fails fast.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from methods.solvers.alphaedit import AlphaEditSolver
from methods.solvers.memit import MemitSolver
from methods.targets import TargetHParams


@dataclass(frozen=True)
class Param:
    kind: type | tuple[type, ...]
    check: Callable[[Any], bool] | None = None
    rule: str = ""


def _positive(value) -> bool:
    return value > 0


def _unit(value) -> bool:
    return 0 < value < 1


TARGET_PARAMS: dict[str, Param] = {
    "target_site": Param(str, lambda v: v in ("block", "mlp"), "one of block, mlp"),
    "v_lr": Param((int, float), _positive, "> 0"),
    "v_num_grad_steps": Param(int, lambda v: v >= 1, ">= 1"),
    "clamp_norm_factor": Param((int, float), _positive, "> 0"),
    "kl_factor": Param((int, float), lambda v: v >= 0, ">= 0"),
    "v_weight_decay": Param((int, float), lambda v: v >= 0, ">= 0"),
    "early_stop_loss": Param((int, float), lambda v: v >= 0, ">= 0"),
}
COMMON_PARAMS: dict[str, Param] = {
    "layers": Param((list, type(None)), lambda v: v is None or (len(v) > 0 and all(isinstance(x, int) and x >= 0
                                                                                    for x in v)
                                                                 and len(set(v)) == len(v)),
                    "a non-empty list of distinct layer indices >= 0, or null for the architecture default"),
}
SOLVER_PARAMS: dict[str, dict[str, Param]] = {
    "memit": {
        "mom2_update_weight": Param((int, float, type(None)), lambda v: v is None or v > 0, "> 0 or null"),
        "mom2_update_weight_per_key_dim": Param((int, float), _positive, "> 0"),
    },
    "alphaedit": {
        "l2": Param((int, float), _positive, "> 0"),
        "nullspace_mode": Param(str, lambda v: v in ("absolute", "energy"), "one of absolute, energy"),
        "nullspace_threshold": Param((int, float), _positive, "> 0"),
        "nullspace_energy": Param((int, float), _unit, "in (0, 1)"),
    },
}
SOLVERS = {"memit": MemitSolver, "alphaedit": AlphaEditSolver}


def hparam_problems(solver: str, hparams: dict, where: str = "hparams") -> list[str]:
    """Every problem with a method's hyper-parameters, as messages naming the key and the value."""
    if solver not in SOLVER_PARAMS:
        return [f"solver {solver!r} is unknown (known: {', '.join(sorted(SOLVER_PARAMS))})"]
    allowed = {**TARGET_PARAMS, **COMMON_PARAMS, **SOLVER_PARAMS[solver]}
    problems = []
    for key, value in hparams.items():
        param = allowed.get(key)
        if param is None:
            problems.append(f"{where}.{key}: unknown for solver {solver!r} (allowed: {', '.join(sorted(allowed))})")
            continue
        kinds = param.kind if isinstance(param.kind, tuple) else (param.kind,)
        type_ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not type_ok or (param.check is not None and not param.check(value)):
            problems.append(f"{where}.{key}: {value!r} is invalid (must be {param.rule or kinds})")
    return problems


def build_target_hparams(hparams: dict) -> TargetHParams:
    names = {f.name for f in fields(TargetHParams)}
    return TargetHParams(**{k: v for k, v in hparams.items() if k in names})


def build_solver(solver: str, hparams: dict):
    keys = SOLVER_PARAMS[solver]
    return SOLVERS[solver](**{k: v for k, v in hparams.items() if k in keys})
