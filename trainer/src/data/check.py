"""The rules a data file is checked by, and how its cells are resolved (pure: Arrow arrays in,
checked arrays or problems out). ``build.py`` applies them to a file one block at a time.

One row is one (left, right) pair. The left fields (``leftKeys``) are texts; the first right
field (``rightKeys[0]``) is an image reference, the others texts; ``weightKey`` holds the
row's weight (graded relevance). A corpus (corpusData, ``Columns.corpus_of``) has documents
only: the right fields and the document id, checked the same way. Every rule is a
vectorised pass (pyarrow.compute / numpy): no Python object per row.

Rules (each violation is a ``DataError`` naming file, row and column, raised before
training starts; the trainer exits with 78):

* the file is not empty and has data rows; the header names no column twice and every
  column the TrainJob names; every row has as many fields as the header;
* the weight is a finite number >= 0 (0 is allowed: the row only serves as a negative);
* a field that is empty in a row gets weight 0 there, and the row's field weights are
  renormalised to sum to 1; a row whose fields with non-zero weight are all empty on one
  side is an error (it has no embedding on that side).

Identity: ``left_ids`` / ``right_ids`` number the distinct queries and documents in order of
first appearance. A query is identified by the ``queryIdKey`` column when the TrainJob names
one, else by its left fields of non-zero weight; a document by ``docIdKey``, else by its
right fields of non-zero weight (the image by its resolved location). Fields of weight 0
never reach the model, so they do not make two rows different queries or documents.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError, DataProblem, ProblemCollector
from ..locations import has_scheme
from . import arrow
from .columns import Columns
from .read import MAX_PROBLEMS, with_lines

_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_NON_FINITE = r"^[+-]?(nan|inf|infinity)$"
_URL = r"^[A-Za-z][A-Za-z0-9+.\-]*://"


class Problems(ProblemCollector):
    """Problems of one file, numbered by table row (0-based) until they are reported."""

    def __init__(self, file: str):
        super().__init__(MAX_PROBLEMS)
        self.file = file
        self.offset = 0     #: table rows before the block being checked (files are checked a block at a time)

    def rows(self, mask: np.ndarray, message, column: Optional[str] = None) -> None:
        """One problem per row set in ``mask`` (rows of the current block); ``message(i)`` words
        it (called for reported rows only)."""
        for i in np.flatnonzero(mask)[: MAX_PROBLEMS + 1]:
            self.add(DataProblem(self.file, message(int(i)), row=self.offset + int(i) + 1, column=column))
        self.dropped += max(0, int(mask.sum()) - MAX_PROBLEMS - 1)

    def error(self) -> Optional[DataError]:
        """The DataError naming every problem (with line numbers), or None."""
        if not self.problems:
            return None
        found = sorted(self.problems, key=lambda p: (p.row or 0))
        return DataError(with_lines(self.file, found), self.dropped)

    def raise_if_any(self) -> None:
        if (error := self.error()) is not None:
            raise error


def check_header(names: Sequence[str], cols: Columns, problems: Problems) -> None:
    for i, h in enumerate(names):
        if h in names[:i]:
            problems.add(DataProblem(problems.file, f"the header names column {h!r} twice", row=0, column=h))
    for key, field in cols.wanted():
        if key not in names:
            have = ", ".join(repr(h) for h in names) or "nothing"
            problems.add(DataProblem(problems.file, f"column not found (named by {field}); the header has {have}",
                                     row=0, column=key))


def raise_row_problems(file: str, table_rows: np.ndarray, message, column: Optional[str] = None) -> None:
    """A DataError naming each of the given 0-based table rows of ``file`` (``message(i)`` words
    row i; at most MAX_PROBLEMS are listed), with line numbers; nothing if there are none."""
    table_rows = np.asarray(table_rows, dtype=np.int64)
    if not len(table_rows):
        return
    mask = np.zeros(int(table_rows.max()) + 1, dtype=bool)
    mask[table_rows] = True
    problems = Problems(file)
    problems.rows(mask, message, column)
    problems.raise_if_any()


def text_column(table: pa.Table, key: str) -> pa.Array:
    """A column as trimmed, non-null large strings (Parquet columns may be numbers or null)."""
    col = table.column(key)
    if not pa.types.is_large_string(col.type):
        col = pc.cast(col, pa.large_string())
    col = pc.utf8_trim_whitespace(col)
    if col.null_count:      # Parquet and JSON cells may be null; CSV cells never are
        col = pc.fill_null(col, arrow.scalar(""))
    return col.combine_chunks()


def parse_weights(raw: pa.ChunkedArray, column: str, problems: Problems) -> np.ndarray:
    """Row weights as float64; problems for empty, non-numeric, non-finite and negative ones."""
    if pa.types.is_integer(raw.type) or pa.types.is_floating(raw.type) or pa.types.is_decimal(raw.type):
        text = None
        values = arrow.to_numpy(pc.fill_null(pc.cast(raw, pa.float64()), arrow.scalar(np.nan)))
        empty = arrow.to_numpy(raw.is_null())
        non_number = np.zeros(len(values), bool)
        non_finite = ~np.isfinite(values) & ~empty
    else:
        text = text_column(pa.table({column: raw}), column)
        try:   # the common case, every weight a number: one cast, no regular expressions
            values = arrow.to_numpy(pc.cast(text, pa.float64()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = None
        if values is not None:
            return _check_numbers(values, text, column, problems)
        empty = arrow.to_numpy(pc.equal(text, arrow.scalar("")))
        number = arrow.to_numpy(pc.match_substring_regex(text, _NUMBER))
        non_finite = arrow.to_numpy(pc.match_substring_regex(text, _NON_FINITE, ignore_case=True))
        non_number = ~number & ~non_finite & ~empty
        values = arrow.to_numpy(pc.cast(pc.if_else(arrow.array(number), text, arrow.scalar("0")), pa.float64()))
    return _report_weights(values, text, column, problems, empty, non_number, non_finite)


def _check_numbers(values: np.ndarray, text: pa.Array, column: str, problems: "Problems") -> np.ndarray:
    none = np.zeros(len(values), bool)
    return _report_weights(values, text, column, problems, none, none, ~np.isfinite(values))


def _report_weights(values, text, column, problems, empty, non_number, non_finite) -> np.ndarray:
    negative = np.isfinite(values) & (values < 0) & ~empty & ~non_number

    def shown(i: int) -> str:
        return text[i].as_py() if text is not None else repr(float(values[i]))

    problems.rows(empty, lambda i: "the weight is empty; it must be a number >= 0", column)
    problems.rows(non_number, lambda i: f"the weight {shown(i)!r} is not a number", column)
    problems.rows(non_finite, lambda i: f"the weight {shown(i)!r} is not a finite number", column)
    problems.rows(negative, lambda i: f"the weight {shown(i)!r} is negative; weights must be >= 0", column)
    return values


def side_weights(present: np.ndarray, base: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """([n, k] field weights, 0 for empty fields and renormalised; [n] True where nothing is left)."""
    w = present * np.asarray(base, dtype=np.float64)[None, :]
    total = w.sum(axis=1)
    empty = total <= 0
    return (w / np.where(empty, 1.0, total)[:, None]).astype(np.float32), empty


def resolve_images(values: pa.Array, base_dir: str) -> pa.Array:
    """Image cells as locations, as ``locations.join_location`` gives them, vectorised: relative
    ones joined to the data file's folder, ``file://`` stripped, plain ``pvc://claim/path``
    mapped under the claims' mount root (a catalogue on a PVC has a million of those). Only
    the rare other forms (``~``, ``/x`` on a URL base, odd pvc:// paths) take one Python call
    per distinct cell."""
    from ..locations import join_location, pvc_root

    url = pc.match_substring_regex(values, _URL)
    absolute = pc.starts_with(values, "/")
    keep = pc.or_(pc.or_(url, absolute), pc.equal(values, arrow.scalar("")))
    joined = pc.binary_join_element_wise(arrow.scalar(base_dir.rstrip("/")), values, arrow.scalar("/"))
    out = pc.if_else(keep, values, joined)
    is_pvc, is_file = pc.starts_with(values, "pvc://"), pc.starts_with(values, "file://")
    plain_pvc = plain_file = pa.repeat(arrow.scalar(False), len(values))
    if pc.any(is_pvc).as_py():
        rest = pc.utf8_slice_codeunits(values, 6)
        odd_path = pc.or_(pc.or_(pc.equal(rest, arrow.scalar("")), pc.starts_with(rest, "/")),
                          pc.or_(pc.or_(pc.match_substring(rest, "//"), pc.ends_with(rest, "/")),
                                 pc.match_substring_regex(rest, r"(^|/)\.(/|$)")))
        plain_pvc = pc.and_(is_pvc, pc.invert(odd_path))
        root = arrow.scalar(str(pvc_root()).rstrip("/"))
        out = pc.if_else(plain_pvc, pc.binary_join_element_wise(root, rest, arrow.scalar("/")), out)
    if pc.any(is_file).as_py():
        rest = pc.utf8_slice_codeunits(values, 7)
        plain_file = pc.and_(is_file, pc.not_equal(rest, arrow.scalar("")))
        out = pc.if_else(plain_file, rest, out)
    special = pc.or_(pc.or_(is_pvc, is_file),
                     pc.or_(pc.starts_with(values, "~"), pc.and_(absolute, arrow.scalar(has_scheme(base_dir)))))
    odd = pc.and_(pc.and_(special, pc.not_equal(values, arrow.scalar(""))), pc.invert(pc.or_(plain_pvc, plain_file)))
    rows = np.flatnonzero(arrow.to_numpy(odd))
    if len(rows):
        cells = values.take(arrow.array(rows))
        distinct = pc.unique(cells)
        fixed = arrow.strings([join_location(base_dir, v) for v in distinct.to_pylist()])
        replaced = fixed.take(pc.index_in(cells, distinct))
        positions = np.full(len(values), -1, dtype=np.int64)
        positions[rows] = np.arange(len(rows))
        picked = replaced.take(arrow.array(np.where(positions < 0, 0, positions)))
        out = pc.if_else(arrow.array(positions >= 0), picked, out)
    return out


def codes(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Dense int64 codes of the values, numbered by first appearance (Arrow's hash table; the
    chunks of a chunked array share one dictionary, so equal values get one code across them)."""
    encoded = pc.dictionary_encode(values)
    chunks = encoded.chunks if isinstance(encoded, pa.ChunkedArray) else [encoded]
    parts = [arrow.to_numpy(c.indices).astype(np.int64) for c in chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def dense_ids(columns: Sequence[pa.Array | pa.ChunkedArray]) -> np.ndarray:
    """int64 ids equal exactly for rows equal in every column, numbered by first appearance."""
    n = len(columns[0]) if columns else 0
    ids = np.zeros(n, dtype=np.int64)
    for col in columns:
        c = codes(col)
        ids = codes(arrow.array(ids * (int(c.max(initial=0)) + 1) + c))   # < n * n: fits in int64
    return ids


def joint_ids(a: Sequence[pa.ChunkedArray], b: Sequence[pa.ChunkedArray]) -> tuple[np.ndarray, np.ndarray]:
    """``dense_ids`` of two tables' rows numbered together: rows of either table get equal ids
    exactly when they are equal in every column (e.g. an eval file's documents in a corpus)."""
    ids = dense_ids([pa.chunked_array([*_chunks(x), *_chunks(y)]) for x, y in zip(a, b)])
    n = len(a[0]) if a else 0
    return ids[:n], ids[n:]


def first_rows(codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each distinct code among ``codes[rows]``, the first of ``rows`` that has it (ascending)."""
    first = np.full(int(codes.max(initial=-1)) + 1, -1, dtype=np.int64)
    first[codes[rows[::-1]]] = rows[::-1]           # the last write, i.e. the earliest row, wins
    return np.sort(first[first >= 0])


def doc_identity(table: pa.Table, cols: Columns) -> list[pa.ChunkedArray]:
    """The columns that identify a document: the docIdKey column, else the right fields of
    non-zero weight (the image as its resolved location). Equal in two tables exactly when the
    documents are the same, so an eval file's documents can be found in a corpus."""
    if cols.doc_id_key:
        return [table.column("doc_key")]
    names = ["image", *(f"right{i}" for i in range(1, len(cols.right_keys)))]
    return [table.column(n) for n, b in zip(names, cols.right_weights) if b > 0]


def _chunks(values: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return values.chunks if isinstance(values, pa.ChunkedArray) else [values]
