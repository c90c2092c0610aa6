"""Prepare a stage's examples through `datasets`: read the source as Arrow, validate and
tokenise it with batched `map` calls over `num_proc` processes, cache the result on disk.

A `RowEncoder` says how one row becomes token columns (the per-row functions of
`align.data.sft`, `align.data.preference`, `align.data.unpaired` (KTO) and
`align.data.prompts` (RL), so rows mean exactly what they mean in memory). Each encoder keeps
one table row per source row; a row skipped as unusable (`align.data.unusable`) is an empty
row whose `skipped` column says why.
`prepare_source` returns the prepared Arrow dataset of a file, folder or hub dataset, from the
cache (`align.data.cache`) when nothing it depends on changed; `prepare_rows` encodes rows
already in memory (the embedded task), uncached as they are generated in a moment.

A source Arrow cannot type (cells of one column holding strings in some rows and message lists
in others, which every stage accepts) or cannot parse is read row by row with
`align.data.sources.load_rows` instead, whose errors name the line; its rows are encoded in
this process, in chunks.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow
import pyarrow.ipc
import pyarrow.json
from datasets.arrow_writer import ArrowWriter

from align.data import (
    cache,
    conversations,
    preference,
    prompts,
    sft,
    sources,
    text,
    unpaired,
    unusable,
)
from align.errors import DataError

logger = logging.getLogger(__name__)

# Rows per process below which a second process costs more than it saves.
ROWS_PER_PROCESS = 20_000
CHUNK = 1_000  # rows per batched map call (and per chunk of the row-by-row path)


@dataclass(frozen=True)
class RowEncoder:
    """How one stage's rows become columns: `encode(rows, tokenizer, source, first,
    **settings)` (a module-level function, so worker processes can receive it) returns, for
    rows numbered from `first`, one list per column of `features` (name -> datasets type).
    `json_cells`: JSON Lines files are read in Python, so every cell keeps the type it has in
    the file (pyarrow would read a column of 1 and 2.5 as 1.0 and 2.5, and ISO dates as
    timestamps); for rows whose columns reach user code as they are (RL rewards)."""

    kind: str
    encode: Callable[..., dict[str, Any]]
    features: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    json_cells: bool = False

    def datasets_features(self) -> datasets.Features:
        return datasets.Features(self.features)


IDS = datasets.Sequence(datasets.Value("int32"))
LENGTH, FLAG, TEXT = datasets.Value("int32"), datasets.Value("bool"), datasets.Value("string")


def sft_encoder(max_length: int, completion_only_loss: bool,
                on_unusable: str = "error") -> RowEncoder:
    return RowEncoder("sft", sft.encode_sft_rows,
                      {"input_ids": IDS, "labels": IDS, "length": LENGTH, "truncated": FLAG,
                       "skipped": TEXT},
                      {"max_length": max_length, "completion_only_loss": completion_only_loss,
                       "on_unusable": on_unusable})


def preference_encoder(max_length: int, on_unusable: str = "error") -> RowEncoder:
    return RowEncoder("preference", preference.encode_preference_rows,
                      {"prompt_ids": IDS, "chosen_ids": IDS, "rejected_ids": IDS,
                       "margin": datasets.Value("float64"), "length": LENGTH, "truncated": FLAG,
                       "skipped": TEXT},
                      {"max_length": max_length, "on_unusable": on_unusable})


def unpaired_encoder(max_length: int, on_unusable: str = "error") -> RowEncoder:
    """KTO rows: a pair's two sides (or an unpaired row's one) in one table row."""
    return RowEncoder("unpaired", unpaired.encode_unpaired_rows,
                      {"prompt_ids": IDS, "completion_ids": datasets.Sequence(IDS),
                       "desirable": datasets.Sequence(FLAG), "truncated": FLAG,
                       "skipped": TEXT},
                      {"max_length": max_length, "on_unusable": on_unusable})


def prompt_encoder(max_length: int, on_unusable: str = "error") -> RowEncoder:
    """RL prompt rows: the templated prompt, its ids, and the columns the rewards receive."""
    return RowEncoder("prompts", prompts.encode_prompt_rows,
                      {"text": TEXT, "ids": IDS, "messages": TEXT, "columns": TEXT,
                       "length": LENGTH, "skipped": TEXT},
                      {"max_length": max_length, "on_unusable": on_unusable}, json_cells=True)


@dataclass(frozen=True)
class CacheSettings:
    """`data.cache`, `data.cache_dir`, `data.num_proc` (0: one process per 20k rows, at most
    one per core)."""

    enabled: bool = True
    cache_dir: str | None = None
    num_proc: int = 0


def prepare_source(source: str, split: str, columns: dict[str, str], tokenizer: Any,
                   encoder: RowEncoder, settings: CacheSettings,
                   show_progress: bool = True) -> datasets.Dataset:
    """The prepared dataset of `source` (see `align.data.sources.load_rows` for what a source
    may be), one row per source row in order, memory-mapped from the cache.

    Raises:
        DataError: the source is missing or unreadable, or a row is malformed (named by its
            1-based row, and its column where one is to blame, as the user's data names it).
    """
    identity = cache.local_source_identity(source)
    raw = None
    if identity is None:  # a hub dataset: its fingerprint says which revision was read
        raw = read_source(source, split, settings.cache_dir, encoder.json_cells)
        identity = [source, getattr(raw, "_fingerprint", None)]
    key = cache.digest({"source": identity, "split": split, "columns": columns,
                        "tokenizer": cache.tokenizer_identity(tokenizer),
                        "kind": encoder.kind, "settings": encoder.settings,
                        "code": cache.code_identity(sft, preference, unpaired, prompts,
                                                    unusable, conversations, text, sources,
                                                    RowEncoder)})
    folder = cache.cache_root(settings.cache_dir) / f"{encoder.kind}-{key}"
    if settings.enabled and (files := cache.lookup(folder)) is not None:
        logger.info("%s: prepared data read from the cache %s", source, folder)
        return _open(files)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if raw is None:
            raw = read_source(source, split, settings.cache_dir, encoder.json_cells)
        written = _encode_into(tmp, raw, source, columns, tokenizer, encoder, settings,
                               show_progress)
        if not settings.enabled:
            return _open([tmp / name for name in written], keep_in_memory=True)
        cache.publish(tmp, folder, written, {"source": source, "split": split,
                                             "kind": encoder.kind, **encoder.settings})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open(cache.lookup(folder) or [])


def prepare_rows(rows: list[dict], tokenizer: Any, encoder: RowEncoder,
                 source: str) -> datasets.Dataset:
    """`rows` already in memory, encoded in this process into an in-memory dataset."""
    parts = [_encode_rows(rows[start:start + CHUNK], start + 1, tokenizer, encoder,
                          source) for start in range(0, len(rows), CHUNK)]
    columns = {name: [value for part in parts for value in part[name]]
               for name in encoder.features}
    return datasets.Dataset.from_dict(columns, features=encoder.datasets_features())


def read_renamed(source: str, split: str, columns: dict[str, str],
                 cache_dir: str | None = None) -> datasets.Dataset | list[dict]:
    """The source's raw rows with `data.columns` applied (indexable, in file order)."""
    raw = read_source(source, split, cache_dir)
    if isinstance(raw, list):
        return sources.rename_columns(raw, columns, source)
    return _renamed(raw, columns, source)


def check_margins(prepared: datasets.Dataset, source: str) -> None:
    """Preference data: `margin` is given for every row or for none.

    Raises:
        DataError: naming the first row whose margin's presence differs from row 1's.
    """
    if len(prepared) == 0:
        return
    missing = np.asarray(prepared.with_format("arrow")["margin"].is_null())
    differs = np.flatnonzero(missing != missing[0])
    if len(differs):
        raise preference.margin_mismatch(source, int(differs[0]) + 1, not missing[0])


def read_source(source: str, split: str, cache_dir: str | None = None,
                json_cells: bool = False) -> datasets.Dataset | list[dict]:
    """The source as an Arrow dataset, or as Python rows (`load_rows`) where Arrow cannot
    read or type it exactly, and for JSON Lines files with `json_cells` (`RowEncoder`).

    JSON Lines files are converted to Arrow by pyarrow's streaming reader into the cache
    (once per version of the file); pyarrow refuses a column whose type changes between rows
    instead of converting it, so " 2" never becomes 2. Parquet files and `save_to_disk`
    folders are read as `datasets` reads them, hub datasets through `load_dataset`. JSON
    arrays and CSV (whose text columns align types itself) are read in Python.
    """
    path = Path(os.path.expanduser(source))
    suffix = path.suffix.lower()
    try:
        if path.is_file() and suffix in sources.JSONL_SUFFIXES and not json_cells:
            return _jsonl_dataset(path, cache_dir)
        if path.is_file() and suffix == ".parquet":
            dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
        elif path.is_dir() and sources.is_saved_dataset(path):
            dataset = sources.saved_dataset(path, split, source)
        elif not path.exists() and sources.is_hub_name(source):
            dataset = sources.hub_dataset(source, split)
        else:
            return sources.load_rows(source, split)
    except (pyarrow.ArrowInvalid, datasets.exceptions.DatasetGenerationError):
        return sources.load_rows(source, split)  # its errors name the line
    if len(dataset) == 0:
        raise DataError("the dataset has no rows", source=source)
    return dataset


def _jsonl_dataset(path: Path, cache_dir: str | None) -> datasets.Dataset:
    """A JSON Lines file as Arrow, converted once into the cache (raises ArrowInvalid where
    pyarrow cannot type a column)."""
    identity = cache.digest(cache.local_source_identity(str(path)))
    folder = cache.cache_root(cache_dir) / f"source-{identity}"
    files = cache.lookup(folder)
    if files is None:
        tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            reader = pyarrow.json.open_json(
                path, read_options=pyarrow.json.ReadOptions(block_size=16 << 20))
            with pyarrow.ipc.new_stream(str(tmp / "rows.arrow"), reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
            cache.publish(tmp, folder, ["rows.arrow"], {"source": str(path)})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        files = cache.lookup(folder) or []
    return _open(files)


def _encode_into(folder: Path, raw: datasets.Dataset | list[dict], source: str,
                 columns: dict[str, str], tokenizer: Any, encoder: RowEncoder,
                 settings: CacheSettings, show_progress: bool) -> list[str]:
    """Encode `raw` into Arrow files in `folder`; returns their names."""
    features = encoder.datasets_features()
    if isinstance(raw, list):
        rows = sources.rename_columns(raw, columns, source)
        with ArrowWriter(features=features, path=str(folder / "prepared.arrow")) as writer:
            for start in range(0, len(rows), CHUNK):
                writer.write_batch(_encode_rows(rows[start:start + CHUNK], start + 1,
                                                tokenizer, encoder, source))
            writer.finalize()
        return ["prepared.arrow"]
    raw = _renamed(raw, columns, source)
    num_proc = process_count(settings.num_proc, len(raw))
    if not show_progress:
        datasets.disable_progress_bars()
    try:
        raw.map(_encode_batch, batched=True, batch_size=CHUNK, with_indices=True,
                num_proc=num_proc if num_proc > 1 else None, remove_columns=raw.column_names,
                features=features, fn_kwargs={"tokenizer": tokenizer, "encoder": encoder,
                                              "source": source},
                cache_file_name=str(folder / "prepared.arrow"), load_from_cache_file=False,
                new_fingerprint=folder.name, desc=f"Preparing {Path(source).name}")
    finally:
        if not show_progress:
            datasets.enable_progress_bars()
    return sorted(p.name for p in folder.glob("prepared*.arrow"))


def process_count(configured: int, num_rows: int) -> int:
    """`data.num_proc`, or when 0 one process per ROWS_PER_PROCESS rows, at most one per
    core."""
    return configured or min(os.cpu_count() or 1, max(1, num_rows // ROWS_PER_PROCESS))


def _renamed(raw: datasets.Dataset, columns: dict[str, str], source: str) -> datasets.Dataset:
    for ours, theirs in columns.items():
        if theirs not in raw.column_names:
            raise DataError(f"missing (data.columns maps it to '{ours}'; the data has "
                            f"{sorted(raw.column_names)})", source=source, row=1,
                            column=theirs)
    present = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    clashing = [ours for ours in present.values() if ours in raw.column_names]
    return raw.remove_columns(clashing).rename_columns(present)


def _encode_batch(batch: dict[str, list], indices: list[int], *, tokenizer: Any,
                  encoder: RowEncoder, source: str) -> dict[str, list]:
    """`map` function: one batch of Arrow rows, encoded (row numbers are 1-based)."""
    names = list(batch)
    rows = [_plain({name: batch[name][i] for name in names}) for i in range(len(indices))]
    return _encode_rows(rows, indices[0] + 1, tokenizer, encoder, source)


def _encode_rows(rows: list[dict], first: int, tokenizer: Any, encoder: RowEncoder,
                 source: str) -> dict[str, list]:
    return encoder.encode(rows, tokenizer, source, first, **encoder.settings)


def _plain(value: Any) -> Any:
    """An Arrow row as the JSON it was read from: Arrow gives every row every column (and every
    message every field), None where the row had none; those are dropped."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _open(files: list[Path], keep_in_memory: bool = False) -> datasets.Dataset:
    parts = [datasets.Dataset.from_file(str(f), in_memory=keep_in_memory) for f in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
