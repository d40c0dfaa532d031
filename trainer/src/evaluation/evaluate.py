"""Evaluating a model: every distinct query of the eval set ranks every distinct document by
exact search (the eval set itself: ``eval_set.py``).

``evaluate``: every rank encodes its slice of the queries and of the
documents; the query embeddings are all-gathered, each rank finds the top k of every query
among its own documents by blocks (``topk.sharded_topk``), and the [queries, k] lists are
merged. Memory per rank: its document embeddings, the query embeddings and O(queries x k);
time: the encoding plus the matmuls, split over the ranks. No rank waits idle in a barrier
while another evaluates, so an evaluation never runs into the process-group timeout alone.

The result (``EvalResult``) carries the metrics and, for galleries and error analysis, each
query's top k documents and scores (indices into ``EvalSet.doc_rows``). With Matryoshka widths
(``dims``) the same embeddings, cut to each width and renormalised, are searched again and
``WIDTH_KEYS`` are added per width as ``<key>@dim<width>`` (``ndcg@10@dim64``): a few flat
numbers, so status and summary.json stay readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import PairDataset, SideDataset, collate
from ..data.workers import ignore_sigterm, start
from ..distributed import all_gather, all_reduce_max, world_and_rank
from ..report import heartbeat
from .eval_set import EvalSet
from .metrics import DEEP_K, METRIC_KEYS, ranking_metrics
from .topk import sharded_topk

__all__ = ["EvalResult", "embed", "evaluate", "eval_batch_size", "METRIC_KEYS"]

EVAL_BATCH = 256
WIDTH_KEYS = ("ndcg@10", "ndcg_exp@10", "recall@10")   #: the metrics reported at each Matryoshka width


def eval_batch_size(batch_size: int) -> int:
    """Rows per forward pass when evaluating: the training batchSize, within [32, EVAL_BATCH]."""
    return min(EVAL_BATCH, max(batch_size, 32))


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


def rank_slice(n: int, world: int, rank: int) -> slice:
    """This rank's contiguous share of n rows (what evaluation and hard-negative mining embed)."""
    per = -(-n // world)
    return slice(min(n, rank * per), min(n, (rank + 1) * per))


def gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """All ranks' contiguous slices (``rank_slice``) of an n-row tensor, concatenated in rank order."""
    world, _ = world_and_rank()
    if world == 1:
        return x
    per = -(-n // world)
    padded = torch.cat([x, x.new_zeros((per - x.shape[0],) + tuple(x.shape[1:]))])
    return all_gather(padded)[:n]


def common_width(x: torch.Tensor) -> torch.Tensor:
    """Give an empty slice (a rank with no rows) the embedding width of the others."""
    world, _ = world_and_rank()
    if world == 1:
        return x
    width = all_reduce_max([x.shape[1]])[0]
    return x if x.shape[1] == width else x.new_zeros((0, width))


@torch.no_grad()
def embed(fused, pairs: PairDataset, rows, side: str, *, batch_size: int, device, precision,
          workers: int = 0, progress: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    """[len(rows), d] float32 embeddings of one side of the given rows, on ``device``;
    ``progress`` is told the rows embedded so far."""
    loader = torch.utils.data.DataLoader(SideDataset(pairs, rows, side), batch_size=batch_size,
                                         shuffle=False, num_workers=workers, collate_fn=collate,
                                         worker_init_fn=ignore_sigterm if workers else None)
    out = []
    for i, batch in enumerate(start(loader)):
        progress(min(len(rows), i * batch_size))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with precision.autocast():
            if side == "left":
                e = fused.encode_left(batch["left_tokens"], batch["left_weights"])
            else:
                e = fused.encode_right(batch["image"], batch["right_tokens"], batch["right_weights"])
        out.append(e.float())
    return torch.cat(out) if out else torch.empty((0, 0), device=device)


def evaluate(fused, pairs: PairDataset, eval_set: EvalSet, *, batch_size: int, device, precision,
             workers: int = 0, k: int = DEEP_K, docs: Optional[PairDataset] = None,
             dims: Sequence[int] = ()) -> EvalResult:
    """Metrics and top-k lists of ``fused`` (a FusedModel) on an eval set, on every rank.

    Collective: with several processes every rank must call it. ``docs`` holds the documents'
    rows when they come from a corpus (``build_eval_set(..., corpus=)``); by default they are
    rows of ``pairs``. ``dims``: Matryoshka widths to report ``WIDTH_KEYS`` at as well.
    Restores the model's train/eval mode.
    """
    world, rank = world_and_rank()
    n_q, n_d = len(eval_set.query_rows), len(eval_set.doc_rows)
    mine_q, mine_d = rank_slice(n_q, world, rank), rank_slice(n_d, world, rank)
    was_training = fused.training
    fused.eval()
    try:
        kw = dict(batch_size=batch_size, device=device, precision=precision, workers=workers)
        # This rank's queries and documents, as the heartbeat's Evaluating q/Q.
        n_q_mine = len(eval_set.query_rows[mine_q])
        total = n_q_mine + len(eval_set.doc_rows[mine_d])
        q = embed(fused, pairs, eval_set.query_rows[mine_q], "left", **kw,
                  progress=lambda n: heartbeat.stage(heartbeat.EVALUATING, n, total))
        d = embed(fused, docs if docs is not None else pairs, eval_set.doc_rows[mine_d], "right", **kw,
                  progress=lambda n: heartbeat.stage(heartbeat.EVALUATING, n_q_mine + n, total))
    finally:
        fused.train(was_training)
    q, d = common_width(q), common_width(d)
    q = gather_rows(q, n_q)
    scores, top = sharded_topk(q, d, k, offset=mine_d.start)
    top_docs, top_scores = top.cpu().numpy(), scores.cpu().numpy()
    metrics = ranking_metrics(top_docs, eval_set.qrels)
    for width in dims:
        _, top_w = sharded_topk(F.normalize(q[:, :width], dim=-1), F.normalize(d[:, :width], dim=-1), k,
                                offset=mine_d.start)
        at_width = ranking_metrics(top_w.cpu().numpy(), eval_set.qrels)
        metrics.update({f"{key}@dim{width}": at_width[key] for key in WIDTH_KEYS})
    return EvalResult(metrics, top_docs, top_scores)
