"""Training and evaluation tables: CSV/TSV/Parquet/JSON Lines read by pyarrow, checked, shared per node.

One row is one (left, right) pair. The left fields (``leftKeys``) are texts; the first right
field (``rightKeys[0]``) is an image reference, the others texts; ``weightKey`` holds the
row's weight (graded relevance). A corpus (corpusData, ``Columns.corpus_of``) has documents
only: the right fields and the document id, checked and shared the same way.

Memory does not grow with Python objects per row: pyarrow parses the file into columns,
every rule is a vectorised pass (pyarrow.compute / numpy), and the checked, resolved table
(texts, resolved image locations, per-row field weights, ids) is written once per node as
an Arrow IPC file in the cache folder. Every rank and DataLoader worker on the node then
memory-maps that file: the page cache holds the table once, however many processes read it.
The first process to take the file lock builds the file; the others wait on the lock and map
it (a failed build leaves no file, so each of them fails with the same DataError).

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

Row numbers count data rows from 1 (the header is row 0; blank lines are not rows). Line
numbers, which differ from row + 1 only when a quoted field spans lines, are looked up by
re-reading the file only when there is something to report.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kontrast import contract

from .errors import DataError, DataProblem, ProblemCollector
from .locations import has_scheme, parent_location

if TYPE_CHECKING:
    from .params import Params

log = logging.getLogger(__name__)

#: Bumped whenever the layout of the node-shared table file changes.
TABLE_FORMAT = 2
MAX_PROBLEMS = 20
#: Data files above this size are checked in a child process (see shared_table_file).
IN_PROCESS_MAX_BYTES = 1 << 20
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_NON_FINITE = r"^[+-]?(nan|inf|infinity)$"
_URL = r"^[A-Za-z][A-Za-z0-9+.\-]*://"


@dataclass(frozen=True)
class Columns:
    """The columns a TrainJob reads and how it weighs them (the part of the spec a table needs)."""

    left_keys: tuple[str, ...]
    right_keys: tuple[str, ...]
    left_weights: tuple[float, ...]
    right_weights: tuple[float, ...]
    weight_key: Optional[str]                   #: None in a corpus (documents only, no pairs)
    query_id_key: Optional[str] = None
    doc_id_key: Optional[str] = None

    @classmethod
    def of(cls, params: "Params") -> "Columns":
        return cls(tuple(params.left_keys), tuple(params.right_keys), tuple(map(float, params.left_weights)),
                   tuple(map(float, params.right_weights)), params.weight_key, params.query_id_key,
                   params.doc_id_key)

    @classmethod
    def corpus_of(cls, params: "Params") -> "Columns":
        """The columns of a corpus file (corpusData): the right fields and the document id only."""
        return cls((), tuple(params.right_keys), (), tuple(map(float, params.right_weights)), None, None,
                   params.doc_id_key)

    @property
    def has_pairs(self) -> bool:
        """False for a corpus: documents without queries or row weights."""
        return self.weight_key is not None

    def wanted(self) -> list[tuple[str, str]]:
        """(column, the spec field naming it), in the order problems are reported."""
        out = [(k, f"spec.leftKeys[{i}]") for i, k in enumerate(self.left_keys)]
        out += [(k, f"spec.rightKeys[{i}]") for i, k in enumerate(self.right_keys)]
        out += [(self.weight_key, "spec.weightKey")] if self.weight_key else []
        out += [(k, f"spec.{f}") for k, f in ((self.query_id_key, "queryIdKey"), (self.doc_id_key, "docIdKey")) if k]
        return out


# --------------------------------------------------------------------------------------------
# reading (the I/O edge): any format -> an Arrow table of string columns (weight column aside)

def is_parquet(location: str) -> bool:
    return location.lower().endswith((".parquet", ".pq"))


def is_json_lines(location: str) -> bool:
    """.jsonl / .ndjson, possibly compressed (one JSON object per line, like Marqtune's documents.jsonl)."""
    return _uncompressed_name(location).endswith((".jsonl", ".ndjson"))


def _uncompressed_name(location: str) -> str:
    name = location.lower()
    for ext in _COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name


def delimiter_for(location: str) -> str:
    return "\t" if _uncompressed_name(location).endswith(".tsv") else ","


def _open(location: str):
    import fsspec

    return fsspec.open(location, "rb", compression="infer" if not is_parquet(location) else None)


def read_raw(location: str) -> pa.Table:
    """The file as an Arrow table with its header's (stripped) column names."""
    try:
        with _open(location) as f:
            if is_parquet(location):
                return read_parquet(location, f)
            return read_json_lines(f) if is_json_lines(location) else read_delimited(location, f)
    except FileNotFoundError:
        raise DataError([DataProblem(location, "file not found")]) from None
    except DataError:
        raise
    except Exception as exc:  # permission, network, decoding: all permanent for this run
        raise DataError([DataProblem(location, f"cannot read: {exc}")]) from None


def _header(location: str, f) -> list[str]:
    """The header row, parsed by Python's csv module (quotes, BOM) from the file's first bytes."""
    head = f.read(1 << 20)
    f.seek(0)
    text = head.decode("utf-8-sig", errors="replace")
    try:
        header = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter_for(location)))
    except StopIteration:
        raise DataError([DataProblem(location, "the file is empty (it needs a header row)")]) from None
    except csv.Error as exc:
        raise DataError([DataProblem(location, f"malformed header: {exc}", row=0, line=1)]) from None
    return header


def read_delimited(location: str, f) -> pa.Table:
    """A CSV/TSV read by pyarrow, every column as text (numbers are checked by the rules)."""
    import pyarrow.csv as pacsv

    header = _header(location, f)
    bad_rows: list[int] = []

    def invalid(row) -> str:
        bad_rows.append(row.actual_columns)
        return "skip"

    table = pacsv.read_csv(
        f,
        read_options=pacsv.ReadOptions(block_size=16 << 20),
        parse_options=pacsv.ParseOptions(delimiter=delimiter_for(location), newlines_in_values=True,
                                         invalid_row_handler=invalid),
        convert_options=pacsv.ConvertOptions(column_types={h: pa.string() for h in header},
                                             strings_can_be_null=False, quoted_strings_can_be_null=False))
    if bad_rows:
        found, dropped = _field_count_problems(location, len(header))
        if found:  # otherwise pyarrow skipped only lines of blanks, as the csv module does
            raise DataError(found, dropped)
    return table.rename_columns([h.strip() for h in header])


def read_json_lines(f) -> pa.Table:
    """One JSON object per line; its keys are the columns (a key absent from a line is empty)."""
    import pyarrow.json as pajson

    table = pajson.read_json(f, read_options=pajson.ReadOptions(block_size=16 << 20))
    return table.rename_columns([str(h).strip() for h in table.column_names])


def read_parquet(location: str, f) -> pa.Table:
    import pyarrow.parquet as pq

    table = pq.read_table(f)
    return table.rename_columns([str(h).strip() for h in table.column_names])


# --------------------------------------------------------------------------------------------
# line numbers (only on the error path: one Python pass over a file that is already failing)

def _csv_rows(location: str):
    """(row, line, field count) of every data row, as Python's csv module sees them (none if
    the file cannot be read: an in-memory table, or a file gone since)."""
    try:
        f = _open(location).open()
    except Exception:  # noqa: BLE001 - line numbers are a courtesy; the problem stands without
        return
    with f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
        reader = csv.reader(text, delimiter=delimiter_for(location))
        next(reader, None)
        row = 0
        for values in reader:
            if not values or (len(values) == 1 and not values[0].strip()):
                continue
            row += 1
            yield row, reader.line_num, len(values)


def _field_count_problems(location: str, width: int) -> tuple[list[DataProblem], int]:
    problems = ProblemCollector(MAX_PROBLEMS)
    for row, line, count in _csv_rows(location):
        if count != width:
            problems.add(DataProblem(location, f"the row has {count} fields but the header has {width}",
                                     row=row, line=line))
    return problems.problems, problems.dropped


def with_lines(location: str, problems: Sequence[DataProblem]) -> list[DataProblem]:
    """The problems with the file line of each row filled in (CSV/TSV only)."""
    rows = {p.row for p in problems if p.row is not None}
    if not rows or is_parquet(location) or is_json_lines(location):
        return list(problems)
    lines = {0: 1}
    last = max(rows)
    for row, line, _ in _csv_rows(location):
        lines[row] = line
        if row >= last:
            break
    return [DataProblem(p.file, p.message, p.row, p.column, lines.get(p.row) if p.row is not None else None)
            for p in problems]


# --------------------------------------------------------------------------------------------
# checking and resolving (pure: an Arrow table in, a checked table or problems out)

class _Problems(ProblemCollector):
    """Problems of one file, numbered by table row (0-based) until they are reported."""

    def __init__(self, file: str):
        super().__init__(MAX_PROBLEMS)
        self.file = file

    def rows(self, mask: np.ndarray, message, column: Optional[str] = None) -> None:
        """One problem per row set in ``mask``; ``message(i)`` words it (called for reported rows only)."""
        for i in np.flatnonzero(mask)[: MAX_PROBLEMS + 1]:
            self.add(DataProblem(self.file, message(int(i)), row=int(i) + 1, column=column))
        self.dropped += max(0, int(mask.sum()) - MAX_PROBLEMS - 1)

    def raise_if_any(self) -> None:
        if self.problems:
            found = sorted(self.problems, key=lambda p: (p.row or 0))
            raise DataError(with_lines(self.file, found), self.dropped)


def _check_header(table: pa.Table, cols: Columns, problems: _Problems) -> None:
    names = table.column_names
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
    problems = _Problems(file)
    problems.rows(mask, message, column)
    problems.raise_if_any()


def text_column(table: pa.Table, key: str) -> pa.Array:
    """A column as trimmed, non-null large strings (Parquet columns may be numbers or null)."""
    col = table.column(key)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.large_string())
    col = pc.fill_null(pc.utf8_trim_whitespace(col.cast(pa.large_string())), "")
    return col.combine_chunks()


def parse_weights(raw: pa.ChunkedArray, column: str, problems: _Problems) -> np.ndarray:
    """Row weights as float64; problems for empty, non-numeric, non-finite and negative ones."""
    if pa.types.is_integer(raw.type) or pa.types.is_floating(raw.type) or pa.types.is_decimal(raw.type):
        text = None
        values = pc.fill_null(pc.cast(raw, pa.float64()), np.nan).to_numpy()
        empty = raw.is_null().to_numpy(zero_copy_only=False)
        non_number = np.zeros(len(values), bool)
        non_finite = ~np.isfinite(values) & ~empty
    else:
        text = text_column(pa.table({column: raw}), column)
        try:   # the common case, every weight a number: one cast, no regular expressions
            values = pc.cast(text, pa.float64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = None
        if values is not None:
            return _check_numbers(values, text, column, problems)
        empty = pc.equal(text, "").to_numpy(zero_copy_only=False)
        number = pc.match_substring_regex(text, _NUMBER).to_numpy(zero_copy_only=False)
        non_finite = pc.match_substring_regex(text, _NON_FINITE, ignore_case=True).to_numpy(zero_copy_only=False)
        non_number = ~number & ~non_finite & ~empty
        values = pc.cast(pc.if_else(number, text, "0"), pa.float64()).to_numpy()
    return _report_weights(values, text, column, problems, empty, non_number, non_finite)


def _check_numbers(values: np.ndarray, text: pa.Array, column: str, problems: "_Problems") -> np.ndarray:
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
    from .locations import join_location, pvc_root

    url = pc.match_substring_regex(values, _URL)
    absolute = pc.starts_with(values, "/")
    keep = pc.or_(pc.or_(url, absolute), pc.equal(values, ""))
    joined = pc.binary_join_element_wise(pa.scalar(base_dir.rstrip("/"), pa.large_string()), values,
                                           pa.scalar("/", pa.large_string()))
    out = pc.if_else(keep, values, joined)
    is_pvc, is_file = pc.starts_with(values, "pvc://"), pc.starts_with(values, "file://")
    plain_pvc = plain_file = pa.repeat(False, len(values))
    if pc.any(is_pvc).as_py():
        rest = pc.utf8_slice_codeunits(values, 6)
        odd_path = pc.or_(pc.or_(pc.equal(rest, ""), pc.starts_with(rest, "/")),
                          pc.or_(pc.or_(pc.match_substring(rest, "//"), pc.ends_with(rest, "/")),
                                 pc.match_substring_regex(rest, r"(^|/)\.(/|$)")))
        plain_pvc = pc.and_(is_pvc, pc.invert(odd_path))
        root = pa.scalar(str(pvc_root()).rstrip("/"), pa.large_string())
        out = pc.if_else(plain_pvc, pc.binary_join_element_wise(root, rest, pa.scalar("/", pa.large_string())), out)
    if pc.any(is_file).as_py():
        rest = pc.utf8_slice_codeunits(values, 7)
        plain_file = pc.and_(is_file, pc.not_equal(rest, ""))
        out = pc.if_else(plain_file, rest, out)
    special = pc.or_(pc.or_(is_pvc, is_file),
                     pc.or_(pc.starts_with(values, "~"), pc.and_(absolute, pa.scalar(has_scheme(base_dir)))))
    odd = pc.and_(pc.and_(special, pc.not_equal(values, "")), pc.invert(pc.or_(plain_pvc, plain_file)))
    rows = np.flatnonzero(odd.to_numpy(zero_copy_only=False))
    if len(rows):
        cells = values.take(pa.array(rows))
        distinct = pc.unique(cells)
        fixed = pa.array([join_location(base_dir, v) for v in distinct.to_pylist()], pa.large_string())
        replaced = fixed.take(pc.index_in(cells, distinct))
        positions = np.full(len(values), -1, dtype=np.int64)
        positions[rows] = np.arange(len(rows))
        picked = replaced.take(pa.array(np.where(positions < 0, 0, positions)))
        out = pc.if_else(pa.array(positions >= 0), picked, out)
    return out


def codes(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Dense int64 codes of the values, numbered by first appearance (Arrow's hash table; the
    chunks of a chunked array share one dictionary, so equal values get one code across them)."""
    encoded = pc.dictionary_encode(values)
    chunks = encoded.chunks if isinstance(encoded, pa.ChunkedArray) else [encoded]
    parts = [c.indices.to_numpy(zero_copy_only=False).astype(np.int64) for c in chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def dense_ids(columns: Sequence[pa.Array]) -> np.ndarray:
    """int64 ids equal exactly for rows equal in every column, numbered by first appearance."""
    n = len(columns[0]) if columns else 0
    ids = np.zeros(n, dtype=np.int64)
    for col in columns:
        c = codes(col)
        ids = codes(pa.array(ids * (int(c.max(initial=0)) + 1) + c))   # < n * n: fits in int64
    return ids


def joint_ids(a: Sequence[pa.Array], b: Sequence[pa.Array]) -> tuple[np.ndarray, np.ndarray]:
    """``dense_ids`` of two tables' rows numbered together: rows of either table get equal ids
    exactly when they are equal in every column (e.g. an eval file's documents in a corpus)."""
    ids = dense_ids([pa.chunked_array([x, y]) for x, y in zip(a, b)])
    n = len(a[0]) if a else 0
    return ids[:n], ids[n:]


def first_rows(codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each distinct code among ``codes[rows]``, the first of ``rows`` that has it (ascending)."""
    first = np.full(int(codes.max(initial=-1)) + 1, -1, dtype=np.int64)
    first[codes[rows[::-1]]] = rows[::-1]           # the last write, i.e. the earliest row, wins
    return np.sort(first[first >= 0])


def check_table(raw: pa.Table, file: str, cols: Columns, *, require_positive_weight: bool = True) -> pa.Table:
    """The checked, resolved table the Dataset reads; raises DataError naming every problem.

    A corpus (``cols.has_pairs`` False) has the right side only: no left fields, weights or
    query ids.
    """
    problems = _Problems(file)
    _check_header(raw, cols, problems)
    problems.raise_if_any()
    if raw.num_rows == 0:
        raise DataError([DataProblem(file, "the file has a header but no data rows")])

    left = [text_column(raw, k) for k in cols.left_keys]
    right = [text_column(raw, k) for k in cols.right_keys]
    weights = parse_weights(raw.column(cols.weight_key), cols.weight_key, problems) if cols.has_pairs else None
    resolved: dict[str, Any] = {}
    for side, keys, base, texts in (("left", cols.left_keys, cols.left_weights, left),
                                    ("right", cols.right_keys, cols.right_weights, right)):
        if not keys:
            continue
        present = np.stack([pc.not_equal(t, "").to_numpy(zero_copy_only=False) for t in texts], axis=1)
        w, empty = side_weights(present, base)
        used = [k for k, b in zip(keys, base) if b > 0]
        problems.rows(empty, lambda i, side=side, used=used: f"the row is empty on the whole {side} side "
                      f"(no value in {used})", used[0] if len(used) == 1 else None)
        resolved[side] = w
    problems.raise_if_any()
    if weights is not None and require_positive_weight and not (weights > 0).any():
        raise DataError([DataProblem(file, "every row has weight 0, so there is nothing to learn from",
                                     column=cols.weight_key)])

    images = resolve_images(right[0], parent_location(file))
    doc_key = {"doc_key": text_column(raw, cols.doc_id_key)} if cols.doc_id_key else {}
    documents = pa.table({
        "image": images,
        **{f"right{i}": t for i, t in enumerate(right[1:], start=1)},
        "right_weights": _fixed_list(resolved["right"]),
        "image_code": pa.array(codes(images).astype(np.int32)),
        **doc_key,
    })
    documents = documents.append_column("right_id", pa.array(dense_ids(doc_identity(documents, cols))))
    if not cols.has_pairs:
        return documents
    query = [text_column(raw, cols.query_id_key)] if cols.query_id_key else \
        [t for t, b in zip(left, cols.left_weights) if b > 0]
    pairs = {
        **{f"left{i}": t for i, t in enumerate(left)},
        "left_weights": _fixed_list(resolved["left"]),
        "weight": pa.array(weights.astype(np.float32)),
        "left_id": pa.array(dense_ids(query)),
    }
    for name, column in pairs.items():
        documents = documents.append_column(name, column)
    return documents


def doc_identity(table: pa.Table, cols: Columns) -> list[pa.Array]:
    """The columns that identify a document: the docIdKey column, else the right fields of
    non-zero weight (the image as its resolved location). Equal in two tables exactly when the
    documents are the same, so an eval file's documents can be found in a corpus."""
    if cols.doc_id_key:
        return [table.column("doc_key").chunk(0)]
    names = ["image", *(f"right{i}" for i in range(1, len(cols.right_keys)))]
    return [table.column(n).combine_chunks() for n, b in zip(names, cols.right_weights) if b > 0]


def _fixed_list(matrix: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


# --------------------------------------------------------------------------------------------
# the node-shared table file

def default_cache() -> str:
    """$KONTRAST_CACHE, else ~/.cache/kontrast (see data.cache in the CRD)."""
    return os.environ.get(contract.CACHE_ENV) or str(Path.home() / ".cache" / "kontrast")


def source_stamp(location: str) -> dict[str, Any]:
    """What identifies this version of a data file: size and modification time (or ETag)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DataError([DataProblem(location, "file not found")]) from None
    except Exception as exc:  # noqa: BLE001 - unreachable store: permanent for this run
        raise DataError([DataProblem(location, f"cannot read: {exc}")]) from None
    keep = ("size", "mtime", "ETag", "etag", "LastModified", "last_modified", "md5Hash", "generation")
    return {k: str(info[k]) for k in keep if k in info}


def table_key(location: str, cols: Columns, require_positive_weight: bool) -> str:
    stamp = {"format": TABLE_FORMAT, "file": location, "source": source_stamp(location),
             "columns": cols.__dict__, "positive": require_positive_weight}
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:32]


def shared_table_file(location: str, cols: Columns, cache: str, *, require_positive_weight: bool = True) -> Path:
    """The node's checked table file for ``location``: built by the first process to get the
    lock, mapped by everyone.

    A file larger than ``IN_PROCESS_MAX_BYTES`` is built in a child process, so the parsed
    file and its temporaries never enter a training process's heap (whose allocator would
    keep much of them); smaller ones are built in place, saving the child's start-up.
    """
    folder = Path(cache) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    key = table_key(location, cols, require_positive_weight)
    target = folder / f"{key}.arrow"
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            log.debug("%s: reusing the checked table %s", location, target)
            return target
        started = time.monotonic()
        size = int(source_stamp(location).get("size") or 0)
        if size > IN_PROCESS_MAX_BYTES:
            _build_in_child(location, cols, target, require_positive_weight)
        else:
            build_table_file(location, cols, target, require_positive_weight)
        log.info("%s: checked and wrote the node's table file in %.1f s", location, time.monotonic() - started)
    return target


def build_table_file(location: str, cols: Columns, target: Path, require_positive_weight: bool) -> None:
    """Read, check and write the table file atomically (written beside it, then renamed)."""
    table = check_table(read_raw(location), location, cols, require_positive_weight=require_positive_weight)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=table.num_rows or None)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _build_in_child(location: str, cols: Columns, target: Path, require_positive_weight: bool) -> None:
    import subprocess
    import sys

    request = json.dumps({"location": location, "columns": cols.__dict__, "target": str(target),
                          "positive": require_positive_weight})
    done = subprocess.run([sys.executable, "-m", "kontrast.trainer.table"], input=request, text=True,
                          capture_output=True)
    if done.returncode == 0:
        return
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"building the table of {location} failed:\n{done.stderr[-4000:]}") from None
    raise DataError([DataProblem(**p) for p in answer["problems"]], answer["truncated"])


def _child_main() -> int:
    """``python -m kontrast.trainer.table``: build one table file (request JSON on stdin); a
    DataError comes back as JSON on stdout with exit code 78."""
    from dataclasses import asdict

    request = json.loads(sys.stdin.read())
    cols = Columns(**{k: tuple(v) if isinstance(v, list) else v for k, v in request["columns"].items()})
    try:
        build_table_file(request["location"], cols, Path(request["target"]), request["positive"])
    except DataError as exc:
        print(json.dumps({"problems": [asdict(p) for p in exc.problems], "truncated": exc.truncated}))
        return 78
    return 0


def map_table(path: str | Path) -> pa.Table:
    """The table file, memory-mapped: pages are shared with every process mapping it."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


# --------------------------------------------------------------------------------------------
# the mapped table, as the Dataset and evaluation read it

class StringColumn:
    """Access to one string column of the mapped table, one cell at a time (no Python object
    per row); ``rows`` maps positions to table rows when some rows were dropped."""

    def __init__(self, array: pa.Array, rows: Optional[np.ndarray] = None):
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
            return StringColumn(t.column(name).chunk(0), keep)

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
        used = np.flatnonzero(self.right_weights[:, 0] > 0)
        table_rows = used if self.keep is None else self.keep[used]
        first = first_rows(self.image_codes, table_rows)
        return self.images.array.take(pa.array(first, pa.int64())), first

    def rows_using(self, table_rows: Sequence[int]) -> np.ndarray:
        """Table rows whose (used) image is the image of one of ``table_rows``."""
        bad = np.isin(self.image_codes, self.image_codes[np.asarray(table_rows, dtype=np.int64)])
        return np.flatnonzero(bad & (_matrix(self.table.column("right_weights"))[:, 0] > 0))


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
                  require_positive_weight: bool = True, columns: Optional[Columns] = None) -> Examples:
    """Check ``location`` (once per node) and map its table (``columns``: default the TrainJob's pairs)."""
    cols = columns or Columns.of(params)
    path = shared_table_file(location, cols, cache or default_cache(), require_positive_weight=require_positive_weight)
    return Examples(location, cols, path)


def parse_table(file: str, text: str) -> pa.Table:
    """A CSV/TSV given as text, read as ``read_raw`` reads a file (for small in-memory tables)."""
    raw = read_delimited(file, io.BytesIO(text.encode("utf-8")))
    return raw.replace_schema_metadata({"kontrast.file": file})


def parse_examples(raw: pa.Table, params: "Params", *, require_positive_weight: bool = True,
                   columns: Optional[Columns] = None) -> Examples:
    """Check a table from ``parse_table`` and keep the result in memory (no table file)."""
    file = raw.schema.metadata[b"kontrast.file"].decode()
    cols = columns or Columns.of(params)
    checked = check_table(raw, file, cols, require_positive_weight=require_positive_weight)
    return Examples(file, cols, None, table=checked)


if __name__ == "__main__":
    sys.exit(_child_main())
