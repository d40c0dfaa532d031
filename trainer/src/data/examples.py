"""A checked data file as the Dataset and evaluation read it: ``Examples``, mapped from the node's table file.

``load_examples`` checks a file once per node (``shared_table``) and maps it;
``parse_examples`` checks a small in-memory table (``read.parse_table``) without a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import pyarrow as pa

from ..layout import default_cache
from . import arrow
from .build import check_table
from .check import doc_identity, first_rows
from .columns import Columns
from .shared_table import map_table, shared_table_file

if TYPE_CHECKING:
    from ..params import Params


class StringColumn:
    """Access to one string column of the mapped table, one cell at a time (no Python object
    per row); ``rows`` maps positions to table rows when some rows were dropped."""

    def __init__(self, array: pa.Array | pa.ChunkedArray, rows: Optional[np.ndarray] = None):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.array) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> str:
        return self.array[int(i if self.rows is None else self.rows[i])].as_py()


class Examples:
    """A checked data file, memory-mapped from the node's table file.

    Numeric columns are numpy views of the mapped pages; texts are read one cell at a time.
    ``keep`` (table rows, ascending) leaves out dropped rows, e.g. those whose image is bad
    under ``data.onBadImage: skip``; positions then count kept rows only. Pickling (DataLoader
    workers started by spawn/forkserver) sends the file's path, and the worker maps it again.
    """

    def __init__(self, file: str, columns: Columns, path: Optional[str | Path], keep: Optional[np.ndarray] = None,
                 table: Optional[pa.Table] = None):
        self.file, self.columns, self.keep = file, columns, keep
        self.path = str(path) if path is not None else None
        self.table = t = map_table(path) if table is None else table

        def rows(a: np.ndarray) -> np.ndarray:
            return a if keep is None else a[keep]

        def text(name: str) -> StringColumn:
            column = t.column(name)   # a chunk per block of the data file (the numbers have one)
            return StringColumn(column.chunk(0) if column.num_chunks == 1 else column, keep)

        self.left = [text(f"left{i}") for i in range(len(columns.left_keys))]
        self.right = [text(f"right{i}") for i in range(1, len(columns.right_keys))]
        self.images = text("image")
        self.right_weights = rows(_matrix(t.column("right_weights")))
        self.right_ids = rows(_numbers(t.column("right_id")))
        self.image_codes = _numbers(t.column("image_code"))   #: of every table row, dropped or not
        # A corpus (documents only) has no queries and no row weights.
        pairs = columns.has_pairs
        self.left_weights = rows(_matrix(t.column("left_weights"))) if pairs else None
        self.weights = rows(_numbers(t.column("weight"))) if pairs else None
        self.left_ids = rows(_numbers(t.column("left_id"))) if pairs else None

    #: Rows scanned at a time by whole-table passes (``used_images``): a pass over 10M rows in
    #: one go leaves its temporaries (about 20 bytes a row) in the process's heap.
    SCAN_ROWS = 1 << 18

    def __reduce__(self):
        return (Examples, (self.file, self.columns, self.path, self.keep, None if self.path else self.table))

    def without(self, table_rows: Sequence[int]) -> "Examples":
        """The same file without the given table rows (0-based)."""
        keep = np.ones(self.table.num_rows, dtype=bool)
        keep[np.asarray(table_rows, dtype=np.int64)] = False
        if self.keep is not None:
            keep &= np.isin(np.arange(self.table.num_rows), self.keep)
        return Examples(self.file, self.columns, self.path, np.flatnonzero(keep),
                        None if self.path else self.table)

    def __len__(self) -> int:
        return len(self.right_ids)

    def doc_identity(self) -> list[pa.Array]:
        """The identity columns of every table row's document (``doc_identity``), dropped rows included."""
        return doc_identity(self.table, self.columns)

    @property
    def left_keys(self) -> list[str]:
        return list(self.columns.left_keys)

    @property
    def right_keys(self) -> list[str]:
        return list(self.columns.right_keys)

    def left_texts(self, i: int) -> list[str]:
        return [c[i] for c in self.left]

    def right_texts(self, i: int) -> list[str]:
        return [c[i] for c in self.right]

    def image(self, i: int) -> Optional[str]:
        return self.images[i] or None

    @property
    def uses_images(self) -> bool:
        """False when the image field has weight 0 everywhere (no image is ever read)."""
        return bool(len(self) and self.right_weights[:, 0].max() > 0)

    def used_images(self) -> tuple[pa.Array, np.ndarray]:
        """The distinct images some row uses (image weight > 0) and the table row of the first
        such row of each.

        Rows whose image weight is 0 (an empty cell, or rightWeights[0] == 0) never read their
        image, so their images are neither fetched nor checked.
        """
        first = np.full(int(self.image_codes.max(initial=-1)) + 1, -1, dtype=np.int64)
        for start in range(0, len(self), self.SCAN_ROWS):   # temporaries of a slice, not of every row
            used = np.flatnonzero(self.right_weights[start:start + self.SCAN_ROWS, 0] > 0) + start
            table_rows = used if self.keep is None else self.keep[used]
            found = first_rows(self.image_codes, table_rows)
            fresh = found[first[self.image_codes[found]] < 0]
            first[self.image_codes[fresh]] = fresh
        first = np.sort(first[first >= 0])
        return take_rows(self.images.array, first), first

    def rows_using(self, table_rows: Sequence[int]) -> np.ndarray:
        """Table rows whose (used) image is the image of one of ``table_rows``."""
        bad = np.isin(self.image_codes, self.image_codes[np.asarray(table_rows, dtype=np.int64)])
        return np.flatnonzero(bad & (_matrix(self.table.column("right_weights"))[:, 0] > 0))


def take_rows(values: pa.Array | pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """``values[rows]``, taken chunk by chunk: Arrow's take on a chunked string column first
    concatenates every chunk (a copy of the whole column, which the memory pool then keeps),
    and the mapped table's text columns have a chunk per block of the data file."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(values, pa.Array):
        return values.take(arrow.array(rows))
    ends = np.cumsum([len(c) for c in values.chunks])
    chunk_of = np.searchsorted(ends, rows, side="right")
    order = np.argsort(chunk_of, kind="stable")
    parts = [values.chunk(int(c)).take(arrow.array(rows[order][chunk_of[order] == c] - (ends[c] - len(values.chunk(int(c))))))
             for c in np.unique(chunk_of)]
    taken = pa.concat_arrays(parts) if parts else pa.nulls(0, values.type)
    return taken.take(arrow.array(np.argsort(order, kind="stable")))


def _numbers(col: pa.ChunkedArray) -> np.ndarray:
    """A primitive column without nulls as a numpy view of its (mapped) buffer."""
    arr = col.chunk(0)
    dtype = {pa.float32(): np.float32, pa.int32(): np.int32, pa.int64(): np.int64}[arr.type]
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr) + arr.offset)[arr.offset:]


def _matrix(col: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size list column of float32 as an [n, k] numpy view of its buffer."""
    arr = col.chunk(0)
    k = arr.type.list_size
    values = np.frombuffer(arr.values.buffers()[1], dtype=np.float32)
    return values[arr.values.offset:][arr.offset * k:(arr.offset + len(arr)) * k].reshape(len(arr), k)


def load_examples(location: str, params: "Params", *, cache: Optional[str] = None,
                  require_positive_weight: bool = True, columns: Optional[Columns] = None,
                  build_here: bool = False) -> Examples:
    """Check ``location`` (once per node) and map its table (``columns``: default the TrainJob's
    pairs; ``build_here``: see ``shared_table_file``)."""
    cols = columns or Columns.of(params)
    path = shared_table_file(location, cols, cache or default_cache(), require_positive_weight=require_positive_weight,
                             build_here=build_here)
    return Examples(location, cols, path)


def parse_examples(raw: pa.Table, params: "Params", *, require_positive_weight: bool = True,
                   columns: Optional[Columns] = None) -> Examples:
    """Check a table from ``parse_table`` and keep the result in memory (no table file)."""
    file = raw.schema.metadata[b"kontrast.file"].decode()
    cols = columns or Columns.of(params)
    checked = check_table(raw, file, cols, require_positive_weight=require_positive_weight)
    return Examples(file, cols, None, table=checked)
