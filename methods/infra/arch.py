"""Where to edit in a model: a small per-architecture table, decided by ``config.model_type`` and module types.

Notation (docs/methods.md): the edited matrix W ∈ R^{d×m} maps an MLP key (the input of the MLP output projection,
width m) to a value in the residual stream (width d): value = W·key. ``nn.Linear`` stores exactly that
(``weight`` is [out=d, in=m]); GPT-2's ``Conv1D`` stores the transpose. The orientation is read off the module's
type, never off the model's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Module paths for one architecture family.

    ``blocks`` is the attribute path of the ModuleList of transformer blocks; ``mlp`` and ``mlp_out`` are paths
    inside one block. ``default_layers`` maps the model's depth to the layers edited when the config names none.
    """

    blocks: str
    mlp: str
    mlp_out: str
    default_layers: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # A normalisation applied to the MLP's output before the residual add (Gemma 2/3), inside one block; None when
    # the MLP output joins the residual stream as is. Solvers aiming at the block output rescale through it
    # (methods/residual_space.py).
    mlp_post_norm: str | None = None


_LLAMA_LIKE = dict(blocks="model.layers", mlp="mlp", mlp_out="mlp.down_proj")

# Default layers: the published tables where a paper has one (GPT-2 XL 13–17, GPT-J 3–8, Llama-3-8B 4–8), and
# for the embedded models the window chosen by causal tracing (docs/methods.md "How the default layers were chosen"):
# SmolLM2-135M (llama, 30 layers) 3–7, Gemma-3-270M (gemma3_text, 18 layers) 1–5.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(**_LLAMA_LIKE, default_layers={32: (4, 5, 6, 7, 8), 30: (3, 4, 5, 6, 7)}),
    "mistral": ArchSpec(**_LLAMA_LIKE),
    "qwen2": ArchSpec(**_LLAMA_LIKE),
    "qwen3": ArchSpec(**_LLAMA_LIKE),
    "gemma": ArchSpec(**_LLAMA_LIKE),
    "gemma2": ArchSpec(**_LLAMA_LIKE, mlp_post_norm="post_feedforward_layernorm"),
    "gemma3_text": ArchSpec(**_LLAMA_LIKE, default_layers={18: (1, 2, 3, 4, 5)},  # text-only Gemma3ForCausalLM
                            mlp_post_norm="post_feedforward_layernorm"),
    "olmo": ArchSpec(**_LLAMA_LIKE),
    "olmo2": ArchSpec(**_LLAMA_LIKE),
    "phi3": ArchSpec(**_LLAMA_LIKE),
    "gpt2": ArchSpec(blocks="transformer.h", mlp="mlp", mlp_out="mlp.c_proj", default_layers={48: (13, 14, 15, 16, 17)}),
    "gptj": ArchSpec(blocks="transformer.h", mlp="mlp", mlp_out="mlp.fc_out", default_layers={28: (3, 4, 5, 6, 7, 8)}),
    "gpt_neox": ArchSpec(blocks="gpt_neox.layers", mlp="mlp", mlp_out="mlp.dense_4h_to_h"),
}


class ArchitectureError(ValueError):
    """The model's architecture is not in the table and no module paths were configured."""


def _get_path(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def default_layer_window(num_layers: int) -> tuple[int, ...]:
    """Fallback for depths without a measured table entry: five layers starting at ~13% of the depth.

    Causal tracing on the models with published tables puts the MLP's indirect effect peak in the lower third of
    the network (GPT-2 XL 13–17 of 48, GPT-J 3–8 of 28, Llama-3-8B 4–8 of 32).
    """
    width = min(5, num_layers)
    start = min(max(1, round(0.13 * num_layers)), num_layers - width)
    return tuple(range(start, start + width))


def _is_transposed(module: nn.Module, name: str) -> bool:
    """Whether ``module`` stores its matrix as Wᵀ (GPT-2's Conv1D: [in, out]); an error for non-linear maps."""
    if isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight [nx=in, nf=out]
        return True
    raise ArchitectureError(f"{name} is a {type(module).__name__}, expected nn.Linear or Conv1D")


def _matrix_view(module: nn.Module, name: str) -> torch.Tensor:
    param = module.weight.detach()
    return param.t() if _is_transposed(module, name) else param


@dataclass
class EditableModel:
    """A causal LM plus the module paths the editing stages need.

    ``weight(layer)`` returns the edited matrix as a d×m tensor *view* of the stored parameter, so that in-place
    updates through it change the model.
    """

    model: nn.Module
    spec: ArchSpec

    @classmethod
    def wrap(cls, model: nn.Module, blocks: str | None = None, mlp: str | None = None, mlp_out: str | None = None):
        model_type = getattr(model.config, "model_type", None)
        spec = ARCHITECTURES.get(model_type)
        if blocks or mlp or mlp_out:
            base = spec or ArchSpec(blocks="", mlp="", mlp_out="")
            spec = ArchSpec(blocks=blocks or base.blocks, mlp=mlp or base.mlp, mlp_out=mlp_out or base.mlp_out,
                            default_layers=base.default_layers)
        if spec is None or not (spec.blocks and spec.mlp and spec.mlp_out):
            raise ArchitectureError(
                f"model_type {model_type!r} is not in methods/infra/arch.py's table ({', '.join(sorted(ARCHITECTURES))}); "
                "set model_args.blocks, model_args.mlp and model_args.mlp_out in the config "
                "(e.g. blocks=model.layers, mlp=mlp, mlp_out=mlp.down_proj)")
        editable = cls(model=model, spec=spec)
        editable.mlp_out(0)  # fail now, with the paths in the message, if they are wrong
        return editable

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def blocks(self) -> nn.ModuleList:
        return _get_path(self.model, self.spec.blocks)

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def mlp(self, layer: int) -> nn.Module:
        return _get_path(self.block(layer), self.spec.mlp)

    def mlp_out(self, layer: int) -> nn.Module:
        try:
            return _get_path(self.block(layer), self.spec.mlp_out)
        except (AttributeError, IndexError) as err:
            raise ArchitectureError(
                f"cannot find the MLP output projection {self.spec.blocks}[{layer}].{self.spec.mlp_out} "
                f"in {type(self.model).__name__}: {err}") from err

    def mlp_post_norm(self, layer: int) -> nn.Module | None:
        """The normalisation between the MLP output and the residual add, or None (see ArchSpec)."""
        if self.spec.mlp_post_norm is None:
            return None
        return _get_path(self.block(layer), self.spec.mlp_post_norm)

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.spec.blocks}.{layer}.{self.spec.mlp_out}"

    def is_transposed(self, layer: int) -> bool:
        """True when the stored weight is Wᵀ (GPT-2's Conv1D stores [in, out])."""
        return _is_transposed(self.mlp_out(layer), self.mlp_out_name(layer))

    def weight(self, layer: int) -> torch.Tensor:
        """The edited matrix W (d×m) as a view of the parameter. A ``detach()`` view, not ``.data``: in-place edits
        through it advance the parameter's version counter, by which derived copies (methods/infra/cpu_linear.py's packed
        weights) notice that the weight changed."""
        return _matrix_view(self.mlp_out(layer), self.mlp_out_name(layer))

    # -- other matrices of the MLP (editors that write more than the output projection, e.g. UltraEdit's gate/up) --

    def mlp_child_name(self, layer: int, child: str) -> str:
        return f"{self.spec.blocks}.{layer}.{self.spec.mlp}.{child}"

    def mlp_child(self, layer: int, child: str) -> nn.Module:
        """The linear map at ``child`` (a path inside the MLP, e.g. ``gate_proj``) of block ``layer``."""
        try:
            module = _get_path(self.mlp(layer), child)
        except (AttributeError, IndexError) as err:
            children = ", ".join(name for name, m in self.mlp(layer).named_modules()
                                 if name and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"))
            raise ArchitectureError(f"{self.mlp_child_name(layer, child)} does not exist in "
                                    f"{type(self.model).__name__}; the MLP's linear maps are: {children}") from err
        _is_transposed(module, self.mlp_child_name(layer, child))  # refuse anything but a linear map
        return module

    def mlp_child_weight(self, layer: int, child: str) -> torch.Tensor:
        """The matrix (out×in) of ``mlp_child(layer, child)``, a view of its parameter like ``weight``."""
        return _matrix_view(self.mlp_child(layer, child), self.mlp_child_name(layer, child))

    def key_dim(self, layer: int) -> int:
        return self.weight(layer).shape[1]

    def value_dim(self, layer: int) -> int:
        return self.weight(layer).shape[0]

    def default_layers(self) -> tuple[int, ...]:
        return self.spec.default_layers.get(self.num_layers) or default_layer_window(self.num_layers)

    def parameter_device(self) -> torch.device:
        return next(self.model.parameters()).device
