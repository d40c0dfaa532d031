"""Ranking metrics from top-k lists and sparse graded relevance (GCL's and trec_eval's).

Inputs are what a scalable evaluation has: for every query the indices of its top ``k``
documents, best first (``topk.chunked_topk``), and the graded relevance of the (query,
document) pairs that have one (``Qrels``; every other pair is irrelevant). Nothing here is
per document of the catalogue, so a 10M-document corpus costs O(queries x k).

Grades (the "gain mapping"): a pair's grade is its row weight (``weight``), or GCL's mapping
(``gcl``: weights min-max scaled to integers 1..100 over the eval file, all 1 when the
weights are constant; ``gcl_grades``). A grade <= 0 is irrelevant. With ``g`` the grade at
rank ``r`` (1-based), ``G`` the highest grade of the query's relevant documents and ``R``
their number, per query and then averaged over the queries that have a relevant document:

* ``ndcg@10``: sum_{r<=10} g / log2(r + 1), over the same sum for the ideal order (linear
  gains, as trec_eval's ndcg_cut and GCL's reported NDCG@10).
* ``ndcg_exp@10``: the same with exponential gains 2^g - 1 (Burges et al.).
* ``mrr@10``: 1 / rank of the first relevant document in the top 10, else 0.
* ``recall@10``, ``recall@100``: relevant documents in the top k / R.
* ``p@10``: relevant documents in the top 10 / 10.
* ``map``: sum over the relevant documents in the top 100 of the precision at their rank,
  divided by R (trec_eval's map_cut_100; GCL reports it at 1000).
* ``err@10``: expected reciprocal rank, sum_{r<=10} P_stop(r) / r with stop probability
  (2^g - 1) / 2^G at each rank (GCL's ``calculate_individual_err``, cut at 10).
* ``rbp@0.8``: rank-biased precision (1 - p) sum_r (g / G) p^(r-1), p = 0.8, over the top 100
  (GCL's ``calculate_individual_rbp``; p^100 < 1e-9, so the cut does not show).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

K = 10
DEEP_K = 100
RBP_P = 0.8
METRIC_KEYS = (f"ndcg@{K}", f"ndcg_exp@{K}", f"mrr@{K}", f"recall@{K}", f"recall@{DEEP_K}", f"p@{K}", "map",
               f"err@{K}", f"rbp@{RBP_P}")
GRADES = ("weight", "gcl")
#: The metric that selects the best checkpoint (of the first eval set), and the one
#: status.metrics.history keeps of every set.
BEST_BY = f"ndcg@{K}"


@dataclass(frozen=True)
class Qrels:
    """Graded relevance of the relevant (query, document) pairs, sorted by query then document."""

    query: np.ndarray   #: [m] int64 query index
    doc: np.ndarray     #: [m] int64 document index
    grade: np.ndarray   #: [m] float64, > 0
    n_queries: int
    n_docs: int

    @property
    def keys(self) -> np.ndarray:
        return self.query * self.n_docs + self.doc


def make_qrels(query, doc, grade, n_queries: int, n_docs: int) -> Qrels:
    """Qrels from pair arrays: a pair given twice keeps its highest grade; grades <= 0 are dropped."""
    query = np.asarray(query, dtype=np.int64)
    doc = np.asarray(doc, dtype=np.int64)
    grade = np.asarray(grade, dtype=np.float64)
    keys = query * n_docs + doc
    uniq, inverse = np.unique(keys, return_inverse=True)
    best = np.full(uniq.shape, -np.inf)
    np.maximum.at(best, inverse, grade)
    keep = best > 0
    uniq, best = uniq[keep], best[keep]
    return Qrels(uniq // n_docs, uniq % n_docs, best, n_queries, n_docs)


def gcl_grades(weights: np.ndarray) -> np.ndarray:
    """GCL's score-to-grade mapping: int((w - min) / (max - min) * 99 + 1), or 1 for constant w."""
    w = np.asarray(weights, dtype=np.float64)
    lo, hi = w.min(), w.max()
    if hi == lo:
        return np.ones_like(w)
    return np.floor((w - lo) / (hi - lo) * 99 + 1)


def grades_for(weights: np.ndarray, mapping: str) -> np.ndarray:
    if mapping == "weight":
        return np.asarray(weights, dtype=np.float64)
    if mapping == "gcl":
        return gcl_grades(weights)
    raise ValueError(f"unknown grade mapping {mapping!r}; expected one of {GRADES}")


def ranked_grades(qrels: Qrels, top_docs: np.ndarray) -> np.ndarray:
    """[Q, k] grade of each retrieved document (0 for irrelevant ones and for padding, index < 0)."""
    top = np.asarray(top_docs, dtype=np.int64)
    keys = np.arange(top.shape[0], dtype=np.int64)[:, None] * qrels.n_docs + top
    sorted_keys = qrels.keys
    if sorted_keys.size == 0:
        return np.zeros(top.shape)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    hit = (sorted_keys[pos] == keys) & (top >= 0)
    return np.where(hit, qrels.grade[pos], 0.0)


def _ideal_grades(qrels: Qrels, depth: int) -> np.ndarray:
    """[Q, depth] each query's grades in descending order, zero-padded."""
    order = np.lexsort((-qrels.grade, qrels.query))
    q, g = qrels.query[order], qrels.grade[order]
    starts = np.searchsorted(q, np.arange(qrels.n_queries))
    rank = np.arange(q.size) - starts[q]
    keep = rank < depth
    out = np.zeros((qrels.n_queries, depth))
    out[q[keep], rank[keep]] = g[keep]
    return out


def _dcg(gains: np.ndarray) -> np.ndarray:
    return (gains / np.log2(np.arange(2, gains.shape[1] + 2))).sum(axis=1)


def ranking_metrics(top_docs: np.ndarray, qrels: Qrels, k: int = K, deep: int = DEEP_K) -> dict[str, float]:
    """Mean metrics over the queries with a relevant document (see the module docstring).

    ``top_docs``: [Q, >= min(deep, n_docs)] document indices per query, best first.
    """
    g = ranked_grades(qrels, top_docs)[:, :deep]
    n_rel = np.bincount(qrels.query, minlength=qrels.n_queries).astype(np.float64)
    counted = n_rel > 0
    if not counted.any():
        raise ValueError("no query has a relevant document (every eval weight is 0)")
    max_grade = np.zeros(qrels.n_queries)
    np.maximum.at(max_grade, qrels.query, qrels.grade)
    ideal = _ideal_grades(qrels, k)
    top = g[:, :k]
    hits = g > 0
    ranks = np.arange(1, g.shape[1] + 1)
    first = np.where(hits[:, :k].any(axis=1), 1.0 / (np.argmax(hits[:, :k], axis=1) + 1), 0.0)
    stop = (2.0 ** top - 1) / 2.0 ** max_grade[:, None]
    reach = np.cumprod(np.hstack([np.ones((g.shape[0], 1)), 1 - stop[:, :-1]]), axis=1)
    safe_rel = np.maximum(n_rel, 1)
    safe_max = np.where(max_grade > 0, max_grade, 1)[:, None]
    per_query = {
        f"ndcg@{k}": _dcg(top) / np.where(counted, _dcg(ideal), 1),
        f"ndcg_exp@{k}": _dcg(2.0 ** top - 1) / np.where(counted, _dcg(2.0 ** ideal - 1), 1),
        f"mrr@{k}": first,
        f"recall@{k}": hits[:, :k].sum(axis=1) / safe_rel,
        f"recall@{deep}": hits.sum(axis=1) / safe_rel,
        f"p@{k}": hits[:, :k].sum(axis=1) / k,
        "map": (np.cumsum(hits, axis=1) / ranks * hits).sum(axis=1) / safe_rel,
        f"err@{k}": (reach * stop / ranks[:k]).sum(axis=1),
        f"rbp@{RBP_P}": (1 - RBP_P) * (g / safe_max * RBP_P ** (ranks - 1)).sum(axis=1),
    }
    out = {key: float(v[counted].mean()) for key, v in per_query.items()}
    out["queries"] = int(counted.sum())
    return out
