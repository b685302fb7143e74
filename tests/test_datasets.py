"""Dataset loaders: the real files in ../shared/data, the MEMIT layout, the built-in set, and clear errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from evals.datasets import (BUILTIN_EDITS_PATH, DATASET_FORMATS, LAYOUTS, DatasetError, DatasetWarning,
                            detect_format, detect_layout, load_records)
from evals.records import EditRecord, PromptCase

COUNTERFACT = "counterfact/counterfact-edit.json"
ZSRE = "zsre/zsre_mend_train-1k.json"
KNOWEDIT_ZSRE = "knowedit/ZsRE-test-all.json"
KNOWEDIT_WIKI = "knowedit/wiki_counterfact-test_cf.json"


def _raw(shared_data: Path, relative: str) -> list[dict]:
    return json.loads((shared_data / relative).read_text(encoding="utf-8"))


def _write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _counterfact_row(**changes) -> dict:
    row = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
           "subject": "Danielle Darrieux", "ground_truth": "French",
           "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
           "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
    row.update(changes)
    return row


def _memit_row() -> dict:
    # The values of CounterFact case 0 (as in counterfact-edit.json) in the original MEMIT layout.
    return {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                              "target_new": {"str": "English", "id": "Q1860"},
                              "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
        "paraphrase_prompts": ["Where Danielle Darrieux is from, people speak the language of",
                               "Danielle Darrieux was born in a place where people speak"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "The mother tongue of Montesquieu is"],
        "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }


# ------------------------------------------------------------------------------------------------ real files

def test_counterfact_easyedit_record_matches_raw(shared_data):
    raw = _raw(shared_data, COUNTERFACT)[0]
    records = load_records(str(shared_data / COUNTERFACT), limit=20)
    assert len(records) == 20 and all(isinstance(r, EditRecord) for r in records)
    first = records[0]
    assert first == EditRecord(
        case_id=str(raw["case_id"]), source="counterfact", protocol="probability", prompt=raw["prompt"],
        subject=raw["subject"], target_new=raw["target_new"], target_true=raw["ground_truth"],
        paraphrase_prompts=(raw["rephrase_prompt"],),
        neighborhood=(PromptCase(raw["locality_prompt"], (raw["locality_ground_truth"],)),))
    assert first.prompt == "The mother tongue of Danielle Darrieux is" and first.target_true == "French"
    assert first.prompt_template() == "The mother tongue of {} is"


def test_zsre_mend_record_matches_raw(shared_data):
    raw = _raw(shared_data, ZSRE)
    records = load_records(str(shared_data / ZSRE), limit=20)
    first = records[0]
    assert first.source == "zsre" and first.protocol == "token_accuracy"
    assert first.case_id == "0"  # no case_id in the file: the index
    assert first.prompt == raw[0]["src"] == "What is the product made by UniFirst?"
    assert first.subject == "UniFirst" and first.target_new == raw[0]["alt"] == "unmanned aircraft"
    assert first.target_true == raw[0]["answers"][0] == "uniform"
    assert first.paraphrase_prompts == (raw[0]["rephrase"],)
    assert first.neighborhood == (PromptCase(raw[0]["loc"], (raw[0]["loc_ans"],)),)
    # `answers`, not the base model's `pred`, is the truth; MEND's alts sometimes start with a space.
    index = next(i for i, row in enumerate(raw[:20]) if row["pred"] != row["answers"][0])
    assert records[index].target_true == raw[index]["answers"][0]


def test_zsre_mend_skips_empty_new_targets_with_a_warning(shared_data):
    path = str(shared_data / ZSRE)
    with pytest.warns(DatasetWarning, match=r"record 534: field 'alt' is empty.*record 723"):
        records = load_records(path)
    assert len(records) == 998 and "534" not in {r.case_id for r in records}
    assert all(r.target_new == r.target_new.strip() and r.target_new for r in records)


def test_knowedit_zsre_record_matches_raw(shared_data):
    raw = _raw(shared_data, KNOWEDIT_ZSRE)[0]
    first = load_records(str(shared_data / KNOWEDIT_ZSRE), limit=10)[0]
    assert first.source == "knowedit-zsre" and first.protocol == "token_accuracy"
    assert (first.prompt, first.subject, first.target_new) == (raw["prompt"], raw["subject"], raw["target_new"])
    assert first.target_true == raw["ground_truth"][0] == "Aspidoceratidae"
    assert first.paraphrase_prompts == (raw["rephrase_prompt"],)
    assert first.locality == {"Relation_Specificity": tuple(
        PromptCase(item["prompt"], tuple(item["ground_truth"])) for item in raw["locality"]["Relation_Specificity"])}
    assert first.portability == {"Reasoning": (
        PromptCase("What is the common name for the family Epaspidoceras belongs to?", ("Owlet moths",)),)}
    assert first.neighborhood == ()


def test_knowedit_wiki_counterfact_normalises_alias_lists(shared_data):
    raw_rows = _raw(shared_data, KNOWEDIT_WIKI)
    records = load_records(str(shared_data / KNOWEDIT_WIKI), limit=50)
    first, raw = records[0], raw_rows[0]
    assert first.source == "knowedit-wiki_counterfact"
    assert (first.prompt, first.target_new, first.target_true) == (raw["prompt"], "Syria", "United States of America")
    assert first.paraphrase_prompts == (raw["rephrase"],)
    # [["Syrian pound", "SYP", ...]] -> one alias tuple, canonical first.
    assert first.portability["Reasoning"][0] == PromptCase(
        "The name of the currency in the country of citizenship of Leonardo DiCaprio is",
        ("Syrian pound", "SYP", "LS", "Syrian lira"))
    assert set(first.portability) == {"Reasoning", "Subject_Aliasing"}
    assert len(first.locality["Relation_Specificity"]) == len(raw["locality"]["Relation_Specificity"])
    # Several correct answers, each with aliases: flattened in order.
    alma_mater = next(c for c in first.locality["Relation_Specificity"] if "alma mater" in c.prompt)
    assert alma_mater.answers == ("John Marshall High School", "Los Angeles Center for Enriched Studies",
                                  "UCLA Lab School", "Young Actors Space", "YAS")
    forgetful = next(i for i, row in enumerate(raw_rows[:50]) if "Forgetfulness" in row["locality"])
    assert records[forgetful].locality["Forgetfulness"][0].prompt == \
        raw_rows[forgetful]["locality"]["Forgetfulness"][0]["prompt"]
    empty = next(i for i, row in enumerate(raw_rows[:50]) if row["portability"] == {})
    assert records[empty].portability == {}


def test_every_record_of_every_real_file_loads(shared_data):
    expected = {COUNTERFACT: ("counterfact", 10000), ZSRE: ("zsre", 998), KNOWEDIT_ZSRE: ("knowedit-zsre", 1000),
                KNOWEDIT_WIKI: ("knowedit-wiki_counterfact", 600)}
    for relative, (source, count) in expected.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DatasetWarning)
            records = load_records(str(shared_data / relative))
        # Only the MEND zsRE file has unusable records (two empty `alt`s).
        assert len(caught) == (1 if relative == ZSRE else 0)
        assert len(records) == count and {r.source for r in records} == {source}
        assert all(r.subject in r.prompt and r.target_new and r.target_true for r in records)
        assert len({r.case_id for r in records}) == count


# ------------------------------------------------------------------------------------------------ layouts

def test_memit_multi_counterfact_layout(tmp_path):
    path = _write(tmp_path, "multi_counterfact.json", [_memit_row()])
    (record,) = load_records(str(path))
    assert record == EditRecord(
        case_id="0", source="counterfact-memit", protocol="probability",
        prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux", target_new="English",
        target_true="French",
        paraphrase_prompts=("Where Danielle Darrieux is from, people speak the language of",
                            "Danielle Darrieux was born in a place where people speak"),
        neighborhood=(PromptCase("Michel Rocard is a native speaker of", ("French",)),
                      PromptCase("The mother tongue of Montesquieu is", ("French",))),
        generation_prompts=("Danielle Darrieux's mother tongue is",))
    assert load_records(str(path), format="counterfact") == [record]


def test_counterfact_accepts_lists_of_prompts(tmp_path):
    row = _counterfact_row(rephrase_prompt=["Danielle Darrieux speaks", "Danielle Darrieux's language is"],
                           locality_prompt=["Michel Rocard is a native speaker of", "Montesquieu spoke"],
                           locality_ground_truth=["French", ["French", "French language"]])
    shared = _counterfact_row(locality_prompt=["Michel Rocard is a native speaker of", "Montesquieu spoke"])
    path = _write(tmp_path, "cf.json", [row, dict(shared, case_id=1)])
    first, second = load_records(str(path))
    assert first.paraphrase_prompts == ("Danielle Darrieux speaks", "Danielle Darrieux's language is")
    assert first.neighborhood == (PromptCase("Michel Rocard is a native speaker of", ("French",)),
                                  PromptCase("Montesquieu spoke", ("French", "French language")))
    assert [case.answers for case in second.neighborhood] == [("French",), ("French",)]


def test_knowedit_ground_truth_shapes(tmp_path):
    row = {"subject": "Paris", "prompt": "Paris is the capital of", "target_new": " Italy ", "ground_truth": ["France"],
           "rephrase": "Paris is the capital city of",
           "locality": {"Relation_Specificity": [{"prompt": "Lyon is in", "ground_truth": "France"}],
                        "Forgetfulness": [], "Other": None},
           "portability": {"Reasoning": [{"prompt": "The currency of the country Paris is the capital of is",
                                          "ground_truth": [["euro", "EUR"], ["lira"]]}],
                           "Subject_Aliasing": [{"prompt": "The City of Light is the capital of",
                                                 "ground_truth": ["Italy", "Italian Republic", "Italy"]}]}}
    (record,) = load_records(str(_write(tmp_path, "ke.json", [row])))
    assert record.source == "knowedit-wiki_counterfact" and record.target_new == "Italy"
    assert record.locality == {"Relation_Specificity": (PromptCase("Lyon is in", ("France",)),)}
    assert record.portability["Reasoning"][0].answers == ("euro", "EUR", "lira")
    assert record.portability["Subject_Aliasing"][0].answers == ("Italy", "Italian Republic")


def test_detection_of_every_layout(shared_data):
    assert detect_format(_raw(shared_data, COUNTERFACT)[:3]) == "counterfact"
    assert detect_format(_raw(shared_data, ZSRE)[:3]) == "zsre"
    assert detect_layout(_raw(shared_data, KNOWEDIT_ZSRE)[:3]) == "knowedit-zsre"
    assert detect_layout(_raw(shared_data, KNOWEDIT_WIKI)[:3]) == "knowedit-wiki_counterfact"
    assert detect_format(_raw(shared_data, KNOWEDIT_WIKI)[:3]) == "knowedit"
    assert detect_layout([_memit_row()]) == "counterfact-memit" and detect_format([_memit_row()]) == "counterfact"
    # Without a paraphrase key, KnowEdit ZsRE is recognised by its question-style prompts.
    assert detect_layout([{"prompt": "Who wrote Hamlet?", "target_new": "x", "locality": {}}]) == "knowedit-zsre"
    assert set(DATASET_FORMATS) == {layout.format for layout in LAYOUTS.values()}
    with pytest.raises(DatasetError, match="empty"):
        detect_format([])


def test_explicit_format_must_match_content(shared_data):
    path = str(shared_data / ZSRE)
    assert load_records(path, format="zsre", limit=2)[0].source == "zsre"
    with pytest.raises(DatasetError, match=r"format 'counterfact' was requested.*'zsre' layout"):
        load_records(path, format="counterfact", limit=2)
    with pytest.raises(DatasetError, match="unknown dataset format 'memit'"):
        load_records(path, format="memit")


def test_limit_and_offset(shared_data):
    path = str(shared_data / COUNTERFACT)
    raw = _raw(shared_data, COUNTERFACT)
    window = load_records(path, offset=10, limit=3)
    assert [r.case_id for r in window] == [str(row["case_id"]) for row in raw[10:13]]
    assert load_records(path, limit=0) == []
    assert len(load_records(path, offset=9998)) == 2
    zsre = load_records(str(shared_data / ZSRE), offset=5, limit=2)
    assert [r.case_id for r in zsre] == ["5", "6"]  # the index in the file, not in the window
    with pytest.raises(DatasetError, match="offset 10000 is past the end"):
        load_records(path, offset=10000)
    with pytest.raises(DatasetError, match="offset"):
        load_records(path, offset=-1)
    with pytest.raises(DatasetError, match="limit"):
        load_records(path, limit=-2)


def test_every_selected_record_is_checked(tmp_path):
    rows = [_counterfact_row(case_id=i) for i in range(5)]
    del rows[3]["ground_truth"]
    path = _write(tmp_path, "late_error.json", rows)
    assert len(load_records(str(path), limit=3)) == 3  # record 3 is outside the window
    with pytest.raises(DatasetError, match=r"late_error\.json: record 3: field 'ground_truth' is missing"):
        load_records(str(path))


def test_jsonl_and_json_lines_under_a_json_name(tmp_path):
    lines = "\n".join(json.dumps(_counterfact_row(case_id=i)) for i in range(3)) + "\n"
    for name in ("cf.jsonl", "cf_lines.json"):
        records = load_records(str(_write(tmp_path, name, lines)))
        assert [r.case_id for r in records] == ["0", "1", "2"]


# ------------------------------------------------------------------------------------------------ built-in set

def test_builtin_set():
    records = load_records("builtin")
    assert len(records) >= 60
    assert len({r.case_id for r in records}) == len(records)
    subjects = {r.subject for r in records}
    for record in records:
        assert record.source == "builtin" and record.protocol == "probability"
        assert record.subject in record.prompt
        assert record.target_true and record.target_new != record.target_true
        assert len(record.paraphrase_prompts) >= 2 and len(record.neighborhood) >= 2
        for case in record.neighborhood:
            assert case.answers == (record.target_true,)
            # a neighbour naming another edit's subject would be moved by that edit
            assert not [s for s in subjects if s in case.prompt], case.prompt
    assert load_records(str(BUILTIN_EDITS_PATH))[0].source == "counterfact-memit"


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("rows, index, field", [
    ([_counterfact_row(), {k: v for k, v in _counterfact_row(case_id=1).items() if k != "subject"}], 1, "subject"),
    ([_counterfact_row(), _counterfact_row(case_id=1), _counterfact_row(case_id=2, subject=42)], 2, "subject"),
    ([_counterfact_row(subject="Michel Rocard")], 0, "subject"),
    ([_counterfact_row(), _counterfact_row(case_id=1, rephrase_prompt=["ok", 7])], 1, "rephrase_prompt[1]"),
    ([_counterfact_row(), _counterfact_row(case_id=0)], 1, "case_id"),
    ([_counterfact_row(locality_prompt=["a", "b"], locality_ground_truth=["French"])], 0, "locality_ground_truth"),
    ([{"src": "Who is X?", "subject": "X", "alt": "Y", "rephrase": "X is?", "loc": "q", "loc_ans": "a"}], 0,
     "answers"),
    ([{**_memit_row(), "requested_rewrite": {**_memit_row()["requested_rewrite"], "prompt": "The mother tongue is"}}],
     0, "requested_rewrite.prompt"),
    ([{**_memit_row(), "requested_rewrite": {**_memit_row()["requested_rewrite"], "target_true": {"id": "Q150"}}}],
     0, "requested_rewrite.target_true.str"),
    ([{"subject": "Paris", "prompt": "Paris is in", "target_new": "Italy", "ground_truth": "France",
       "rephrase": "Paris lies in", "locality": {"Relation_Specificity": [{"prompt": "Lyon is in"}]}}], 0,
     "locality.Relation_Specificity[0].ground_truth"),
    ([{"subject": "Paris", "prompt": "Paris is in", "target_new": "Italy", "ground_truth": [[]],
       "rephrase": "Paris lies in"}], 0, "ground_truth"),
])
def test_malformed_record_errors_name_file_index_and_field(tmp_path, rows, index, field):
    path = _write(tmp_path, "broken_records.json", rows)
    with pytest.raises(DatasetError) as caught:
        load_records(str(path))
    message = str(caught.value)
    assert "broken_records.json" in message and f"record {index}:" in message and f"'{field}'" in message


@pytest.mark.parametrize("content, expected", [
    ('[\n  {"prompt": "a",\n  "subject": }\n]', r"invalid JSON at line 3"),
    (json.dumps([{"question": "q", "answer": "a"}]), r"unknown dataset layout: record 0 has keys \['answer', "
                                                      r"'question'\]; supported layouts: 'counterfact'"),
    ("[]", "contains no records"),
    ("", "the file is empty"),
    (json.dumps({"data": []}), "expected a JSON list of records, found an object with keys \\['data'\\]"),
    (json.dumps([_counterfact_row(), "not a record"]), "record 1 must be a JSON object"),
    (json.dumps(["not a record"]), "record 0 must be a JSON object"),
])
def test_malformed_file_errors(tmp_path, content, expected):
    path = _write(tmp_path, "broken_file.json", content)
    with pytest.raises(DatasetError, match=expected) as caught:
        load_records(str(path))
    assert "broken_file.json" in str(caught.value)


def test_invalid_jsonl_line_is_named(tmp_path):
    path = _write(tmp_path, "broken.jsonl", json.dumps(_counterfact_row()) + "\n{oops\n")
    with pytest.raises(DatasetError, match=r"broken\.jsonl: invalid JSON at line 2"):
        load_records(str(path))


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "edits.json"
    with pytest.raises(DatasetError, match="does not exist") as caught:
        load_records(str(missing))
    assert str(missing) in str(caught.value)
    with pytest.raises(DatasetError, match="not a file"):
        load_records(str(tmp_path))


def test_unusable_counterfact_record_is_skipped(tmp_path):
    path = _write(tmp_path, "same_target.json", [_counterfact_row(), _counterfact_row(case_id=1, target_new="French")])
    with pytest.warns(DatasetWarning, match=r"same_target\.json: skipped 1 .*record 1: target_new equals"):
        records = load_records(str(path))
    assert [r.case_id for r in records] == ["0"]


# ------------------------------------------------------------------------------------------------ hub datasets

def test_hub_dataset_offline_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/counterfact' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DatasetError, match=r"hf:someone/counterfact::train: .*offline.*local \.json"):
        load_records("hf:someone/counterfact::train")
    with pytest.raises(DatasetError, match="expected hf:<dataset name>"):
        load_records("hf:a:b:c:d")


def test_hub_dataset_rows_go_through_the_same_mapping(shared_data, monkeypatch):
    datasets = pytest.importorskip("datasets")
    raw = _raw(shared_data, KNOWEDIT_WIKI)[:4]
    calls = []

    def from_memory(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(raw)})

    monkeypatch.setattr(datasets, "load_dataset", from_memory)
    from_hub = load_records("hf:someone/knowedit:wiki_counterfact", limit=3, offset=1)
    assert calls == [("someone/knowedit", "wiki_counterfact", None)]
    local = load_records(str(shared_data / KNOWEDIT_WIKI), limit=3, offset=1)
    assert from_hub == local and len(local) == 3
