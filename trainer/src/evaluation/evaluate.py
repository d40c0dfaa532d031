"""Retrieval evaluation: every distinct query ranks every distinct document by exact search.

The eval set (``build_eval_set``): queries and documents are deduplicated by identity (the
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

Evaluating a model (``evaluate``): every rank encodes its slice of the queries and of the
documents; the query embeddings are all-gathered, each rank finds the top k of every query
among its own documents by blocks (``topk.sharded_topk``), and the [queries, k] lists are
merged. Memory per rank: its document embeddings, the query embeddings and O(queries x k);
time: the encoding plus the matmuls, split over the ranks. No rank waits idle in a barrier
while another evaluates, so an evaluation never runs into the process-group timeout alone.

The result (``EvalResult``) carries the metrics and, for galleries and error analysis, each
query's top k documents and scores (indices into ``EvalSet.doc_rows``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..data.check import joint_ids, raise_row_problems
from ..data.dataset import PairDataset, SideDataset, collate
from ..data.examples import Examples
from ..distributed import all_gather, all_reduce_max, world_and_rank
from .metrics import DEEP_K, METRIC_KEYS, Qrels, grades_for, make_qrels, ranking_metrics
from .topk import sharded_topk

log = logging.getLogger(__name__)

__all__ = ["EvalSet", "EvalResult", "build_eval_set", "embed", "evaluate", "eval_batch_size", "METRIC_KEYS"]

EVAL_BATCH = 256


def eval_batch_size(batch_size: int) -> int:
    """Rows per forward pass when evaluating: the training batchSize, within [32, EVAL_BATCH]."""
    return min(EVAL_BATCH, max(batch_size, 32))


@dataclass
class EvalSet:
    query_rows: np.ndarray     #: [Q] a representative eval row of each distinct query
    doc_rows: np.ndarray       #: [D] a representative row of each distinct document, in ``doc_file``
    qrels: Qrels               #: graded relevance of (query index, document index) pairs
    doc_file: str = ""         #: the file of the documents: the corpus, else the eval file


@dataclass
class EvalResult:
    metrics: dict[str, float]
    top_docs: np.ndarray       #: [Q, k] document indices (into EvalSet.doc_rows), best first; -1 pads
    top_scores: np.ndarray     #: [Q, k] their cosine similarities

    def save(self, path: str, eval_set: EvalSet) -> None:
        """Write the top-k lists with the eval rows they refer to (numpy .npz)."""
        with open(path, "wb") as f:
            np.savez(f, top_docs=self.top_docs, top_scores=self.top_scores, query_rows=eval_set.query_rows,
                     doc_rows=eval_set.doc_rows, doc_file=np.array(eval_set.doc_file))


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


def _slice(n: int, world: int, rank: int) -> slice:
    per = -(-n // world)
    return slice(min(n, rank * per), min(n, (rank + 1) * per))


def _gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """All ranks' contiguous slices (``_slice``) of an n-row tensor, concatenated in rank order."""
    world, _ = world_and_rank()
    if world == 1:
        return x
    per = -(-n // world)
    padded = torch.cat([x, x.new_zeros((per - x.shape[0],) + tuple(x.shape[1:]))])
    return all_gather(padded)[:n]


def _common_width(x: torch.Tensor) -> torch.Tensor:
    """Give an empty slice (a rank with no rows) the embedding width of the others."""
    world, _ = world_and_rank()
    if world == 1:
        return x
    width = all_reduce_max([x.shape[1]])[0]
    return x if x.shape[1] == width else x.new_zeros((0, width))


@torch.no_grad()
def embed(fused, pairs: PairDataset, rows, side: str, *, batch_size: int, device, precision,
          workers: int = 0) -> torch.Tensor:
    """[len(rows), d] float32 embeddings of one side of the given rows, on ``device``."""
    loader = torch.utils.data.DataLoader(SideDataset(pairs, rows, side), batch_size=batch_size,
                                         shuffle=False, num_workers=workers, collate_fn=collate)
    out = []
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with precision.autocast():
            if side == "left":
                e = fused.encode_left(batch["left_tokens"], batch["left_weights"])
            else:
                e = fused.encode_right(batch["image"], batch["right_tokens"], batch["right_weights"])
        out.append(e.float())
    return torch.cat(out) if out else torch.empty((0, 0), device=device)


def evaluate(fused, pairs: PairDataset, eval_set: EvalSet, *, batch_size: int, device, precision,
             workers: int = 0, k: int = DEEP_K, docs: Optional[PairDataset] = None) -> EvalResult:
    """Metrics and top-k lists of ``fused`` (a FusedModel) on an eval set, on every rank.

    Collective: with several processes every rank must call it. ``docs`` holds the documents'
    rows when they come from a corpus (``build_eval_set(..., corpus=)``); by default they are
    rows of ``pairs``.
    Restores the model's train/eval mode.
    """
    world, rank = world_and_rank()
    n_q, n_d = len(eval_set.query_rows), len(eval_set.doc_rows)
    mine_q, mine_d = _slice(n_q, world, rank), _slice(n_d, world, rank)
    was_training = fused.training
    fused.eval()
    try:
        kw = dict(batch_size=batch_size, device=device, precision=precision, workers=workers)
        q = embed(fused, pairs, eval_set.query_rows[mine_q], "left", **kw)
        d = embed(fused, docs if docs is not None else pairs, eval_set.doc_rows[mine_d], "right", **kw)
    finally:
        fused.train(was_training)
    q, d = _common_width(q), _common_width(d)
    q = _gather_rows(q, n_q)
    scores, top = sharded_topk(q, d, k, offset=mine_d.start)
    top_docs, top_scores = top.cpu().numpy(), scores.cpu().numpy()
    return EvalResult(ranking_metrics(top_docs, eval_set.qrels), top_docs, top_scores)
