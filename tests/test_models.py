"""Model loading (local folders, embedded names, errors) and the architecture table."""

from __future__ import annotations

import pytest
import torch

from methods.infra.arch import ArchitectureError, EditableModel, default_layer_window
from methods.infra.models import ModelLoadError, load_model, resolve_dtype


@pytest.fixture()
def gpt2_folder(tiny_gpt2, smol_tokenizer, tmp_path):
    folder = tmp_path / "tiny-gpt2"
    tiny_gpt2.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def test_local_folder_loads_frozen_with_a_stable_fingerprint(gpt2_folder, tiny_gpt2):
    first = load_model(str(gpt2_folder), device="cpu")
    second = load_model(str(gpt2_folder), device="cpu")
    assert first.fingerprint == second.fingerprint
    assert not any(p.requires_grad for p in first.model.parameters())
    assert torch.equal(first.model.transformer.h[1].mlp.c_proj.weight, tiny_gpt2.transformer.h[1].mlp.c_proj.weight)
    first.model.transformer.h[1].mlp.c_proj.weight.data[0, 0] += 1.0
    from methods.infra.models import weights_fingerprint
    assert weights_fingerprint(first.model) != second.fingerprint  # the key follows the weights, not the name


def test_gpt2_conv1d_is_seen_transposed_and_llama_linear_as_is(tiny_gpt2, tiny_llama):
    gpt2 = EditableModel.wrap(tiny_gpt2)
    assert gpt2.is_transposed(0) and gpt2.weight(0).shape == (64, 256)  # d × m although Conv1D stores m × d
    llama = EditableModel.wrap(tiny_llama)
    assert not llama.is_transposed(0) and llama.weight(0).shape == (64, 96)
    assert llama.mlp_out_name(2) == "model.layers.2.mlp.down_proj"


def test_default_layers_come_from_the_table_or_a_depth_rule(smollm2):
    assert EditableModel.wrap(smollm2.model).default_layers() == (3, 4, 5, 6, 7)
    assert default_layer_window(4) == (0, 1, 2, 3)  # shallow models: the window shrinks to fit
    assert default_layer_window(48) == (6, 7, 8, 9, 10)


def test_unknown_architecture_asks_for_module_paths(tiny_llama, monkeypatch):
    monkeypatch.setattr(tiny_llama.config, "model_type", "mystery")
    with pytest.raises(ArchitectureError, match="model_args.blocks"):
        EditableModel.wrap(tiny_llama)
    wrapped = EditableModel.wrap(tiny_llama, blocks="model.layers", mlp="mlp", mlp_out="mlp.down_proj")
    assert wrapped.weight(1).shape == (64, 96)


def test_missing_model_and_unknown_dtype_are_clear_errors_and_half_precision_runs_on_cpu(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(ModelLoadError, match="is not one of"):
        resolve_dtype("float8", torch.device("cpu"))
    # bf16 weights on CPU: the GPU users' precision path, tested here (tests/test_bf16_path.py)
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
