"""Shared fixtures: the real SmolLM2 tokenizer/model (loaded offline from the embedded package) and tiny random
Llama / GPT-2 models that reuse that tokenizer, for fast math tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smol_folder() -> str:
    from methods.infra.models import model_folder
    return model_folder("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_folder):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smol_folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (LoadedModel). Tests that edit it must restore the weights they change."""
    from methods.infra.models import load_model
    return load_model("smollm2-135m")


@pytest.fixture
def one_thread():
    """Tiny models run much faster on one thread than on a contended pool; the setting is restored afterwards.
    A test module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_llama(smol_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=smol_tokenizer.pad_token_id, tie_word_embeddings=True)
    return _freeze(LlamaForCausalLM(cfg))


@pytest.fixture(scope="session")
def tiny_gpt2(smol_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(smol_tokenizer), n_embd=64, n_layer=4, n_head=4, n_positions=256,
                     pad_token_id=smol_tokenizer.pad_token_id)
    return _freeze(GPT2LMHeadModel(cfg))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny random Llama saved as a model folder (with SmolLM2's tokenizer), for trials and scripts that load a
    model by path."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=smol_tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A short plain-text statistics corpus (one document per blank-line-separated block)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(f"Document {i}: the city of Paris is the capital of France, and the river "
                                  f"Seine runs through it; Tokyo is in Japan and Rome is in Italy. Number {i * 7}."
                                  for i in range(200)))
    return path
