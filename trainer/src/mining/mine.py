"""The mining pass and its cache: rank the candidates for every training query, choose the
negatives (``negatives.select_negatives``), keep them in the output folder.

Cost: one evaluation pass over the candidates. It is ``evaluation.evaluate``'s pass: every rank
embeds its slice of the distinct queries and of the candidates, the query embeddings are
all-gathered, and ``topk.sharded_topk`` ranks each rank's candidates by blocks and merges the
[queries, k] lists, so every rank ends with the same lists and no queries x candidates matrix
is held. The positives' scores (for the margin) come from the same embeddings: each rank
scores the pairs whose candidate it holds and the scores are summed over ranks.

Cache. The result is written once (rank 0) to ``output/hard_negatives/<identity>-r<round>.npz``,
keyed by the run's identity hash (every training input, hardNegatives included), and read
back instead of mining again when a run resumes: a resumed run trains on the negatives the
interrupted one mined, also when the mining model is the starting one, long gone.
"""

from __future__ import annotations

import io
import logging
from typing import Optional

import numpy as np
import torch

from .. import storage
from ..data.check import joint_ids
from ..data.dataset import PairDataset
from ..data.examples import Examples
from ..distributed import broadcast_object, sum_over_ranks, world_and_rank
from ..evaluation.evaluate import common_width, embed, eval_batch_size, gather_rows, rank_slice
from ..evaluation.topk import sharded_topk
from ..layout import OutputFolder
from ..report import heartbeat
from .negatives import Candidates, MinedNegatives, PositivePairs, mining_depth, select_negatives

log = logging.getLogger(__name__)


def train_candidates(train: Examples) -> Candidates:
    """trainData's distinct documents, each by its first row."""
    ids, rows = np.unique(np.asarray(train.right_ids), return_index=True)
    return Candidates(rows=rows.astype(np.int64), ids=ids.astype(np.int64))


def corpus_candidates(train: Examples, corpus: Examples) -> Candidates:
    """corpusData's distinct documents, each by its first row, identified in trainData's
    document ids (by the same identity columns as the evaluation's join); a corpus document
    trainData lacks gets an id above all of trainData's, so it is no table pair's document."""
    train_joint, corpus_joint = joint_ids(train.doc_identity(), corpus.doc_identity())
    if train.keep is not None:
        train_joint = train_joint[train.keep]
    if corpus.keep is not None:
        corpus_joint = corpus_joint[corpus.keep]
    joint, rows = np.unique(corpus_joint, return_index=True)
    size = int(max(train_joint.max(initial=-1), joint.max(initial=-1))) + 1
    train_id_of = np.full(size, -1, dtype=np.int64)
    train_id_of[train_joint] = np.asarray(train.right_ids)
    ids = train_id_of[joint]
    fresh = ids < 0
    ids[fresh] = int(np.asarray(train.right_ids).max(initial=-1)) + 1 + np.arange(int(fresh.sum()))
    return Candidates(rows=rows.astype(np.int64), ids=ids)


@torch.no_grad()
def mine(fused, queries: PairDataset, candidates_ds: PairDataset, candidates: Candidates, *, per_query: int,
         margin: float, epoch: int, batch_size: int, device, precision, workers: int = 0) -> MinedNegatives:
    """Every distinct query of ``queries`` (trainData) mines its negatives among ``candidates``
    (rows of ``candidates_ds``) with ``fused``. Collective: every rank calls it and gets the
    same result."""
    train = queries.ex
    query_ids, query_rows = np.unique(np.asarray(train.left_ids), return_index=True)
    pairs = PositivePairs.of_table(query_ids, train.left_ids, train.right_ids, train.weights, candidates)
    k = mining_depth(per_query, pairs.max_per_query(len(query_ids)), len(candidates.rows))
    q, d, offset = _embed(fused, queries, query_rows, candidates_ds, candidates.rows, batch_size=batch_size,
                          device=device, precision=precision, workers=workers)
    scores, top = sharded_topk(q, d, k, offset=offset)
    pair_scores = _pair_scores(q, d, offset, pairs)
    top, scores = top.cpu().numpy(), scores.cpu().numpy()
    chosen, dropped = select_negatives(top, scores, pairs.mask(top), pairs.lowest_score(pair_scores, len(query_ids)),
                                       per_query, margin)
    ids = np.where(chosen >= 0, candidates.ids[chosen.clip(min=0)], -1)
    rows = np.where(chosen >= 0, candidates.rows[chosen.clip(min=0)], -1)
    return MinedNegatives(query_ids.astype(np.int64), rows, ids, int(dropped.sum()), epoch)


def _embed(fused, queries: PairDataset, query_rows: np.ndarray, docs: PairDataset, doc_rows: np.ndarray, *,
           batch_size: int, device, precision, workers: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(every query's embedding, this rank's slice of the candidates' embeddings, the slice's
    first index): the evaluation's embedding pass, in eval mode."""
    world, rank = world_and_rank()
    mine_q, mine_d = rank_slice(len(query_rows), world, rank), rank_slice(len(doc_rows), world, rank)
    was_training = fused.training
    fused.eval()
    try:
        kw = dict(batch_size=eval_batch_size(batch_size), device=device, precision=precision, workers=workers)
        n_q = len(query_rows[mine_q])
        total = n_q + len(doc_rows[mine_d])
        q = embed(fused, queries, query_rows[mine_q], "left", **kw,
                  progress=lambda n: heartbeat.stage(heartbeat.MINING, n, total))
        d = embed(fused, docs, doc_rows[mine_d], "right", **kw,
                  progress=lambda n: heartbeat.stage(heartbeat.MINING, n_q + n, total))
    finally:
        fused.train(was_training)
    q, d = common_width(q), common_width(d)
    return gather_rows(q, len(query_rows)), d, mine_d.start


def _pair_scores(q: torch.Tensor, d: torch.Tensor, offset: int, pairs: PositivePairs) -> np.ndarray:
    """The score of every positive pair: each rank scores those whose candidate it holds."""
    c = torch.as_tensor(pairs.c, device=q.device)
    mine = (c >= offset) & (c < offset + d.shape[0])
    scores = torch.zeros(len(pairs.c), dtype=torch.float32, device=q.device)
    qi = torch.as_tensor(pairs.q, device=q.device)[mine]
    if mine.any():
        scores[mine] = (q[qi] * d[c[mine] - offset]).sum(dim=1).float()
    if world_and_rank()[0] > 1:
        scores = sum_over_ranks(scores)
    return scores.cpu().numpy()


def cache_key(identity: dict) -> str:
    """The run's identity hash (every training input), shortened: one cache per run."""
    return str(identity["inputs"])[:16]


def load_cached(output: str, key: str, round_: int) -> Optional[MinedNegatives]:
    """The negatives a run with this identity mined for this round, if it did (rank 0 reads,
    every rank gets them)."""
    found = None
    if world_and_rank()[1] == 0:
        location = OutputFolder(output).hard_negatives(key, round_)
        if storage.exists(location):
            with storage.open_read(location) as f:
                z = np.load(io.BytesIO(f.read()))
                found = MinedNegatives(z["query_ids"], z["rows"], z["ids"], int(z["dropped"]), int(z["epoch"]))
    return broadcast_object(found) if world_and_rank()[0] > 1 else found


def save_cached(output: str, key: str, round_: int, mined: MinedNegatives) -> None:
    """Publish the round's negatives at once (rank 0); a resume reads them back."""
    if world_and_rank()[1] != 0:
        return
    storage.write_atomic(OutputFolder(output).hard_negatives(key, round_), lambda f: np.savez(
        f, query_ids=mined.query_ids, rows=mined.rows, ids=mined.ids, dropped=mined.dropped, epoch=mined.epoch))
