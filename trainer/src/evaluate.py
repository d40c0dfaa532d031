"""Retrieval evaluation on ``evalData``: nDCG@10, MRR@10, Recall@10 and mAP.

Each distinct query (the left fields of a row) ranks every distinct document (the right
fields) of the eval file by cosine similarity of the fused embeddings. A (query, document)
pair's graded relevance is the weight of its row (the highest, if the pair appears twice);
pairs that never appear are irrelevant (0). Queries without any relevant document are
left out of the means.

Definitions (k = 10), per query, then averaged over queries:

* nDCG@k = DCG@k / IDCG@k with DCG@k = sum_{i<k} rel_i / log2(i + 2) (linear gains, as
  trec_eval and GCL's evaluation), IDCG@k the DCG of the ideal order.
* MRR@k = 1 / rank of the first relevant document if it is in the top k, else 0.
* Recall@k = relevant documents in the top k / all relevant documents.
* mAP = mean over the relevant documents of precision at each one's rank (full ranking).

Relevant means relevance > 0. Ties in score keep document order (a stable sort), so results
are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import Examples, PairDataset, SideDataset, collate

K = 10
METRIC_KEYS = (f"ndcg@{K}", f"mrr@{K}", f"recall@{K}", "map")


def ranking_metrics(scores: np.ndarray, relevance: np.ndarray, k: int = K) -> dict[str, float]:
    """Mean metrics for a [queries, documents] score matrix and graded relevance matrix."""
    scores = np.asarray(scores, dtype=np.float64)
    relevance = np.asarray(relevance, dtype=np.float64)
    if scores.shape != relevance.shape:
        raise ValueError(f"scores {scores.shape} and relevance {relevance.shape} differ in shape")
    discounts = 1.0 / np.log2(np.arange(2, scores.shape[1] + 2))
    sums = {key: 0.0 for key in METRIC_KEYS}
    counted = 0
    for s, rel in zip(scores, relevance):
        relevant = rel > 0
        n_rel = int(relevant.sum())
        if n_rel == 0:
            continue
        counted += 1
        order = np.argsort(-s, kind="stable")
        ranked = rel[order]
        hits = ranked > 0
        dcg = float((ranked[:k] * discounts[:k]).sum())
        ideal = np.sort(rel)[::-1][:k]
        idcg = float((ideal * discounts[: len(ideal)]).sum())
        sums[f"ndcg@{k}"] += dcg / idcg
        first = int(np.argmax(hits))
        sums[f"mrr@{k}"] += 1.0 / (first + 1) if first < k else 0.0
        sums[f"recall@{k}"] += float(hits[:k].sum()) / n_rel
        positions = np.flatnonzero(hits)
        sums["map"] += float(np.mean(np.arange(1, n_rel + 1) / (positions + 1)))
    if counted == 0:
        raise ValueError("no query has a relevant document (every eval weight is 0)")
    out = {key: value / counted for key, value in sums.items()}
    out["queries"] = counted
    return out


@dataclass
class EvalSet:
    query_rows: list[int]      #: a representative row of each distinct query
    doc_rows: list[int]        #: a representative row of each distinct document
    relevance: np.ndarray      #: [queries, documents]


def build_eval_set(examples: Examples) -> EvalSet:
    q_of, d_of = {}, {}
    q_rows, d_rows = [], []
    for row, (lid, rid) in enumerate(zip(examples.left_ids.tolist(), examples.right_ids.tolist())):
        if lid not in q_of:
            q_of[lid] = len(q_rows)
            q_rows.append(row)
        if rid not in d_of:
            d_of[rid] = len(d_rows)
            d_rows.append(row)
    rel = np.zeros((len(q_rows), len(d_rows)), dtype=np.float64)
    for lid, rid, w in zip(examples.left_ids.tolist(), examples.right_ids.tolist(), examples.weights.tolist()):
        q, d = q_of[lid], d_of[rid]
        rel[q, d] = max(rel[q, d], w)
    return EvalSet(q_rows, d_rows, rel)


@torch.no_grad()
def embed(fused, pairs: PairDataset, rows, side: str, *, batch_size: int, device, precision,
          workers: int = 0) -> torch.Tensor:
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
        out.append(e.float().cpu())
    return torch.cat(out)


def evaluate(fused, pairs: PairDataset, eval_set: EvalSet, *, batch_size: int, device, precision,
             workers: int = 0, on_embeddings=None) -> dict[str, float]:
    """Metrics of ``fused`` (a FusedModel) on an eval set; restores the train/eval mode.

    ``on_embeddings(queries, documents)``, if given, sees the encodings (the report's gallery)."""
    was_training = fused.training
    fused.eval()
    try:
        q = embed(fused, pairs, eval_set.query_rows, "left", batch_size=batch_size, device=device,
                  precision=precision, workers=workers)
        d = embed(fused, pairs, eval_set.doc_rows, "right", batch_size=batch_size, device=device,
                  precision=precision, workers=workers)
    finally:
        fused.train(was_training)
    if on_embeddings is not None:
        on_embeddings(q, d)
    return ranking_metrics((q @ d.T).numpy(), eval_set.relevance)
