"""The eval set: the distinct queries, the distinct documents and their graded relevance.

``build_eval_set``: queries and documents are deduplicated by identity (the
data's query and document ids), so an identical twin of a relevant document is the same
document and cannot tie with it. A (query, document) pair's grade comes from its row weight
(the highest, if the pair appears twice; see ``metrics`` for the gain mapping); every other
pair is irrelevant. Relevance is held sparsely (one entry per eval row).

With a corpus (corpusData) the candidates are the corpus's distinct documents instead of the
eval file's: each eval row's document is found in the corpus by the same identity (docIdKey,
else the right fields of non-zero weight), joined column by column over Arrow's hash tables
(``data.check.joint_ids``), never a Python object per corpus row. A relevant document (grade > 0)
missing from the corpus is a DataError naming the eval row and the corpus file: its metrics
would silently count a relevant document that can never be retrieved. Eval rows of grade 0
need no corpus entry (they only name a negative), and a relevant document whose corpus rows
were all skipped for a bad image (data.onBadImage: skip) drops its eval rows with a warning,
as skipping drops the eval file's own rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..data.check import joint_ids, raise_row_problems
from ..data.examples import Examples
from .metrics import Qrels, grades_for, make_qrels

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    query_rows: np.ndarray     #: [Q] a representative eval row of each distinct query
    doc_rows: np.ndarray       #: [D] a representative row of each distinct document, in ``doc_file``
    qrels: Qrels               #: graded relevance of (query index, document index) pairs
    doc_file: str = ""         #: the file of the documents: the corpus, else the eval file


def _first_rows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each distinct id, in order of first appearance; each row's index into it)."""
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order], rank[inverse.reshape(-1)]


def build_eval_set(examples: Examples, grades: str = "weight", corpus: Optional[Examples] = None) -> EvalSet:
    """Distinct queries of an eval file, the distinct documents of the corpus (default: of the
    eval file) and their sparse graded relevance."""
    query_rows, q_of_row = _first_rows(np.asarray(examples.left_ids))
    grade = grades_for(examples.weights, grades)
    if corpus is None:
        doc_rows, d_of_row = _first_rows(np.asarray(examples.right_ids))
    else:
        doc_rows, d_of_row = _corpus_documents(examples, corpus, relevant=grade > 0)
        grade = np.where(d_of_row >= 0, grade, 0.0)
    qrels = make_qrels(q_of_row, np.maximum(d_of_row, 0), grade, len(query_rows), len(doc_rows))
    return EvalSet(query_rows, doc_rows, qrels, (corpus or examples).file)


def _corpus_documents(examples: Examples, corpus: Examples, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first corpus row of each distinct corpus document; each eval row's document index
    among them, -1 where the corpus lacks it). Raises a DataError for relevant rows whose
    document is not in the corpus file at all."""
    eval_ids, corpus_ids = joint_ids(examples.doc_identity(), corpus.doc_identity())
    eval_ids, kept_ids = _positions(examples, eval_ids), _positions(corpus, corpus_ids)
    doc_rows, _ = _first_rows(kept_ids)
    doc_of_id = np.full(int(max(eval_ids.max(initial=-1), corpus_ids.max(initial=-1))) + 1, -1, dtype=np.int64)
    doc_of_id[kept_ids[doc_rows]] = np.arange(len(doc_rows))
    d_of_row = doc_of_id[eval_ids]
    missing = relevant & (d_of_row < 0)
    absent = missing & ~np.isin(eval_ids, corpus_ids)
    absent_rows = np.flatnonzero(absent) if examples.keep is None else examples.keep[absent]
    raise_row_problems(examples.file, absent_rows,
                       lambda i: f"the relevant document of this row ({_describe_doc(examples, i)}) is not in the "
                                 f"corpus {corpus.file} (corpusData holds every document that can be retrieved)",
                       examples.columns.doc_id_key)
    if missing.any():
        log.warning("%s: %d relevant row(s) dropped from the evaluation: their document's rows in the corpus %s "
                    "were all skipped for a bad image (data.onBadImage: skip)", examples.file, int(missing.sum()),
                    corpus.file)
    return doc_rows, d_of_row


def _positions(examples: Examples, by_table_row: np.ndarray) -> np.ndarray:
    """Values of every table row, at the rows the examples kept."""
    return by_table_row if examples.keep is None else by_table_row[examples.keep]


def _describe_doc(examples: Examples, table_row: int) -> str:
    """What identifies the document of a table row, for a message."""
    cols = examples.columns
    identity = examples.doc_identity()
    if cols.doc_id_key:
        return f"{cols.doc_id_key} {identity[0][table_row].as_py()!r}"
    keys = [k for k, b in zip(cols.right_keys, cols.right_weights) if b > 0]
    return ", ".join(f"{k} {col[table_row].as_py()!r}" for k, col in zip(keys, identity))
