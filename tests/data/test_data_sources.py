"""load_rows reads every supported source and names the file, line and row when it cannot."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align.data import load_rows
from align.errors import DataError

ROWS = [
    {"prompt": "Q: 1+1=", "completion": " 2"},
    {"prompt": "Q: 2+3=", "completion": " 5"},
]
MESSAGE_ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
]


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n")
    assert load_rows(str(path)) == ROWS


def test_json_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(MESSAGE_ROWS))
    assert load_rows(str(path)) == MESSAGE_ROWS


def test_parquet_keeps_nested_messages_as_python_values(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(MESSAGE_ROWS), path)
    assert load_rows(str(path)) == MESSAGE_ROWS


def test_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('prompt,completion,margin\n"Q: 1+1=", 2,0.5\nQ: 2+3=, 5,\n')
    rows = load_rows(str(path))
    assert rows == [
        {"prompt": "Q: 1+1=", "completion": " 2", "margin": 0.5},
        {"prompt": "Q: 2+3=", "completion": " 5", "margin": None},
    ]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.save_to_disk(str(tmp_path / "single"))
    assert load_rows(str(tmp_path / "single")) == ROWS

    splits = datasets.DatasetDict({"train": dataset, "test": dataset.select([1])})
    splits.save_to_disk(str(tmp_path / "splits"))
    assert load_rows(str(tmp_path / "splits"), split="test") == ROWS[1:]
    with pytest.raises(DataError, match="no split 'validation'; the folder holds test, train"):
        load_rows(str(tmp_path / "splits"), split="validation")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + '\n\n{"prompt": "oops",\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        load_rows(str(path))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"list\.jsonl, row 2: line 2 is a JSON list"):
        load_rows(str(path))


def test_json_holding_a_non_object_row(tmp_path):
    path = tmp_path / "numbers.json"
    path.write_text('[{"text": "a"}, 3]')
    with pytest.raises(DataError, match=r"numbers\.json, row 2: expected an object"):
        load_rows(str(path))


def test_jsonl_named_json_gets_a_hint(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"name the file \.jsonl"):
        load_rows(str(path))


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n" if name.endswith("jsonl") else "[]")
    with pytest.raises(DataError, match=rf"{name}: the dataset has no rows"):
        load_rows(str(path))


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"{path}: file not found"):
        load_rows(str(path))


def test_hub_failure_says_not_local_and_why(monkeypatch):
    def offline(name, split):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("align.hub.require_hub", lambda *args: None)  # the hub answered
    with pytest.raises(DataError) as caught:
        load_rows("someone/some-dataset")
    message = str(caught.value)
    assert message.startswith("someone/some-dataset: no such file or folder exists locally")
    assert "Hub dataset failed: ConnectionError: network unreachable" in message


def test_hub_dataset_rows(monkeypatch):
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr("align.hub.require_hub", lambda *args: None)
    assert load_rows("someone/some-dataset", split="test") == ROWS
    assert calls == [("someone/some-dataset", "test")]
