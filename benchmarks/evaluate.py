"""Evaluation at catalogue scale: blocked exact top-k against the bare matmuls and the old evaluator.

    python benchmarks/evaluate.py [--queries 10000] [--docs 1000000] [--dim 256] [--old-queries 1000 --old-docs 20000]

Random unit embeddings (float32), 3 relevant documents per query. Each measurement runs in
its own process, so its peak resident memory (ru_maxrss) is its own:

* ``bare``: the matmuls the search needs and nothing else (queries x document blocks, each
  result discarded): the floor for any exact search.
* ``ours``: ``topk.chunked_topk`` (k=100) + ``metrics.ranking_metrics``, as the trainer runs it.
* ``old``: the evaluator before issue #15 (dense float64 score and relevance matrices, one
  Python-level argsort per query), on a size it can still run.

Prints wall time, peak memory and the embeddings' own size for each, the ratio ours/bare,
and a linear extrapolation of ours and old to the requested size (both scale with Q x D).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_importable  # noqa: E402

ensure_importable()

import numpy as np  # noqa: E402
import torch  # noqa: E402


def embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def relevant(n_q: int, n_d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    q = np.repeat(np.arange(n_q), 3)
    return q, rng.integers(0, n_d, q.size), np.tile([3.0, 2.0, 1.0], n_q)


def old_evaluator(scores: np.ndarray, relevance: np.ndarray, k: int = 10) -> float:
    """The pre-#15 algorithm (dense matrices, a full argsort per query); returns mean nDCG@10."""
    discounts = 1.0 / np.log2(np.arange(2, scores.shape[1] + 2))
    total = 0.0
    for s, rel in zip(scores, relevance):
        ranked = rel[np.argsort(-s, kind="stable")]
        ideal = np.sort(rel)[::-1][:k]
        total += (ranked[:k] * discounts[:k]).sum() / (ideal * discounts[:k]).sum()
    return total / scores.shape[0]


def measure(kind: str, n_q: int, n_d: int, dim: int) -> dict:
    from kontrast.trainer.evaluation.metrics import make_qrels, ranking_metrics
    from kontrast.trainer.evaluation.topk import BLOCK_ELEMENTS, QUERY_BLOCK, chunked_topk

    q, d = embeddings(n_q, dim, 1), embeddings(n_d, dim, 2)
    rq, rd, rg = relevant(n_q, n_d)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if kind == "bare":
        qb = min(n_q, QUERY_BLOCK)
        db = BLOCK_ELEMENTS // qb
        for q0 in range(0, n_q, qb):
            for d0 in range(0, n_d, db):
                q[q0:q0 + qb] @ d[d0:d0 + db].T
    elif kind == "ours":
        _, top = chunked_topk(q, d, 100)
        ranking_metrics(top.numpy(), make_qrels(rq, rd, rg, n_q, n_d))
    else:
        scores = (q.double() @ d.double().T).numpy()
        rel = np.zeros((n_q, n_d))
        np.maximum.at(rel, (rq, rd), rg)
        old_evaluator(scores, rel)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "queries": n_q, "docs": n_d, "dim": dim, "seconds": round(seconds, 2),
            "peak_rss_mib": round(peak / 1024, 1), "before_mib": round(base / 1024, 1),
            "embeddings_mib": round((n_q + n_d) * dim * 4 / 2 ** 20, 1)}


def in_subprocess(kind: str, n_q: int, n_d: int, dim: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", kind, "--queries", str(n_q), "--docs", str(n_d),
                          "--dim", str(dim)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--old-queries", type=int, default=1000)
    ap.add_argument("--old-docs", type=int, default=20_000)
    ap.add_argument("--target-queries", type=int, default=10_000, help="size to extrapolate to")
    ap.add_argument("--target-docs", type=int, default=1_000_000)
    ap.add_argument("--one", choices=["bare", "ours", "old"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.queries, args.docs, args.dim)))
        return
    rows = [in_subprocess("bare", args.queries, args.docs, args.dim),
            in_subprocess("ours", args.queries, args.docs, args.dim),
            in_subprocess("ours", args.old_queries, args.old_docs, args.dim),
            in_subprocess("old", args.old_queries, args.old_docs, args.dim)]
    for row in rows:
        print(json.dumps(row))
    bare, ours, ours_small, old = rows
    scale = args.target_queries * args.target_docs
    print(f"ours / bare matmuls at {args.queries} x {args.docs}: {ours['seconds'] / bare['seconds']:.2f}x time, "
          f"peak RSS {ours['peak_rss_mib']:.0f} MiB vs {bare['peak_rss_mib']:.0f} MiB "
          f"(embeddings {ours['embeddings_mib']:.0f} MiB)")
    print(f"old / ours at {args.old_queries} x {args.old_docs}: {old['seconds'] / ours_small['seconds']:.1f}x time, "
          f"peak RSS {old['peak_rss_mib']:.0f} MiB vs {ours_small['peak_rss_mib']:.0f} MiB")
    ours_x = ours["seconds"] * scale / (args.queries * args.docs)
    old_x = old["seconds"] * scale / (args.old_queries * args.old_docs)
    old_mem = scale * 8 * 2 / 2 ** 30
    print(f"extrapolated to {args.target_queries} x {args.target_docs}: ours {ours_x:.0f} s; old {old_x:.0f} s "
          f"and {old_mem:.0f} GiB for its two float64 Q x D matrices")


if __name__ == "__main__":
    main()
