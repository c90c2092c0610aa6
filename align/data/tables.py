"""A stage's examples held as an Arrow table, built into Python objects only when read.

The driver keeps the table (memory-mapped from the prepared-data cache) and reads each step's
rows from it with `take`, so a run over a million rows holds a million rows' worth of nothing
but their offsets. Indexing, iteration and `len` make it a drop-in `Sequence` of examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar, overload

import datasets
import numpy as np

T = TypeVar("T")
READ_CHUNK = 1024  # rows per read when iterating


class ExampleTable(Sequence, Generic[T]):
    """Examples of one split: `build` turns a batch of columns (name -> list) into examples;
    `rows` (default: all) are the table rows this split holds, in order."""

    def __init__(self, table: datasets.Dataset, build: Callable[[dict[str, list]], list[T]],
                 rows: np.ndarray | None = None) -> None:
        self.table, self.build, self.rows = table, build, rows

    def __len__(self) -> int:
        return len(self.table) if self.rows is None else len(self.rows)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return self.take([index])[0]

    def take(self, indices: Sequence[int]) -> list[T]:
        """The examples at `indices`, in that order, read in one call."""
        if len(indices) == 0:
            return []
        rows = np.asarray(indices, dtype=np.int64)
        if self.rows is not None:
            rows = self.rows[rows]
        return self.build(self.table[rows.tolist()])

    def __iter__(self) -> Iterator[T]:
        for start in range(0, len(self), READ_CHUNK):
            yield from self.take(range(start, min(start + READ_CHUNK, len(self))))

    def column(self, name: str) -> np.ndarray:
        """One column of every example (e.g. `length`), as a NumPy array, read as Arrow."""
        values = self.table.with_format("arrow", columns=[name])[:][name].to_numpy(
            zero_copy_only=False)
        return values if self.rows is None else values[self.rows]

    def select(self, indices: Sequence[int] | np.ndarray) -> ExampleTable[T]:
        """The examples at `indices` (no copy: the same table, other rows)."""
        rows = np.asarray(indices, dtype=np.int64)
        return ExampleTable(self.table, self.build,
                            rows if self.rows is None else self.rows[rows])


def take(examples: Sequence[T], indices: Sequence[int]) -> list[T]:
    """The examples at `indices`: one read from an `ExampleTable`, else plain indexing."""
    if isinstance(examples, ExampleTable):
        return examples.take(indices)
    return [examples[i] for i in indices]
