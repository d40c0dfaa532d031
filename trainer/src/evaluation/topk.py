"""Exact top-k retrieval by blocks: no queries x documents matrix is ever held.

``chunked_topk`` scores a block of queries against a block of documents (one matmul), keeps
the block's top k, and merges it into the running top k of those queries, so memory is the
embeddings plus one block of scores plus O(queries x k). ``sharded_topk`` does the same on
every rank for its own slice of the documents and merges the ranks' top k lists: all ranks
work, and only [queries, k] lists cross the wire.

Ties are broken by document index (lower first) among the documents that reach the top k,
so results are deterministic.
"""

from __future__ import annotations

import torch

from ..distributed import all_gather, world_and_rank

#: Scores held at once per block (query rows x document rows): 32M floats, 128 MiB.
BLOCK_ELEMENTS = 1 << 25
QUERY_BLOCK = 1024


def _order(scores: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score desc, index asc) of each row of candidate lists."""
    by_index = torch.argsort(idx, dim=1, stable=True)
    scores, idx = scores.gather(1, by_index), idx.gather(1, by_index)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), idx.gather(1, by_score)


def chunked_topk(queries: torch.Tensor, docs: torch.Tensor, k: int, *, offset: int = 0,
                 block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [Q, k'], indices [Q, k']) of the k' = min(k, D) highest dot products per query.

    Indices count from ``offset`` (the global index of ``docs[0]``).
    """
    n_q, n_d = queries.shape[0], docs.shape[0]
    k = min(k, n_d)
    query_block = max(1, min(n_q, QUERY_BLOCK))
    doc_block = max(k, block_elements // query_block)
    out_s = torch.empty((n_q, k), dtype=torch.float32, device=queries.device)
    out_i = torch.empty((n_q, k), dtype=torch.long, device=queries.device)
    for q0 in range(0, n_q, query_block):
        q = queries[q0:q0 + query_block]
        best_s = q.new_empty((q.shape[0], 0), dtype=torch.float32)
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
        for d0 in range(0, n_d, doc_block):
            s = (q @ docs[d0:d0 + doc_block].T).float()
            v, i = s.topk(min(k, s.shape[1]), dim=1)
            best_s, best_i = _order(torch.cat([best_s, v], 1), torch.cat([best_i, i + (d0 + offset)], 1), k)
        out_s[q0:q0 + q.shape[0]], out_i[q0:q0 + q.shape[0]] = best_s, best_i
    return out_s, out_i


def sharded_topk(queries: torch.Tensor, doc_shard: torch.Tensor, k: int, *, offset: int,
                 block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k over the documents of all ranks; each rank holds ``doc_shard`` starting at ``offset``.

    Every rank passes the same queries and gets the same result. Shards may be empty, but
    every rank must have at least k documents in total across ranks for equal shapes: the
    lists are padded with score -inf and index -1.
    """
    s, i = chunked_topk(queries, doc_shard, k, offset=offset, block_elements=block_elements)
    if world_and_rank()[0] == 1:
        return s, i
    pad = k - s.shape[1]
    if pad:
        s = torch.cat([s, s.new_full((s.shape[0], pad), float("-inf"))], 1)
        i = torch.cat([i, i.new_full((i.shape[0], pad), -1)], 1)
    # Padding (index -1) sorts after every real document of equal (-inf) score.
    s, i = all_gather(s, dim=1), all_gather(i, dim=1)
    i = torch.where(i < 0, torch.iinfo(torch.long).max, i)
    s, i = _order(s, i, k)
    return s, torch.where(i == torch.iinfo(torch.long).max, -1, i)
