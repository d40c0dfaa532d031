"""The relevant (query, document) pairs a loss looks up: the training table's (``KnownPairs``)
and a batch's (``PairRelevance``), both given back sparse, one entry a pair.

Why the table's pairs matter is in ``losses.py``'s docstring (graded multi-positive targets).
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from ..data.pairs_file import known_pair_arrays, map_known_pairs


def _compact(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Ids renumbered 0..u-1 (same order of identity), and u."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse, uniq.numel()


class KnownPairs:
    """The relevant (query, document) pairs of a whole training table, for lookups by the loss.

    Only pairs that a batch could hold without their own row are kept: the query has a row
    with another document and the document a row with another query, of any weight (each is
    then brought into a batch by that row; click logs bring queries and documents in through
    their shown-but-not-clicked rows of weight 0). A table with one row per query, or one per
    document, keeps nothing. Pairs of weight 0 are left out: they stay negatives. Held as sorted int64 keys
    (query id x documents + document id) and float32 weights: 12 bytes a kept pair, in one
    array each, never a Python object per row.
    """

    def __init__(self, keys: torch.Tensor, rel: torch.Tensor, n_docs: int):
        self.keys, self.rel, self.n_docs = keys, rel, n_docs

    @classmethod
    def of_table(cls, left_ids: np.ndarray, right_ids: np.ndarray, weights: np.ndarray, *,
                 every_positive: bool = False) -> "KnownPairs":
        """``every_positive``: keep every pair of weight above 0. Mined hard negatives bring
        documents into a batch without any row of theirs, so with them any relevant pair can
        meet in a batch, not only the shared ones."""
        keys, rel, n_docs = known_pair_arrays(left_ids, right_ids, weights, every_positive=every_positive)
        return cls(torch.from_numpy(keys), torch.from_numpy(rel), n_docs)

    @classmethod
    def mapped(cls, path: str) -> "KnownPairs":
        """The pairs of a node's known-pairs file (``data.pairs_file``), memory-mapped: every
        rank of a node reads the same pages, built once, instead of each holding its own copy
        and the temporaries of computing it."""
        keys, rel, n_docs = map_known_pairs(path)
        with warnings.catch_warnings():
            # the map is read-only and nothing writes to the pairs; torch warns about the former
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return cls(torch.from_numpy(keys), torch.from_numpy(rel), n_docs)

    def __len__(self) -> int:
        return self.keys.numel()

    def to(self, device: torch.device) -> "KnownPairs":
        return KnownPairs(self.keys.to(device), self.rel.to(device), self.n_docs)

    def pairs(self, q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The known pairs among queries ``q`` [r] x documents ``d`` [c] (table ids), sparse:
        (row, column, relevance), one entry a pair.

        Not one search per pair (r x c binary searches cost several times the logits): each
        distinct query's pairs are a contiguous range of the sorted keys, so two searches per
        query find them, and only those candidates are matched against the block's documents.
        """
        if self.keys.numel() == 0 or q.numel() == 0 or d.numel() == 0:
            none = torch.zeros(0, dtype=torch.long, device=q.device)
            return none, none, torch.zeros(0, dtype=self.rel.dtype, device=q.device)
        uq, q_of = torch.unique(q, return_inverse=True)
        ud, d_of = torch.unique(d, return_inverse=True)
        lo = torch.searchsorted(self.keys, uq * self.n_docs)
        counts = torch.searchsorted(self.keys, (uq + 1) * self.n_docs) - lo
        owner, offset = _ranges(counts)
        pos = lo[owner] + offset
        cand = self.keys[pos] % self.n_docs
        col = torch.searchsorted(ud, cand).clamp_max(ud.numel() - 1)
        hit = ud[col] == cand
        return _expand(owner[hit], col[hit], self.rel[pos[hit]], q_of, d_of, uq.numel(), ud.numel())


def max_per_key(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct keys, sorted, and the highest value given for each."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    top = torch.zeros(uniq.numel(), dtype=values.dtype, device=values.device).scatter_reduce(
        0, inverse, values, reduce="amax", include_self=False)
    return uniq, top


def _ranges(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ranges of the given lengths laid end to end: each element's range and its offset in it."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(owner.numel(), device=counts.device) - first[owner]


def _expand(u: torch.Tensor, v: torch.Tensor, rel: torch.Tensor, u_of: torch.Tensor, v_of: torch.Tensor,
            n_u: int, n_v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs of distinct ids (u, v) -> every (row, column) whose ids they are (rows with id
    u_of, columns with id v_of): a batch can hold a query or document more than once."""
    def members(of: torch.Tensor, n: int):
        count = torch.bincount(of, minlength=n)
        return torch.argsort(of, stable=True), count, torch.cumsum(count, 0) - count

    row_order, row_count, row_first = members(u_of, n_u)
    col_order, col_count, col_first = members(v_of, n_v)
    owner, offset = _ranges(row_count[u] * col_count[v])
    width = col_count[v][owner]
    rows = row_order[row_first[u][owner] + offset // width]
    cols = col_order[col_first[v][owner] + offset % width]
    return rows, cols, rel[owner]


class PairRelevance:
    """Relevance of (query identity, document identity) pairs known from the batch's rows, and
    from the table's ``known`` pairs when given.

    The batch's pairs are a ``KnownPairs`` of their own over compacted ids. A block's known
    pairs come back sparse (one entry a pair), so the targets add no [rows, n] tensor beside
    the logits.
    """

    def __init__(self, q: torch.Tensor, d: torch.Tensor, w: torch.Tensor, known: Optional[KnownPairs] = None):
        self.raw_q, self.raw_d, self.known = q, d, known
        self.q, _ = _compact(q)
        self.d, n_d = _compact(d)
        self.batch = KnownPairs(*max_per_key(self.q * n_d + self.d, w), n_d)

    def pairs(self, rows: slice, *, queries_are_rows: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Known pairs of [rows x all columns] as (row, column, relevance): the rows' queries
        against every column's document, or (``queries_are_rows=False``) the rows' documents
        against every column's query."""
        q, d, raw_q, raw_d = ((self.q[rows], self.d, self.raw_q[rows], self.raw_d) if queries_are_rows
                              else (self.q, self.d[rows], self.raw_q, self.raw_d[rows]))
        r, c, rel = self.batch.pairs(q, d)
        if self.known is not None and len(self.known):
            tr, tc, trel = self.known.pairs(raw_q, raw_d)
            # A pair both in the batch and in the table: its highest weight.
            keys, rel = max_per_key(torch.cat([r, tr]) * d.numel() + torch.cat([c, tc]),
                                     torch.cat([rel, trel.to(rel.dtype)]))
            r, c = keys // d.numel(), keys % d.numel()
        return (r, c, rel) if queries_are_rows else (c, r, rel)
