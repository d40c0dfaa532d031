"""Reading data files (the I/O edge): CSV/TSV/Parquet/JSON Lines, read by pyarrow, into Arrow
tables of string columns (numbers are checked by ``check.py``).

``read_batches`` streams a file one block at a time (1 MiB of CSV, or 256k rows of Parquet),
so the node's table builder never holds the whole parsed file (``build.py``).

Row numbers count data rows from 1 (the header is row 0; blank lines are not rows). Line
numbers, which differ from row + 1 only when a quoted field spans lines, are looked up by
re-reading the file only when there is something to report (``with_lines``: one Python pass
over a file that is already failing).
"""

from __future__ import annotations

import csv
import io
from typing import Iterator, Sequence

import pyarrow as pa

from ..errors import DataError, DataProblem, ProblemCollector
from ..locations import has_scheme

#: Problems listed per file; the rest are counted.
MAX_PROBLEMS = 20
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
#: CSV bytes per streamed block: large enough that per-block overheads stay small, small
#: enough that a block's temporaries (and what the allocators keep of them) stay small. 4 MiB
#: blocks peaked 45 to 70 MiB higher at 1M rows and 110 to 160 MiB higher at 10M, for 10 %
#: less time at 10M (16 MiB: about 100 MiB more again).
BLOCK_BYTES = 1 << 20
#: pyarrow's streaming CSV reader reads up to 32 blocks ahead on its I/O thread (its
#: background generator's queue), so it reads quarter blocks, handed on four at a time:
#: 8 MiB read ahead instead of 32.
READS_PER_BLOCK = 4
PARQUET_BATCH_ROWS = 1 << 18


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
    """The file for reading (closing it closes everything under it), decompressed by its suffix.
    A plain local file is opened directly: fsspec (and the asyncio it imports) is 20 ms of a
    small file's --check."""
    if not has_scheme(location) and _uncompressed_name(location) == location.lower():
        return open(location, "rb")
    import fsspec

    return fsspec.open(location, "rb", compression="infer" if not is_parquet(location) else None).open()


def read_batches(location: str) -> Iterator[pa.Table]:
    """The file as a stream of Arrow tables with its header's (stripped) column names: first an
    empty table that carries the names (even a file without data rows has them), then one
    table per block. A CSV whose rows have the wrong number of fields raises its DataError
    once the stream is read to the end (every such row is found first)."""
    try:
        with _open(location) as f:
            if is_parquet(location):
                yield from _parquet_batches(f)
            elif is_json_lines(location):
                table = read_json_lines(f)
                yield table.slice(0, 0)
                yield table
            else:
                yield from _delimited_batches(location, f)
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


def _delimited_batches(location: str, f) -> Iterator[pa.Table]:
    """A CSV/TSV read by pyarrow's streaming reader, every column as text (numbers are checked
    by the rules); large strings, the type the checked table keeps."""
    import pyarrow.csv as pacsv

    header = _header(location, f)
    names = [h.strip() for h in header]
    bad_rows: list[int] = []

    def invalid(row) -> str:
        bad_rows.append(row.actual_columns)
        return "skip"

    reader = pacsv.open_csv(
        f,
        # one thread: the builder's own work per block outweighs the parsing, and reader
        # threads parsing ahead cost more CPU (system time) and memory than they save (a
        # 1M-row --check: 1.6 to 2.5 s instead of 2.0 to 3.0, 20 to 40 MiB less at the peak)
        read_options=pacsv.ReadOptions(block_size=max(BLOCK_BYTES // READS_PER_BLOCK, 1), use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter_for(location), newlines_in_values=True,
                                         invalid_row_handler=invalid),
        convert_options=pacsv.ConvertOptions(column_types={h: pa.large_string() for h in header},
                                             strings_can_be_null=False, quoted_strings_can_be_null=False))
    yield pa.Table.from_arrays([pa.nulls(0, pa.large_string())] * len(names), names=names)
    batches = []
    for batch in reader:
        batches.append(batch)
        if len(batches) == READS_PER_BLOCK:
            yield pa.Table.from_batches(batches).rename_columns(names)
            batches = []
    if batches:
        yield pa.Table.from_batches(batches).rename_columns(names)
    if bad_rows:
        found, dropped = _field_count_problems(location, len(header))
        if found:  # otherwise pyarrow skipped only lines of blanks, as the csv module does
            raise DataError(found, dropped)


def _parquet_batches(f) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(f)
    names = [str(h).strip() for h in parquet.schema_arrow.names]
    yield parquet.schema_arrow.empty_table().rename_columns(names)
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        yield pa.Table.from_batches([batch]).rename_columns(names)


def read_delimited(location: str, f) -> pa.Table:
    """A whole CSV/TSV as one table (small in-memory tables; files are streamed)."""
    blocks = list(_delimited_batches(location, f))
    return pa.concat_tables(blocks).combine_chunks()


def read_json_lines(f) -> pa.Table:
    """One JSON object per line; its keys are the columns (a key absent from a line is empty)."""
    import pyarrow.json as pajson

    table = pajson.read_json(f, read_options=pajson.ReadOptions(block_size=16 << 20))
    return table.rename_columns([str(h).strip() for h in table.column_names])


def parse_table(file: str, text: str) -> pa.Table:
    """A CSV/TSV given as text, read as ``read_batches`` reads a file (for small in-memory tables)."""
    raw = read_delimited(file, io.BytesIO(text.encode("utf-8")))
    return raw.replace_schema_metadata({"kontrast.file": file})


def _csv_rows(location: str):
    """(row, line, field count) of every data row, as Python's csv module sees them (none if
    the file cannot be read: an in-memory table, or a file gone since)."""
    try:
        f = _open(location)
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
