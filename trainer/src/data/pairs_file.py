"""The training table's known pairs (``step.known_pairs.KnownPairs``), computed once per node
into a file beside the table and memory-mapped by every rank.

Computing them sorts every row's (query, document) key twice: about 80 bytes a row of
temporaries, which a rank's allocator would keep. So a large table's pairs are computed in a
child process (as its table is built), which exits before training starts; every rank then
maps the same pages. Numpy and Arrow only: the child does not import torch.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from .. import storage
from . import arrow, shared_table
from .shared_table import known_pairs_file, map_numbers, once_per_node


def known_pair_arrays(left_ids: np.ndarray, right_ids: np.ndarray, weights: np.ndarray, *,
                      every_positive: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """(sorted int64 keys, float32 relevance, documents): the pairs ``KnownPairs`` keeps, as
    its docstring says which."""
    q_all = np.asarray(left_ids, dtype=np.int64)
    d_all = np.asarray(right_ids, dtype=np.int64)
    n_docs = int(d_all.max()) + 1 if d_all.size else 1
    # Partners per query and per document, over every distinct pair (weight 0 included).
    every = np.unique(q_all * n_docs + d_all)
    q_partners = np.bincount(every // n_docs)
    d_partners = np.bincount(every % n_docs)
    del every
    positive = np.asarray(weights) > 0
    keys, inverse = np.unique(q_all[positive] * n_docs + d_all[positive], return_inverse=True)
    rel = np.zeros(keys.size, dtype=np.float32)
    np.maximum.at(rel, inverse, np.asarray(weights, dtype=np.float32)[positive])
    uq, ud = keys // n_docs, keys % n_docs
    shared = (q_partners[uq] > 1) & (d_partners[ud] > 1) | every_positive
    return keys[shared], rel[shared], n_docs


def shared_known_pairs(table_file: str | Path, keep: Optional[np.ndarray]) -> Path:
    """The node's known-pairs file of a table (``keep``: its rows left after skipped bad images,
    the same on every rank; None for all), built by the first process to take the table's lock."""
    def build(target: Path) -> None:
        if Path(table_file).stat().st_size > shared_table.IN_PROCESS_MAX_BYTES:
            _build_in_child(table_file, keep, target)
        else:
            build_known_pairs_file(table_file, keep, target)

    return once_per_node(known_pairs_file(table_file, keep), build)


def build_known_pairs_file(table_file: str | Path, keep: Optional[np.ndarray], target: Path) -> None:
    numbers = map_numbers(table_file)
    columns = [_column(numbers, name) for name in ("left_id", "right_id", "weight")]
    if keep is not None:
        columns = [c[keep] for c in columns]
    keys, rel, n_docs = known_pair_arrays(*columns)
    table = pa.table({"key": arrow.array(keys), "rel": arrow.array(rel)}, metadata={"n_docs": str(n_docs)})

    def write(f) -> None:
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)

    storage.write_atomic(str(target), write, durable=False)


def map_known_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(keys, relevance, documents) as read-only views of the mapped file."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    return _column(table, "key"), _column(table, "rel"), int(table.schema.metadata[b"n_docs"])


def _column(table: pa.Table, name: str) -> np.ndarray:
    """A primitive column as a numpy view (its one chunk; an empty table may have none)."""
    column = table.column(name)
    return arrow.to_numpy(column.chunk(0) if column.num_chunks == 1 else column.combine_chunks())


def _build_in_child(table_file: str | Path, keep: Optional[np.ndarray], target: Path) -> None:
    import subprocess

    # named as write_atomic names its temporaries, so the next lock holder removes one left by a SIGKILL
    with tempfile.NamedTemporaryFile(prefix=f".{target.name}.", suffix=storage.TEMP_SUFFIX, dir=target.parent) as rows:
        if keep is not None:
            np.save(rows, keep)
            rows.flush()
        request = json.dumps({"table": str(table_file), "keep": rows.name if keep is not None else None,
                              "target": str(target)})
        done = subprocess.run([sys.executable, "-m", __name__], input=request, text=True, capture_output=True)
    if done.returncode:
        raise RuntimeError(f"computing the known pairs of {table_file} failed:\n{done.stderr[-4000:]}")


if __name__ == "__main__":
    _request = json.loads(sys.stdin.read())
    build_known_pairs_file(_request["table"], np.load(_request["keep"]) if _request["keep"] else None,
                           Path(_request["target"]))
