"""Where the text for the second-moment statistics comes from (docs/methods.md, "Statistics").

The papers use Wikipedia, which cannot be downloaded here, so the corpus is a setting, parsed from one string:

* ``"model-samples"`` (offline default): text sampled from the model itself, from a fixed list of plain-text
  starters. Options may follow a colon: ``"model-samples:top_k=50,temperature=1.0,new_tokens=128,batch=32"``.
* a local ``.txt`` file (one document per line), a ``.jsonl`` file (per line, the string fields longer than 20
  characters, joined), a directory holding such files, or a glob of them (files in sorted order, documents
  taken from them in turn).
* ``"hf:<name>[:<config>][:<split>][:<text_field>]"``: a ``datasets`` hub dataset, streamed; needs the network.

``corpus_identity`` says what the text *is* (file contents, dataset coordinates, sampling settings and model), so
that cache keys change when the text changes and not when a file merely moves.

Model samples are generated in fixed chunks (``batch`` samples each), each chunk seeded from (seed, chunk index)
and cached on disk on its own. The sample stream is therefore the same whatever token count a caller asks for:
a request for 100k tokens reuses the chunks made for 50k and generates only the rest.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch

from methods.infra.cache import cached_path, content_key, default_cache_dir, hub_offline

MODEL_SAMPLES = "model-samples"
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".jsonl")
JSONL_MIN_FIELD_CHARS = 20  # shorter string fields are labels, ids or subjects, not running text
READER_VERSION = 2  # bump when the way files are turned into documents changes (it is part of the identity)

# Plain-text beginnings of many genres, so that sampled text covers more than one register.
SAMPLE_STARTERS: tuple[str, ...] = (
    "The", "In 1998,", "Scientists", "The city of", "A recipe for", "According to", "When I was", "The history of",
    "In the morning", "Researchers at the University of", "The best way to", "Yesterday", "It is widely believed",
    "The company announced", "Once upon a time", "In mathematics,", "The river", "During the war,", "My favorite",
    "The government", "How to", "Football", "The album", "In this article, we", "The patient", "Music is",
    "The following", "A new study shows", "The population of", "He was born in", "She said that", "Water",
    "The main reason", "In computer science,", "The museum", "Many people think", "The president of",
    "On Monday,", "The novel", "Climate change", "The first time", "Students who", "The law",
)


class CorpusError(ValueError):
    """A corpus setting that cannot be used (missing file, bad format, hub needed while offline)."""


@dataclass(frozen=True)
class SampleSettings:
    """How model samples are drawn. Every field changes the text, so all of them enter the corpus identity."""

    top_k: int = 50
    temperature: float = 1.0
    new_tokens: int = 128  # new tokens per sample (fewer when the model ends a sample with its EOS token)
    batch: int = 32  # samples per generated (and cached) chunk; part of the identity since batching changes samples

    def __post_init__(self):
        if self.top_k < 1 or self.new_tokens < 1 or self.batch < 1 or not self.temperature > 0:
            raise CorpusError(f"model-samples settings must be positive: {self}")


@dataclass(frozen=True)
class CorpusSpec:
    """A parsed corpus setting. ``source`` keeps the string it came from (for logs, never for cache keys)."""

    kind: str  # "model-samples" | "files" | "hf"
    source: str
    files: tuple[Path, ...] = ()
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_text_field: str = "text"
    sampling: SampleSettings | None = None


def parse_corpus(spec: str) -> CorpusSpec:
    """Parse a corpus setting (see the module docstring); files are resolved and checked now."""
    if not isinstance(spec, str) or not spec.strip():
        raise CorpusError(f"corpus setting must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec == MODEL_SAMPLES or spec.startswith(MODEL_SAMPLES + ":"):
        return CorpusSpec(kind="model-samples", source=spec, sampling=_parse_sample_options(spec))
    if spec.startswith(HF_PREFIX):
        return _parse_hf(spec)
    return CorpusSpec(kind="files", source=spec, files=_resolve_files(spec))


def _parse_sample_options(spec: str) -> SampleSettings:
    options = spec[len(MODEL_SAMPLES) + 1:]
    if not options:
        return SampleSettings()
    types = {f.name: f.type for f in fields(SampleSettings)}
    values = {}
    for item in options.split(","):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in types:
            raise CorpusError(f"corpus {spec!r}: option {item!r} is not one of {', '.join(f'{n}=...' for n in types)}")
        try:
            values[name] = float(raw) if types[name] in (float, "float") else int(raw)
        except ValueError:
            raise CorpusError(f"corpus {spec!r}: option {name} needs a number, got {raw!r}") from None
    return SampleSettings(**values)


def _parse_hf(spec: str) -> CorpusSpec:
    parts = spec[len(HF_PREFIX):].split(":")
    if len(parts) > 4 or not parts[0]:
        raise CorpusError(f"corpus {spec!r}: expected hf:<name>[:<config>][:<split>][:<text_field>]")
    parts += [""] * (4 - len(parts))
    name, config, split, text_field = parts
    return CorpusSpec(kind="hf", source=spec, hf_name=name, hf_config=config or None, hf_split=split or "train",
                      hf_text_field=text_field or "text")


def _resolve_files(spec: str) -> tuple[Path, ...]:
    path = Path(spec).expanduser()
    if any(char in spec for char in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix in TEXT_SUFFIXES]
        if not files:
            raise CorpusError(f"corpus glob {spec!r} matches no {'/'.join(TEXT_SUFFIXES)} file")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"corpus directory {path} holds no {'/'.join(TEXT_SUFFIXES)} file")
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise CorpusError(f"corpus file {path} must end in {' or '.join(TEXT_SUFFIXES)}")
        files = [path]
    else:
        raise CorpusError(f"corpus file {path} does not exist (expected {MODEL_SAMPLES!r}, hf:<name>..., or a "
                          f"{'/'.join(TEXT_SUFFIXES)} file, directory or glob)")
    return tuple(p.resolve() for p in files)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def corpus_identity(spec: CorpusSpec, model_fingerprint: str | None = None, seed: int = 0) -> dict:
    """What the corpus text is, for cache keys: file contents (not paths), dataset coordinates, or the sampling
    settings, seed and model fingerprint of model samples."""
    if spec.kind == "files":
        return {"kind": "files", "reader": READER_VERSION,
                "files": [{"sha256": _file_sha256(p), "format": p.suffix.lstrip(".")} for p in spec.files]}
    if spec.kind == "hf":
        return {"kind": "hf", "name": spec.hf_name, "config": spec.hf_config, "split": spec.hf_split,
                "text_field": spec.hf_text_field}
    if spec.kind == "model-samples":
        if not model_fingerprint:
            raise CorpusError("the model-samples corpus needs the model's fingerprint for its identity")
        return {"kind": "model-samples", "model": model_fingerprint, "seed": int(seed),
                "settings": asdict(spec.sampling or SampleSettings()), "starters": _starters_digest()}
    raise CorpusError(f"unknown corpus kind {spec.kind!r}")


def _starters_digest() -> str:
    return hashlib.sha256("\n".join(SAMPLE_STARTERS).encode()).hexdigest()[:16]


def iter_corpus_texts(spec: CorpusSpec, model: torch.nn.Module | None = None, tokenizer=None, seed: int = 0,
                      model_fingerprint: str | None = None, cache_dir: Path | None = None,
                      progress: bool = True) -> Iterator[str]:
    """Yield the corpus documents in a fixed order. Model samples form an endless stream: stop iterating when
    enough text was read (chunks are generated, and cached, only as they are reached)."""
    if spec.kind == "files":
        yield from _interleave([_read_file(path) for path in spec.files])
    elif spec.kind == "hf":
        yield from _read_hub_dataset(spec)
    elif spec.kind == "model-samples":
        if model is None or tokenizer is None:
            raise CorpusError("the model-samples corpus needs the model and its tokenizer")
        fingerprint = model_fingerprint
        if not fingerprint:
            from methods.infra.models import weights_fingerprint
            fingerprint = weights_fingerprint(model)
        yield from _iter_model_samples(model, tokenizer, spec.sampling or SampleSettings(), seed, fingerprint,
                                       Path(cache_dir) if cache_dir else default_cache_dir(), progress)
    else:
        raise CorpusError(f"unknown corpus kind {spec.kind!r}")


def _interleave(streams: list[Iterator[str]]) -> Iterator[str]:
    """One document from each file in turn, until all are exhausted: a token budget smaller than the corpus then
    still draws on every file (a folder of task files is usually sorted by task)."""
    active = list(streams)
    while active:
        still_active = []
        for stream in active:
            document = next(stream, None)
            if document is not None:
                yield document
                still_active.append(stream)
        active = still_active


def _read_file(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            for line_number, line in enumerate(fh, 1):
                if path.suffix == ".jsonl":
                    text = _jsonl_document(line, path, line_number)
                else:
                    text = line.strip()
                if text:
                    yield text
    except UnicodeDecodeError as err:
        raise CorpusError(f"corpus file {path} is not UTF-8 text: {err}") from err


def _jsonl_document(line: str, path: Path, line_number: int) -> str:
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise CorpusError(f"corpus file {path}, line {line_number}: not valid JSON ({err})") from err
    values = record.values() if isinstance(record, dict) else [record]
    return "\n".join(v.strip() for v in values if isinstance(v, str) and len(v.strip()) > JSONL_MIN_FIELD_CHARS)


def _read_hub_dataset(spec: CorpusSpec) -> Iterator[str]:
    if hub_offline():
        raise CorpusError(f"corpus {spec.source!r} streams a Hugging Face hub dataset, but the hub is switched off "
                          "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); use 'model-samples' or a local text file")
    import datasets

    try:
        dataset = datasets.load_dataset(spec.hf_name, spec.hf_config, split=spec.hf_split, streaming=True)
        records = iter(dataset)
        first = next(records, None)
    except Exception as err:  # network, unknown name or config: all end the same way for the user
        raise CorpusError(f"corpus {spec.source!r}: cannot load dataset {spec.hf_name!r} (config {spec.hf_config!r}, "
                          f"split {spec.hf_split!r}): {err}") from err
    if first is None:
        return
    if spec.hf_text_field not in first:
        raise CorpusError(f"corpus {spec.source!r}: records have no field {spec.hf_text_field!r} "
                          f"(fields: {', '.join(first)})")
    for record in itertools.chain([first], records):
        text = record[spec.hf_text_field]
        if isinstance(text, str) and text.strip():
            yield text.strip()


# --- model samples -------------------------------------------------------------------------------------------


def _iter_model_samples(model, tokenizer, settings: SampleSettings, seed: int, fingerprint: str, cache_dir: Path,
                        progress: bool) -> Iterator[str]:
    bar = None  # one bar over all chunks this call generates, opened only if one has to be generated

    def build(tmp: Path, chunk_index: int, description: dict) -> None:
        nonlocal bar
        if bar is None and progress:
            from tqdm.auto import tqdm
            bar = tqdm(desc="sampling the statistics corpus from the model", unit="tok")
        texts, generated = sample_chunk(model, tokenizer, settings, seed, chunk_index, bar)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"description": description, "generated_tokens": generated, "texts": texts}, fh)

    chunk_index = 0
    try:
        while True:
            description = {"what": "model-samples chunk", "model": fingerprint, "seed": int(seed),
                           "chunk": chunk_index, "settings": asdict(settings), "starters": _starters_digest()}
            path = cached_path(cache_dir, "corpus", content_key(description),
                               lambda tmp: build(tmp, chunk_index, description), suffix=".json")
            with open(path, encoding="utf-8") as fh:
                yield from json.load(fh)["texts"]
            chunk_index += 1
    finally:
        if bar is not None:
            bar.close()


def _chunk_seed(seed: int, chunk_index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{chunk_index}".encode()).digest()[:7], "big")


def sample_chunk(model, tokenizer, settings: SampleSettings, seed: int, chunk_index: int,
                 progress_bar=None) -> tuple[list[str], int]:
    """Generate one chunk of ``settings.batch`` samples; returns (texts, number of generated tokens).

    ``progress_bar`` (a tqdm bar) advances by the batch size at every decoding step."""
    from transformers import GenerationConfig

    starters = [SAMPLE_STARTERS[(chunk_index * settings.batch + i) % len(SAMPLE_STARTERS)]
                for i in range(settings.batch)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise CorpusError("model-samples: the tokenizer has neither a pad nor an EOS token to pad starters with")
    # Left padding built by hand so that the caller's tokenizer object is not changed.
    encoded = [tokenizer(s)["input_ids"] for s in starters]
    width = max(len(ids) for ids in encoded)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    eos_id = tokenizer.eos_token_id
    # Every sampling setting is explicit: values left unset would be filled from the model's generation_config.
    generation = GenerationConfig(do_sample=True, top_k=settings.top_k, top_p=1.0, temperature=settings.temperature,
                                  repetition_penalty=1.0, max_new_tokens=settings.new_tokens,
                                  min_new_tokens=0, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id)
    streamer = _StepProgress(progress_bar, settings.batch) if progress_bar is not None else None
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # leave the caller's RNG state alone
            torch.manual_seed(_chunk_seed(seed, chunk_index))
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation,
                                    streamer=streamer)
    finally:
        model.train(was_training)
    texts, generated = [], 0
    for starter, row in zip(starters, output[:, width:].tolist()):
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        generated += len(row)
        texts.append(starter + tokenizer.decode(row, skip_special_tokens=True))
    return texts, generated


class _StepProgress:
    """A generate() streamer that advances a tqdm bar per decoding step (its first put() is the prompt)."""

    def __init__(self, bar, tokens_per_step: int):
        self._bar = bar
        self._tokens_per_step = tokens_per_step
        self._seen_prompt = False

    def put(self, value):
        if self._seen_prompt:
            self._bar.update(self._tokens_per_step)
        self._seen_prompt = True

    def end(self):
        pass
