"""Read a dataset into a list of plain dict rows, whatever form it is stored in.

Sources: a JSON Lines, JSON, Parquet or CSV file; a folder written by `Dataset.save_to_disk` or
`DatasetDict.save_to_disk`; otherwise a Hugging Face Hub dataset name. Every failure becomes a
`DataError` naming the source (and the line or row where one is to blame). Row numbers are
1-based positions in the returned list (JSONL errors also give the line, as blank lines are
skipped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from align.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# CSV cells are typed by inference, except these: text such as the answer " 81" must stay text.
TEXT_COLUMNS = ("prompt", "completion", "text", "chosen", "rejected")
FILE_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet", ".csv")


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Load every row of a dataset as a dict.

    Args:
        source: a `.jsonl`/`.json`/`.parquet`/`.csv` file, a `save_to_disk` folder, or a hub
            dataset name (tried only when no such local path exists).
        split: which split to take from a `DatasetDict` folder or a hub dataset.

    Returns:
        The rows, in file order; each is a dict of column name to value.

    Raises:
        DataError: the source is missing, unreadable, empty, or holds a row that is not an
            object.
    """
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        rows = _read_folder(path, split, source)
    elif path.is_file():
        rows = _read_file(path, source)
    elif not is_hub_name(source):
        raise DataError("file not found", source=source)
    else:
        rows = hub_dataset(source, split).to_list()
    if not rows:
        raise DataError("the dataset has no rows", source=source)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(
                f"expected an object with named columns, got {type(row).__name__}",
                source=source,
                row=number,
            )
    return rows


def _read_file(path: Path, source: str) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, source)
    if suffix == ".json":
        return _read_json(path, source)
    if suffix in (".parquet", ".csv"):
        return _read_table(path, suffix, source)
    raise DataError(
        f"unsupported file type '{suffix}'; use one of {', '.join(FILE_SUFFIXES)} "
        "or a folder written by datasets' save_to_disk",
        source=source,
    )


def _read_jsonl(path: Path, source: str) -> list[Any]:
    rows: list[Any] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"line {line_number} is not valid JSON: {err.msg} (character {err.colno})",
                    source=source,
                ) from None
            if not isinstance(row, dict):
                # Name the line too: blank lines make row and line numbers differ.
                raise DataError(
                    f"line {line_number} is a JSON {type(row).__name__}, expected "
                    "an object with named columns",
                    source=source,
                    row=len(rows) + 1,
                )
            rows.append(row)
    return rows


def _read_json(path: Path, source: str) -> list[Any]:
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        hint = " (one object per line? name the file .jsonl)" if err.msg == "Extra data" else ""
        raise DataError(
            f"not valid JSON at line {err.lineno}, character {err.colno}: {err.msg}{hint}",
            source=source,
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"a .json dataset must hold a list of objects, got a JSON {type(data).__name__}",
            source=source,
        )
    return data


def _read_table(path: Path, suffix: str, source: str) -> list[dict]:
    # pyarrow (what `datasets` reads these with) gives plain Python values, nested lists of
    # message dicts included; pandas would hand back numpy arrays and NaN for missing cells.
    import pyarrow

    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            text_types = {column: pyarrow.string() for column in TEXT_COLUMNS}
            table = pcsv.read_csv(
                path, convert_options=pcsv.ConvertOptions(column_types=text_types)
            )
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"cannot read the {suffix[1:]} file: {err}", source=source) from None
    return table.to_pylist()


def _read_folder(path: Path, split: str, source: str) -> list[dict]:
    import datasets

    if is_saved_dataset(path):
        return saved_dataset(path, split, source).to_list()
    # Any other folder (e.g. of data files) goes through the generic loader.
    try:
        return datasets.load_dataset(str(path), split=split).to_list()
    except Exception as err:  # reported to the user
        raise DataError(f"cannot load the folder as a dataset: {err}", source=source) from None


def is_saved_dataset(path: Path) -> bool:
    """Whether a folder was written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def saved_dataset(path: Path, split: str, source: str) -> Any:
    """The `split` of a `save_to_disk` folder, as a (memory-mapped) `datasets.Dataset`."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # any reader failure is reported to the user
        raise DataError(f"cannot read the save_to_disk folder: {err}", source=source) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"no split '{split}'; the folder holds {', '.join(sorted(loaded))}",
                source=source,
            )
        loaded = loaded[split]
    return loaded


def is_hub_name(source: str) -> bool:
    """Whether a source that is no local path is to be read from the hub (a name, not a
    path or file name that is missing)."""
    suffix = Path(source).suffix.lower()
    return not (suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")))


def hub_dataset(name: str, split: str) -> Any:
    """The `split` of a hub dataset, as `datasets.load_dataset` gives it."""
    import datasets

    from align.hub import require_hub

    require_hub(name, "dataset", "dataset")

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, bad split: all for people
        raise DataError(
            f"no such file or folder exists locally, and loading it as a Hugging "
            f"Face Hub dataset failed: {type(err).__name__}: {err}",
            source=name,
        ) from None


def rename_columns(rows: list[dict], columns: dict[str, str], source: str) -> list[dict]:
    """`data.columns`: each row with the user's columns renamed to ours ({ours: theirs}).

    Raises:
        DataError: a row lacks a mapped column (named as in the user's data).
    """
    if not columns:
        return rows
    renamed = []
    for number, row in enumerate(rows, start=1):
        row = dict(row)
        for ours, theirs in columns.items():
            if theirs not in row:
                raise DataError(f"missing (data.columns maps it to '{ours}'; the row has "
                                f"{sorted(row)})", source=source, row=number, column=theirs)
            row[ours] = row.pop(theirs)
        renamed.append(row)
    return renamed
