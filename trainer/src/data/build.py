"""Building the checked table from a stream of blocks, holding only a few bytes per row.

A file is read a block at a time (``read.read_batches``). Each block is checked by the rules
of ``check.py`` and its text columns (resolved image, texts, ids' key columns) are handed on
at once, to be written to the node's table file; what is kept per row until the end is
numbers only: field weights, the row weight and each identity column's int32 code. The codes
are numbered across blocks by first appearance (``FirstSeenCodes``), the order a single pass
over the whole file gives, so the ids are those of checking the file whole.

The builder's memory is then a block's temporaries, the per-row numbers (about 30 bytes a
row) and each identity column's distinct values: a catalogue whose queries repeat holds
little; one where every row is a new query holds that column's text once, and while merging
a few times the pending rows' text (a quarter of the known values, at most 1M rows). What the
allocators keep of the temporaries is the builder process's part (``shared_table.BUILDER_POOL``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError, DataProblem
from ..locations import parent_location
from . import arrow
from .check import Problems, check_header, parse_weights, resolve_images, side_weights, text_column
from .columns import Columns


class FirstSeenCodes:
    """Dense codes of one column's values by first appearance, over a stream of blocks, held as
    int32 per row and the distinct values once.

    Blocks wait until enough rows are pending; then their values are numbered among themselves
    (one ``dictionary_encode``: the pending distinct values in order of first appearance), those
    looked up among the values numbered before (``index_in`` hashes the pending values and
    scans the known ones), and the ones not found numbered next, in their pending order: a
    value first seen in block k comes after everything from the blocks before it, so the order
    is a single pass's. Only pending values are ever hashed together, so a merge's temporaries
    are a few times the pending text, not the column's. Merging once the pending rows reach a
    quarter of the known values keeps the scans linear overall; the cap bounds a merge of a
    column where nearly every row is new.
    """

    #: Rows pending before a merge: a quarter of the known values, within these bounds.
    MIN_MERGE, MAX_MERGE = 1 << 16, 1 << 20

    def __init__(self):
        self._known: list[pa.Array] = []        #: the distinct values numbered so far, in order
        self.count = 0                          #: how many there are (all of them after ``block_codes``)
        self._pending: list[pa.Array] = []      #: blocks not yet numbered
        self._pending_rows = 0
        self._blocks: list[np.ndarray] = []     #: int32 codes of each block numbered

    def add(self, values: pa.Array) -> None:
        """The next block's values."""
        self._pending.append(values)
        self._pending_rows += len(values)
        if self._pending_rows >= min(max(self.count // 4, self.MIN_MERGE), self.MAX_MERGE):
            self._merge()

    def _merge(self) -> None:
        encoded = pc.dictionary_encode(pa.chunked_array(self._pending, type=self._pending[0].type))
        # Arrow leaves empty chunks out: the rows' codes are split back by the blocks' lengths
        values = encoded.chunks[0].dictionary if encoded.num_chunks else self._pending[0].slice(0, 0)
        code = self._number(values)
        rows = code[np.concatenate([arrow.to_numpy(c.indices) for c in encoded.chunks] or [np.zeros(0, np.int32)])]
        self._blocks.extend(np.split(rows, np.cumsum([len(b) for b in self._pending])[:-1]))
        self._pending, self._pending_rows = [], 0

    def _number(self, values: pa.Array) -> np.ndarray:
        """The code of each of the pending distinct values (in order of first appearance): its
        code if known, else the next one free, in that order."""
        code = np.full(len(values), -1, dtype=np.int32)
        if self._known:
            # each known value's place among the pending values (hashing those, not the known)
            at = pc.index_in(pa.chunked_array(self._known), value_set=values).combine_chunks()
            found = at.is_valid()
            code[arrow.to_numpy(at.filter(found))] = np.flatnonzero(arrow.to_numpy(found))
        new = code < 0
        added = int(new.sum())
        code[new] = np.arange(self.count, self.count + added, dtype=np.int32)
        if added:
            self._known.append(values.filter(arrow.array(new)))
        self.count += added
        return code

    def block_codes(self) -> list[np.ndarray]:
        """Every block's codes (int32), numbered over all blocks, once all blocks are in: the
        distinct values themselves are let go (only ``count`` is needed after)."""
        if self._pending:
            self._merge()
        self._known = []
        return self._blocks


def combined_block_codes(columns: list[FirstSeenCodes], rows: int) -> np.ndarray:
    """int64 ids equal exactly for rows whose values are equal in every column, numbered by
    first appearance (``check.dense_ids``): each further column's codes are paired with the
    ids so far, a block at a time, and the pairs numbered as values of their own, as the texts
    are (one hash table over every row's pairs took 30 MiB at 1M rows, the builder's peak)."""
    if not columns:
        return np.zeros(rows, dtype=np.int64)
    ids = columns[0]
    for column in columns[1:]:
        pairs = FirstSeenCodes()
        for a, b in zip(ids.block_codes(), column.block_codes()):
            pairs.add(arrow.array(a.astype(np.int64) * column.count + b))   # < rows * rows: fits in int64
        ids = pairs
    return np.concatenate(ids.block_codes(), dtype=np.int64)


class TableBuilder:
    """Checks a file's blocks in order (``add``: the block's text columns back) and gives the
    per-row numbers once all are in (``finish``). Problems of every block are gathered and
    raised together by ``finish``, as a check of the whole file would name them.

    The checked table is the text columns of every block followed by the numbers:
    ``image``, ``right1``.., ``doc_key`` (docIdKey), ``left0``..; ``right_weights``,
    ``image_code``, ``right_id``; with pairs also ``left_weights``, ``weight``, ``left_id``.
    A corpus (``cols.has_pairs`` False) has the right side only.
    """

    def __init__(self, file: str, cols: Columns, names: list[str], *, require_positive_weight: bool = True):
        self.file, self.cols, self.require_positive_weight = file, cols, require_positive_weight
        self.problems = Problems(file)
        check_header(names, cols, self.problems)
        self.rows = 0
        self.any_positive = False
        self._numbers: dict[str, list[np.ndarray]] = {"right_weights": [], "left_weights": [], "weight": []}
        self._images = FirstSeenCodes()
        self._doc = [FirstSeenCodes() for _ in self._doc_columns()]
        self._query = [FirstSeenCodes() for _ in self._query_columns()]

    def header_problems(self) -> Optional[DataError]:
        """The header's problems (missing or repeated columns), if any: nothing else can be checked."""
        return self.problems.error()

    def _doc_columns(self) -> list[str]:
        """The text columns that identify a document (``check.doc_identity``), beside the image."""
        if self.cols.doc_id_key:
            return ["doc_key"]
        return [f"right{i}" for i, b in enumerate(self.cols.right_weights) if i and b > 0]

    def _query_columns(self) -> list[str]:
        if not self.cols.has_pairs:
            return []
        if self.cols.query_id_key:
            return ["query_key"]
        return [f"left{i}" for i, b in enumerate(self.cols.left_weights) if b > 0]

    def add(self, raw: pa.Table) -> pa.Table:
        """Check one block; its text columns, to be written before the next block is read."""
        cols, problems = self.cols, self.problems
        problems.offset = self.rows
        self.rows += raw.num_rows
        texts = {f"left{i}": text_column(raw, k) for i, k in enumerate(cols.left_keys)}
        right = [text_column(raw, k) for k in cols.right_keys]
        if cols.has_pairs:
            weights = parse_weights(raw.column(cols.weight_key), cols.weight_key, problems)
            self.any_positive = self.any_positive or bool((weights > 0).any())
            self._numbers["weight"].append(weights.astype(np.float32))
        for side, base, fields in (("left", cols.left_weights, list(texts.values())),
                                   ("right", cols.right_weights, right)):
            if fields:
                self._numbers[f"{side}_weights"].append(self._field_weights(side, base, fields))
        block = {"image": self._resolved_images(right[0]),
                 **{f"right{i}": t for i, t in enumerate(right) if i}, **texts}
        if cols.doc_id_key:
            block["doc_key"] = text_column(raw, cols.doc_id_key)
        keys = {"query_key": text_column(raw, cols.query_id_key)} if cols.has_pairs and cols.query_id_key else {}
        self._images.add(block["image"])
        for codes_, name in zip(self._doc, self._doc_columns()):
            codes_.add(block[name])
        for codes_, name in zip(self._query, self._query_columns()):
            codes_.add({**block, **keys}[name])
        return pa.table(block)

    def _resolved_images(self, cells: pa.Array) -> pa.Array:
        """The block's image cells resolved to locations, each distinct cell once (a catalogue
        names each image on many rows). Two cells that resolve to the same location ("a.png"
        and "/data/a.png") are one image: the images are numbered by location."""
        cells = pc.dictionary_encode(cells)
        return resolve_images(cells.dictionary, parent_location(self.file)).take(cells.indices)

    def _field_weights(self, side: str, base, fields: list[pa.Array]) -> np.ndarray:
        """The block's field weights of one side (empty fields 0, the rest renormalised); a row
        empty on the whole side is a problem."""
        keys = self.cols.left_keys if side == "left" else self.cols.right_keys
        present = np.stack([_lengths(t) > 0 for t in fields], axis=1)
        w, empty = side_weights(present, base)
        used = [k for k, b in zip(keys, base) if b > 0]
        self.problems.rows(empty, lambda i: f"the row is empty on the whole {side} side (no value in {used})",
                           used[0] if len(used) == 1 else None)
        return w

    def finish(self) -> pa.Table:
        """The per-row numbers of every block, as one table (one chunk per column); raises the
        DataError of every problem found."""
        cols, problems = self.cols, self.problems
        problems.raise_if_any()
        if self.rows == 0:
            raise DataError([DataProblem(self.file, "the file has a header but no data rows")])
        if cols.has_pairs and self.require_positive_weight and not self.any_positive:
            raise DataError([DataProblem(self.file, "every row has weight 0, so there is nothing to learn from",
                                         column=cols.weight_key)])
        doc = ([self._images] if not cols.doc_id_key and cols.right_weights[0] > 0 else []) + self._doc
        numbers = {
            "right_weights": _fixed_list(self._concatenate("right_weights")),
            "image_code": arrow.array(np.concatenate(self._images.block_codes())),
            "right_id": arrow.array(combined_block_codes(doc, self.rows)),
        }
        if cols.has_pairs:
            numbers["left_weights"] = _fixed_list(self._concatenate("left_weights"))
            numbers["weight"] = arrow.array(self._concatenate("weight"))
            numbers["left_id"] = arrow.array(combined_block_codes(self._query, self.rows))
        return pa.Table.from_pydict(numbers)

    def _concatenate(self, name: str) -> np.ndarray:
        """One per-row column of every block, the blocks' parts let go as it is made."""
        parts, self._numbers[name] = self._numbers[name], []
        return np.concatenate(parts)


def check_table(raw: pa.Table, file: str, cols: Columns, *, require_positive_weight: bool = True) -> pa.Table:
    """A small table checked whole (in memory): its text columns and numbers in one table."""
    builder = TableBuilder(file, cols, raw.column_names, require_positive_weight=require_positive_weight)
    if (error := builder.header_problems()) is not None:
        raise error
    texts = builder.add(raw)
    return joined(texts, builder.finish())


def build_stream(file: str, cols: Columns, blocks: Iterable[pa.Table], write: Callable[[pa.Table], None], *,
                 require_positive_weight: bool = True) -> pa.Table:
    """Check a stream of blocks (the first one empty, carrying the column names, as
    ``read.read_batches`` gives them), writing each block's text columns as it goes; the
    numbers at the end. A header problem is raised only once the stream is read through,
    so a file whose rows also have the wrong number of fields names those, as before."""
    blocks = iter(blocks)
    builder = TableBuilder(file, cols, next(blocks).column_names, require_positive_weight=require_positive_weight)
    if (error := builder.header_problems()) is not None:
        for _ in blocks:
            pass
        raise error
    for raw in blocks:
        if raw.num_rows:
            write(builder.add(raw))
    return builder.finish()


def joined(texts: pa.Table, numbers: pa.Table) -> pa.Table:
    """The text columns (a chunk per block) and the numbers (one chunk each) as one table, no copy."""
    for name in numbers.column_names:
        texts = texts.append_column(name, numbers.column(name))
    return texts


def _lengths(strings: pa.Array) -> np.ndarray:
    """Each cell's length in bytes, read from a large string array's offsets (no pass over the text)."""
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64)[strings.offset:strings.offset + len(strings) + 1]
    return np.diff(offsets)


def _fixed_list(matrix: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(arrow.array(matrix.reshape(-1)), matrix.shape[1])
