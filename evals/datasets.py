"""Dataset loaders: every supported file layout is mapped to the one record type, ``EditRecord`` (evals/records.py).

Supported layouts (detected from the keys of the first record; ``LAYOUTS`` lists them):

* ``counterfact``: CounterFact as EasyEdit ships it (``prompt, subject, target_new, ground_truth, rephrase_prompt,
  locality_prompt, locality_ground_truth``); probability protocol.
* ``counterfact-memit``: the original MEMIT ``multi_counterfact.json`` (``requested_rewrite{prompt with "{}", subject,
  target_new{str}, target_true{str}}, paraphrase_prompts, neighborhood_prompts, generation_prompts``); probability.
* ``zsre``: zsRE as prepared for MEND (``subject, src, alt, answers/pred, rephrase, loc, loc_ans``); token accuracy.
* ``knowedit-zsre`` and ``knowedit-wiki_counterfact``: KnowEdit (``subject, prompt, target_new, ground_truth,
  rephrase_prompt | rephrase, locality{...}, portability{...}``); token accuracy.

Sources: a local ``.json`` (a list of records) or ``.jsonl`` file, ``"builtin"`` (evals/data/builtin_edits.json), or
``hf:<dataset name>[:<config>][:<split>]`` for a Hugging Face hub dataset (needs network unless it is cached).

Every problem with the data raises ``DatasetError`` naming the file, the record index and the field. Records that
are well-formed but cannot be scored (an empty new target, or a CounterFact edit whose new target equals the true
one) are skipped with a ``DatasetWarning``: two of the 1000 records of the MEND zsRE file have an empty ``alt``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.records import EditRecord, PromptCase, Protocol
from methods.infra.cache import hub_offline

BUILTIN_NAME = "builtin"
BUILTIN_EDITS_PATH = Path(__file__).resolve().parent / "data" / "builtin_edits.json"
HUB_PREFIX = "hf:"

# Values of load_records(format=...) besides "auto"; "counterfact" covers both CounterFact layouts, "knowedit" both
# KnowEdit subsets.
DATASET_FORMATS: tuple[str, ...] = ("counterfact", "zsre", "knowedit")


class DatasetError(ValueError):
    """A dataset that cannot be turned into EditRecords; the message names the file, record index and field."""


class DatasetWarning(UserWarning):
    """Some well-formed records could not be scored and were skipped."""


class _UnusableRecord(Exception):
    """A well-formed record that no protocol can score (e.g. empty new target); load_records skips it."""


@dataclass(frozen=True)
class _Where:
    """Where a record came from, so that every error can say so."""

    origin: str  # file path or hub spec
    index: int  # position of the record in the file (offset included)

    def error(self, field: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.origin}: record {self.index}: field '{field}' {problem}")


def _describe(value: Any) -> str:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{type(value).__name__} {shown}"


# ----------------------------------------------------------------------------------------------- field readers

def _require(where: _Where, mapping: Mapping, key: str, path: str | None = None) -> Any:
    """``mapping[key]``; ``path`` is the field as errors name it (default: the key itself)."""
    # None counts as absent: hub datasets fill keys that some rows lack with nulls.
    if key not in mapping or mapping[key] is None:
        raise where.error(path or key, f"is missing (present: {sorted(mapping)})")
    return mapping[key]


def _text(where: _Where, value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise where.error(path, f"must be a string, got {_describe(value)}")
    text = value.strip()
    if not text:
        raise where.error(path, "is an empty string")
    return text


def _required_text(where: _Where, mapping: Mapping, key: str, path: str | None = None) -> str:
    return _text(where, _require(where, mapping, key, path), path or key)


def _texts(where: _Where, value: Any, path: str) -> tuple[str, ...]:
    """A string or a list of strings (both occur in the wild for paraphrase and locality prompts)."""
    if isinstance(value, str):
        return (_text(where, value, path),)
    if isinstance(value, list):
        return tuple(_text(where, item, f"{path}[{i}]") for i, item in enumerate(value))
    raise where.error(path, f"must be a string or a list of strings, got {_describe(value)}")


def _aliases(where: _Where, value: Any, path: str) -> tuple[str, ...]:
    """Normalise a ground truth to a tuple of accepted answers, the canonical one first.

    Shapes seen: ``"Paris"``, ``["Paris", ...]`` (ZsRE: several accepted answers) and ``[["Syrian pound", "SYP"],
    [...]]`` (WikiData: one alias list per correct answer). Alias lists are flattened in order, duplicates dropped.
    """
    if isinstance(value, str):
        candidates = [(value, path)]
    elif isinstance(value, list):
        candidates = []
        for i, item in enumerate(value):
            if isinstance(item, list):
                candidates.extend((alias, f"{path}[{i}][{j}]") for j, alias in enumerate(item))
            else:
                candidates.append((item, f"{path}[{i}]"))
    else:
        raise where.error(path, f"must be a string, a list of strings or a list of alias lists, got {_describe(value)}")
    answers: list[str] = []
    for candidate, candidate_path in candidates:
        answer = _text(where, candidate, candidate_path)
        if answer not in answers:
            answers.append(answer)
    if not answers:
        raise where.error(path, "holds no answer (empty list)")
    return tuple(answers)


def _new_target(where: _Where, value: Any, path: str) -> str:
    if isinstance(value, str) and not value.strip():
        raise _UnusableRecord(f"field '{path}' is empty")
    return _text(where, value, path)


def _paired_cases(where: _Where, prompts: Any, answers: Any, prompt_path: str, answer_path: str
                  ) -> tuple[PromptCase, ...]:
    """Prompts (one or a list) with their answers: one prompt takes ``answers`` as its aliases; a list of prompts
    takes either one shared string answer or a list with one answer (or alias list) per prompt."""
    prompt_texts = _texts(where, prompts, prompt_path)
    if isinstance(prompts, str) or isinstance(answers, str):
        shared = _aliases(where, answers, answer_path)
        return tuple(PromptCase(prompt, shared) for prompt in prompt_texts)
    if not isinstance(answers, list) or len(answers) != len(prompt_texts):
        raise where.error(answer_path, f"must be a string or a list with one answer per prompt of '{prompt_path}' "
                                       f"({len(prompt_texts)}), got {_describe(answers)}")
    return tuple(PromptCase(prompt, _aliases(where, answer, f"{answer_path}[{i}]"))
                 for i, (prompt, answer) in enumerate(zip(prompt_texts, answers)))


def _keyed_cases(where: _Where, value: Any, path: str) -> dict[str, tuple[PromptCase, ...]]:
    """KnowEdit ``locality`` / ``portability``: ``{sub_key: [{prompt, ground_truth}, ...]}``; empty sub-keys dropped
    so that averages over sub-keys never meet an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise where.error(path, f"must be an object mapping sub-keys to lists of {{prompt, ground_truth}}, "
                                f"got {_describe(value)}")
    by_key: dict[str, tuple[PromptCase, ...]] = {}
    for key, entries in value.items():
        key_path = f"{path}.{key}"
        if entries is None:
            continue
        if isinstance(entries, dict):  # a single entry written without its list
            entries = [entries]
        if not isinstance(entries, list):
            raise where.error(key_path, f"must be a list of {{prompt, ground_truth}} objects, got {_describe(entries)}")
        cases: list[PromptCase] = []
        for i, entry in enumerate(entries):
            entry_path = f"{key_path}[{i}]"
            if not isinstance(entry, dict):
                raise where.error(entry_path, f"must be an object with 'prompt' and 'ground_truth', "
                                              f"got {_describe(entry)}")
            cases.extend(_paired_cases(where, _require(where, entry, "prompt", f"{entry_path}.prompt"),
                                       _require(where, entry, "ground_truth", f"{entry_path}.ground_truth"),
                                       f"{entry_path}.prompt", f"{entry_path}.ground_truth"))
        if cases:
            by_key[key] = tuple(cases)
    return by_key


def _case_id(where: _Where, raw: Mapping) -> str:
    value = raw.get("case_id")
    if value is None:
        return str(where.index)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip():
        raise where.error("case_id", f"must be an integer or a non-empty string, got {_describe(value)}")
    return str(value).strip()


def _check_subject(where: _Where, subject: str, prompt: str, subject_path: str, prompt_path: str) -> None:
    # Editing methods locate the subject's tokens in the prompt, so it must occur literally.
    if subject not in prompt:
        raise where.error(subject_path, f"{subject!r} does not occur in the prompt ('{prompt_path}': {prompt!r})")


def _check_probability_targets(target_new: str, target_true: str) -> None:
    if target_new == target_true:
        raise _UnusableRecord(f"target_new equals target_true ({target_new!r}): the probability protocol cannot "
                              f"score it")


# ----------------------------------------------------------------------------------------------- layout mappers

def _from_counterfact(raw: Mapping, where: _Where, source: str) -> EditRecord:
    prompt = _required_text(where, raw, "prompt")
    subject = _required_text(where, raw, "subject")
    _check_subject(where, subject, prompt, "subject", "prompt")
    target_new = _new_target(where, _require(where, raw, "target_new"), "target_new")
    target_true = _aliases(where, _require(where, raw, "ground_truth"), "ground_truth")[0]
    _check_probability_targets(target_new, target_true)
    return EditRecord(
        case_id=_case_id(where, raw), source=source, protocol="probability", prompt=prompt, subject=subject,
        target_new=target_new, target_true=target_true,
        paraphrase_prompts=_texts(where, _require(where, raw, "rephrase_prompt"), "rephrase_prompt"),
        neighborhood=_paired_cases(where, _require(where, raw, "locality_prompt"),
                                   _require(where, raw, "locality_ground_truth"),
                                   "locality_prompt", "locality_ground_truth"),
    )


def _memit_target(where: _Where, rewrite: Mapping, key: str, new: bool) -> str:
    path = f"requested_rewrite.{key}"
    value = _require(where, rewrite, key, path)
    if isinstance(value, dict):  # MEMIT writes {"str": ..., "id": ...}
        path = f"{path}.str"
        value = _require(where, value, "str", path)
    return _new_target(where, value, path) if new else _text(where, value, path)


def _from_counterfact_memit(raw: Mapping, where: _Where, source: str) -> EditRecord:
    rewrite = _require(where, raw, "requested_rewrite")
    if not isinstance(rewrite, dict):
        raise where.error("requested_rewrite", f"must be an object, got {_describe(rewrite)}")
    template = _required_text(where, rewrite, "prompt", "requested_rewrite.prompt")
    if template.count("{}") != 1:
        raise where.error("requested_rewrite.prompt",
                          f"must contain the subject slot '{{}}' exactly once: {template!r}")
    subject = _required_text(where, rewrite, "subject", "requested_rewrite.subject")
    target_new = _memit_target(where, rewrite, "target_new", new=True)
    target_true = _memit_target(where, rewrite, "target_true", new=False)
    _check_probability_targets(target_new, target_true)
    neighbors = _texts(where, _require(where, raw, "neighborhood_prompts"), "neighborhood_prompts")
    generation = raw.get("generation_prompts")
    return EditRecord(
        case_id=_case_id(where, raw), source=source, protocol="probability", prompt=template.replace("{}", subject),
        subject=subject, target_new=target_new, target_true=target_true,
        paraphrase_prompts=_texts(where, _require(where, raw, "paraphrase_prompts"), "paraphrase_prompts"),
        # Neighbourhood subjects share the edited subject's true object, which the edit must leave alone.
        neighborhood=tuple(PromptCase(prompt, (target_true,)) for prompt in neighbors),
        generation_prompts=() if generation is None else _texts(where, generation, "generation_prompts"),
    )


def _from_zsre(raw: Mapping, where: _Where, source: str) -> EditRecord:
    prompt = _required_text(where, raw, "src")
    subject = _required_text(where, raw, "subject")
    _check_subject(where, subject, prompt, "subject", "src")
    # `answers` holds the gold answers; `pred` is what MEND's base model predicted (it differs in ~43% of records),
    # so it is only a fallback.
    if raw.get("answers"):
        target_true = _aliases(where, raw["answers"], "answers")[0]
    elif raw.get("pred") is not None:
        target_true = _text(where, raw["pred"], "pred")
    else:
        raise where.error("answers", "is missing or empty, and there is no 'pred' to fall back on")
    return EditRecord(
        case_id=_case_id(where, raw), source=source, protocol="token_accuracy", prompt=prompt, subject=subject,
        target_new=_new_target(where, _require(where, raw, "alt"), "alt"), target_true=target_true,
        paraphrase_prompts=_texts(where, _require(where, raw, "rephrase"), "rephrase"),
        neighborhood=_paired_cases(where, _require(where, raw, "loc"), _require(where, raw, "loc_ans"), "loc",
                                   "loc_ans"),
    )


def _from_knowedit(raw: Mapping, where: _Where, source: str) -> EditRecord:
    prompt = _required_text(where, raw, "prompt")
    subject = _required_text(where, raw, "subject")
    _check_subject(where, subject, prompt, "subject", "prompt")
    # ZsRE-test-all names its paraphrase `rephrase_prompt`, wiki_counterfact `rephrase`; other KnowEdit subsets
    # (e.g. wiki_recent) have none.
    paraphrase_key = "rephrase_prompt" if raw.get("rephrase_prompt") is not None else "rephrase"
    paraphrases = raw.get(paraphrase_key)
    return EditRecord(
        case_id=_case_id(where, raw), source=source, protocol="token_accuracy", prompt=prompt, subject=subject,
        target_new=_new_target(where, _require(where, raw, "target_new"), "target_new"),
        target_true=_aliases(where, _require(where, raw, "ground_truth"), "ground_truth")[0],
        paraphrase_prompts=() if paraphrases is None else _texts(where, paraphrases, paraphrase_key),
        locality=_keyed_cases(where, raw.get("locality"), "locality"),
        portability=_keyed_cases(where, raw.get("portability"), "portability"),
    )


@dataclass(frozen=True)
class Layout:
    name: str  # also the ``source`` of the records it yields
    format: str  # the DATASET_FORMATS value that selects it
    protocol: Protocol
    signature: str  # the keys that identify it, shown in error messages
    mapper: Callable[[Mapping, _Where, str], EditRecord]


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("counterfact", "counterfact", "probability",
           "EasyEdit CounterFact: prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, "
           "locality_ground_truth", _from_counterfact),
    Layout("counterfact-memit", "counterfact", "probability",
           "MEMIT multi_counterfact: requested_rewrite{prompt, subject, target_new{str}, target_true{str}}, "
           "paraphrase_prompts, neighborhood_prompts", _from_counterfact_memit),
    Layout("zsre", "zsre", "token_accuracy",
           "MEND zsRE: subject, src, alt, answers|pred, rephrase, loc, loc_ans", _from_zsre),
    Layout("knowedit-zsre", "knowedit", "token_accuracy",
           "KnowEdit ZsRE: subject, prompt, target_new, ground_truth, rephrase_prompt, locality, portability",
           _from_knowedit),
    Layout("knowedit-wiki_counterfact", "knowedit", "token_accuracy",
           "KnowEdit wiki_counterfact: subject, prompt, target_new, ground_truth, rephrase, locality, portability",
           _from_knowedit),
)}


# ----------------------------------------------------------------------------------------------- detection

def _knowedit_variant(first: Mapping) -> str:
    if "rephrase_prompt" in first:
        return "knowedit-zsre"
    if "rephrase" in first:
        return "knowedit-wiki_counterfact"
    # No paraphrase key: ZsRE asks questions and lists plain-string answers; WikiData completes statements.
    prompt, ground_truth = first.get("prompt"), first.get("ground_truth")
    if isinstance(prompt, str) and prompt.rstrip().endswith("?"):
        return "knowedit-zsre"
    if isinstance(ground_truth, list) and ground_truth and all(isinstance(item, str) for item in ground_truth):
        return "knowedit-zsre"
    return "knowedit-wiki_counterfact"


def _layout_of(first: Any, origin: str) -> Layout:
    if not isinstance(first, dict):
        raise DatasetError(f"{origin}: record 0 must be a JSON object, got {_describe(first)}")
    keys = set(first)
    if "requested_rewrite" in keys:
        return LAYOUTS["counterfact-memit"]
    if "src" in keys and keys & {"alt", "loc", "rephrase"}:
        return LAYOUTS["zsre"]
    if keys & {"locality_prompt", "locality_ground_truth"}:
        return LAYOUTS["counterfact"]
    if {"prompt", "target_new"} <= keys and keys & {"locality", "portability", "rephrase", "rephrase_prompt"}:
        return LAYOUTS[_knowedit_variant(first)]
    supported = "; ".join(f"'{layout.name}' ({layout.signature})" for layout in LAYOUTS.values())
    raise DatasetError(f"{origin}: unknown dataset layout: record 0 has keys {sorted(keys)}; "
                       f"supported layouts: {supported}")


def detect_layout(records: Sequence[Mapping]) -> str:
    """The layout name (a key of LAYOUTS, also the records' ``source``) of raw records, from the first one's keys."""
    if not records:
        raise DatasetError("cannot detect the layout of an empty list of records")
    return _layout_of(records[0], "<records>").name


def detect_format(records: Sequence[Mapping]) -> str:
    """The DATASET_FORMATS value ("counterfact", "zsre" or "knowedit") of raw records, from the first one's keys."""
    return LAYOUTS[detect_layout(records)].format


# ----------------------------------------------------------------------------------------------- reading

def _parse_json_lines(text: str, origin: str) -> list:
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{origin}: invalid JSON at line {line_number}, column {error.colno}: "
                               f"{error.msg}") from None
    return rows


def _read_file_rows(path: Path) -> list:
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist")
    if not path.is_file():
        raise DatasetError(f"dataset path {path} is not a file (expected a .json or .jsonl file)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot be read as UTF-8 text: {error}") from error
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty")
    if path.suffix == ".jsonl":
        return _parse_json_lines(text, str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines under a .json name
            return _parse_json_lines(text, str(path))
        raise DatasetError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(data, list):
        shown = f"an object with keys {sorted(data)[:10]}" if isinstance(data, dict) else _describe(data)
        raise DatasetError(f"{path}: expected a JSON list of records, found {shown}")
    return data


def _open_hub_dataset(spec: str):
    """``hf:<name>[:<config>][:<split>]`` -> a ``datasets.Dataset`` (one split)."""
    parts = spec[len(HUB_PREFIX):].split(":")
    if len(parts) > 3 or not parts[0].strip():
        raise DatasetError(f"{spec!r}: expected hf:<dataset name>[:<config>][:<split>]")
    name = parts[0].strip()
    config = (parts[1].strip() or None) if len(parts) > 1 else None  # "hf:name::split" leaves the config unset
    split = (parts[2].strip() or None) if len(parts) > 2 else None
    try:
        import datasets
    except ImportError as error:
        raise DatasetError(f"{spec}: loading hub datasets needs the 'datasets' package") from error
    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # the hub client raises many types; all of them mean "not loadable"
        if hub_offline():
            raise DatasetError(
                f"{spec}: hub dataset {name!r} cannot be downloaded while offline (HF_HUB_OFFLINE or "
                f"HF_DATASETS_OFFLINE is set) and is not in the local cache; unset offline mode, or pass a local "
                f".json/.jsonl file ({type(error).__name__}: {error})") from error
        raise DatasetError(f"{spec}: hub dataset {name!r} (config {config!r}, split {split!r}) could not be "
                           f"loaded: {type(error).__name__}: {error}") from error
    if isinstance(loaded, dict):  # a DatasetDict: no split was named
        splits = list(loaded.keys())
        if len(splits) != 1:
            raise DatasetError(f"{spec}: the dataset has splits {splits}; name one: "
                               f"hf:{name}:{config or ''}:<split>")
        loaded = loaded[splits[0]]
    return loaded


def offline_hub_problem(spec: str) -> str | None:
    """Why the ``hf:`` source ``spec`` cannot load while the hub is offline (not cached), found without loading
    anything; None when the hub may be used, the name is a local folder, or the dataset is in a cache.

    Looks for the dataset's folder in the hub cache (``datasets--<org>--<name>``) and in the datasets cache
    (``<org>___<name>``, as ``datasets`` stores a prepared dataset), at the locations the libraries read from
    ``HF_HUB_CACHE`` / ``HF_DATASETS_CACHE`` / ``HF_HOME``. Lenient: a folder of that name counts as cached.
    """
    if not hub_offline():
        return None
    name = spec[len(HUB_PREFIX):].split(":")[0].strip()
    if not name or Path(name).expanduser().exists():
        return None  # a malformed spec fails with its own message when loaded; a local folder needs no hub
    from huggingface_hub import constants

    hub_cache = Path(constants.HF_HUB_CACHE)
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets").expanduser()
    wanted = _cache_key("___".join(name.split("/")))
    if (hub_cache / f"datasets--{name.replace('/', '--')}").is_dir():
        return None
    if datasets_cache.is_dir() and any(_cache_key(child.name) == wanted for child in datasets_cache.iterdir()
                                       if child.is_dir()):
        return None
    return (f"{spec}: the Hugging Face hub is offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set) and dataset "
            f"{name!r} is not in the local cache (looked in {hub_cache} and {datasets_cache}); unset offline mode "
            f"to download it, or pass a local .json/.jsonl file")


def _cache_key(folder_name: str) -> str:
    """Folder names compared without case and underscores (``datasets`` snake-cases the name's last part)."""
    return folder_name.lower().replace("___", "/").replace("_", "").replace("-", "")


def _columnar_to_rows(value: dict) -> list[dict] | None:
    """``{"prompt": [a, b], "ground_truth": [x, y]}`` -> ``[{prompt: a, ...}, ...]`` if it has that shape."""
    lengths = {len(column) for column in value.values() if isinstance(column, list)}
    if not value or len(lengths) != 1 or not all(isinstance(column, list) for column in value.values()):
        return None
    (length,) = lengths
    return [{key: column[i] for key, column in value.items()} for i in range(length)]


def _from_hub_row(row: Mapping) -> dict:
    """Undo what Arrow does to nested JSON: keys absent from a row come back as nulls, and a list of objects
    declared as ``Sequence`` comes back as an object of lists."""
    def plain(value):
        if isinstance(value, Mapping):
            return {key: plain(item) for key, item in value.items() if item is not None}
        if isinstance(value, list):
            return [plain(item) for item in value]
        return value

    cleaned = plain(row)
    for key in ("locality", "portability"):
        if isinstance(cleaned.get(key), dict):
            for sub_key, entries in cleaned[key].items():
                if isinstance(entries, dict):
                    cleaned[key][sub_key] = _columnar_to_rows(entries) or entries
    return cleaned


# ----------------------------------------------------------------------------------------------- entry point

def load_records(path_or_name: str | os.PathLike, format: str = "auto", limit: int | None = None,
                 offset: int = 0) -> list[EditRecord]:
    """Load edit records from a local .json/.jsonl file, ``"builtin"``, or ``hf:<name>[:<config>][:<split>]``.

    ``format`` is "auto" (detect from the first record's keys) or one of DATASET_FORMATS, which then must match
    what the content holds. ``offset`` and ``limit`` select the file positions ``[offset, offset + limit)``;
    every selected record is checked, and unusable ones among them are skipped with a DatasetWarning.
    """
    if format != "auto" and format not in DATASET_FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; use 'auto' or one of {list(DATASET_FORMATS)}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise DatasetError(f"offset must be a non-negative integer, got {offset!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DatasetError(f"limit must be a non-negative integer or None, got {limit!r}")

    path_or_name = os.fspath(path_or_name)
    source_override = None
    hub_dataset = None
    if path_or_name == BUILTIN_NAME:
        origin, rows, source_override = str(BUILTIN_EDITS_PATH), _read_file_rows(BUILTIN_EDITS_PATH), "builtin"
    elif path_or_name.startswith(HUB_PREFIX):
        origin, hub_dataset = path_or_name, _open_hub_dataset(path_or_name)
        rows = None
    else:
        path = Path(path_or_name).expanduser()
        origin, rows = str(path), _read_file_rows(path)

    total = len(rows) if rows is not None else len(hub_dataset)
    if total == 0:
        raise DatasetError(f"{origin}: contains no records")
    first = rows[0] if rows is not None else _from_hub_row(hub_dataset[0])
    layout = _layout_of(first, origin)
    if format != "auto" and layout.format != format:
        raise DatasetError(f"{origin}: format {format!r} was requested, but record 0 (keys {sorted(first)}) is in "
                           f"the {layout.name!r} layout of format {layout.format!r}")
    if offset >= total:
        raise DatasetError(f"{origin}: offset {offset} is past the end ({total} records)")
    stop = total if limit is None else min(total, offset + limit)
    if rows is not None:
        window = rows[offset:stop]
    else:
        window = [_from_hub_row(row) for row in hub_dataset.select(range(offset, stop))]

    records: list[EditRecord] = []
    skipped: list[str] = []
    index_of_case: dict[str, int] = {}
    for index, raw in enumerate(window, start=offset):
        where = _Where(origin, index)
        if not isinstance(raw, dict):
            raise DatasetError(f"{origin}: record {index} must be a JSON object, got {_describe(raw)}")
        try:
            record = layout.mapper(raw, where, source_override or layout.name)
        except _UnusableRecord as reason:
            skipped.append(f"record {index}: {reason}")
            continue
        if record.case_id in index_of_case:
            raise where.error("case_id", f"{record.case_id!r} repeats the case_id of record "
                                         f"{index_of_case[record.case_id]}")
        index_of_case[record.case_id] = index
        records.append(record)
    if skipped:
        warnings.warn(DatasetWarning(f"{origin}: skipped {len(skipped)} unusable record(s): " + "; ".join(skipped)),
                      stacklevel=2)
    return records
