"""Choosing each training query's hard negatives from its ranked candidates: pure numpy.

The mining pass (``mine.py``) ranks every candidate document for every distinct training
query; what is left is a decision per query, taken here:

* A candidate that is a known positive of the query (a trainData row of weight above 0 pairs
  them, by the loss's identities) is never a negative.
* A candidate scoring above ``(1 - margin) x`` the query's lowest positive score is taken for
  an unlabelled positive and dropped (sentence-transformers' ``relative_margin``). The lowest
  positive, not the best: a document the model ranks like a relevant one of the lowest grade
  is as likely relevant. A query none of whose positives is among the candidates (a corpus
  without them) has no score to set the margin against and mines nothing.
* The best-ranked remaining ``perQuery`` candidates are its negatives.

Candidates are ranked best first, so every dropped candidate ranks above every kept one and
the number dropped is the number above the threshold in the examined depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Candidates examined per query beyond its positives, per negative wanted: room for the
#: margin's drops without ranking the whole catalogue.
DEPTH_PER_NEGATIVE = 4


def mining_depth(per_query: int, max_positives: int, n_candidates: int) -> int:
    """How many of each query's best candidates to rank: its positives may fill the top, the
    margin may drop some more; never more than there are."""
    return max(1, min(n_candidates, max_positives + DEPTH_PER_NEGATIVE * per_query))


@dataclass(frozen=True)
class Candidates:
    """The documents mining ranks: a representative row of each in its dataset, and its
    identity in trainData's document ids (documents absent from trainData get ids above them)."""

    rows: np.ndarray    #: [D] rows of the candidate dataset (trainData's or corpusData's)
    ids: np.ndarray     #: [D] document identities, comparable with trainData's right_ids


@dataclass(frozen=True)
class PositivePairs:
    """The training table's relevant (query, candidate) pairs, as indices: query ``q[i]`` (into
    the distinct queries) is relevant to candidate ``c[i]``."""

    q: np.ndarray
    c: np.ndarray

    @classmethod
    def of_table(cls, query_ids: np.ndarray, left_ids: np.ndarray, right_ids: np.ndarray,
                 weights: np.ndarray, candidates: Candidates) -> "PositivePairs":
        """The pairs of rows of weight above 0 whose document is a candidate (``query_ids``:
        the distinct queries, sorted)."""
        positive = np.asarray(weights) > 0
        q = np.searchsorted(query_ids, np.asarray(left_ids)[positive])
        order = np.argsort(candidates.ids, kind="stable")
        d = np.asarray(right_ids)[positive]
        at = np.searchsorted(candidates.ids, d, sorter=order).clip(max=max(len(order) - 1, 0))
        found = candidates.ids[order[at]] == d if len(order) else np.zeros(d.shape, dtype=bool)
        keys = np.unique(q[found] * max(len(order), 1) + order[at][found])
        return cls(keys // max(len(order), 1), keys % max(len(order), 1))

    def max_per_query(self, n_queries: int) -> int:
        return int(np.bincount(self.q, minlength=n_queries).max(initial=0))

    def mask(self, top: np.ndarray) -> np.ndarray:
        """[Q, k] whether each ranked candidate is a known positive of its query."""
        n = int(max(top.max(initial=0), self.c.max(initial=0))) + 1
        keys = np.arange(top.shape[0])[:, None] * n + top
        return np.isin(keys, self.q * n + self.c) & (top >= 0)

    def lowest_score(self, scores: np.ndarray, n_queries: int) -> np.ndarray:
        """[Q] each query's lowest positive score (``scores``: one per pair); NaN without one."""
        low = np.full(n_queries, np.inf, dtype=np.float64)
        np.minimum.at(low, self.q, scores.astype(np.float64))
        return np.where(np.isinf(low), np.nan, low)


def select_negatives(top: np.ndarray, scores: np.ndarray, positive: np.ndarray, lowest_positive: np.ndarray,
                     per_query: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(chosen [Q, per_query] candidate indices, best first, -1 pads; dropped [Q]).

    ``top`` / ``scores``: each query's ranked candidates ([Q, k], best first, -1 pads);
    ``positive``: [Q, k] known positives; ``lowest_positive``: [Q] (NaN: mine nothing).
    """
    ranked = (top >= 0) & ~positive
    threshold = lowest_positive * (1.0 - margin)
    with np.errstate(invalid="ignore"):
        above = ranked & (scores > threshold[:, None])
    usable = ranked & ~above & ~np.isnan(threshold)[:, None]
    take = usable & (np.cumsum(usable, axis=1) <= per_query)
    chosen = np.full((top.shape[0], per_query), -1, dtype=np.int64)
    q, j = np.nonzero(take)
    chosen[q, np.cumsum(take, axis=1)[q, j] - 1] = top[q, j]
    dropped = np.where(np.isnan(threshold), 0, above.sum(axis=1))
    return chosen, dropped


@dataclass(frozen=True)
class MinedNegatives:
    """Each distinct training query's hard negatives, looked up by its query id.

    Arrays only (no object per query), so the dataset's workers receive it cheaply."""

    query_ids: np.ndarray   #: [Q] sorted query identities (trainData's left_ids)
    rows: np.ndarray        #: [Q, P] rows of the candidate dataset; -1 pads
    ids: np.ndarray         #: [Q, P] their document identities; -1 pads
    dropped: int            #: candidates dropped by the margin, over all queries
    epoch: int              #: the epoch before which they were mined

    @property
    def per_query(self) -> int:
        return self.rows.shape[1]

    @property
    def mined(self) -> int:
        return int((self.rows >= 0).sum())

    def of_query(self, query_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, ids) of one query's negatives, -1 padded to ``per_query``."""
        i = int(np.searchsorted(self.query_ids, query_id))
        if i < len(self.query_ids) and self.query_ids[i] == query_id:
            return self.rows[i], self.ids[i]
        none = np.full(self.per_query, -1, dtype=np.int64)
        return none, none

    def counts(self) -> dict[str, int]:
        """status.hardNegatives: how many were mined and dropped, for how many queries, when."""
        return {"mined": self.mined, "dropped": int(self.dropped), "queries": int(len(self.query_ids)),
                "epoch": int(self.epoch)}

    @classmethod
    def empty(cls, per_query: int) -> "MinedNegatives":
        none = np.zeros((0, per_query), dtype=np.int64)
        return cls(np.zeros(0, dtype=np.int64), none, none, 0, 0)
