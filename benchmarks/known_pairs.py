"""Cost of the graded targets: the training table's known pairs and the loss that looks them up.

    python benchmarks/known_pairs.py [--rows 1000000 10000000] [--batch 1024 4096]

Table: ``rows`` synthetic rows with 5 rows per query and 2 per document on average, so most
pairs can meet in a batch without their own row and are kept (the worst case for memory; a
table with one document per query keeps none). Prints the start-up time and size of
``KnownPairs.of_table``.

Loss: forward and backward of ``weighted_contrastive_loss`` (ce, 256-d, one process) on a
batch of the table's first rows, best of 3, without ids (single positive), with the batch's
ids, and with the ids and the table's pairs; the baseline is ``open_clip.loss.ClipLoss`` on
the same features.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_importable, machine  # noqa: E402

ensure_importable()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402

from kontrast.trainer.step.known_pairs import KnownPairs  # noqa: E402
from kontrast.trainer.step.losses import weighted_contrastive_loss


def table(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, rows // 5, rows), rng.integers(0, rows // 2, rows),
            rng.integers(1, 4, rows).astype(np.float32))


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    args = ap.parse_args()
    print(machine())
    torch.manual_seed(0)
    for rows in args.rows:
        q, d, w = table(rows)
        seconds = best_of(lambda: KnownPairs.of_table(q, d, w), repeat=1)
        known = KnownPairs.of_table(q, d, w)
        print(f"table {rows:,} rows: of_table {seconds:.2f} s, {len(known):,} pairs kept, "
              f"{(known.keys.nbytes + known.rel.nbytes) / 2**20:.1f} MiB")
        for b in args.batch:
            left = F.normalize(torch.randn(b, 256), dim=-1).requires_grad_()
            right = F.normalize(torch.randn(b, 256), dim=-1).requires_grad_()
            weights, lid, rid = (torch.from_numpy(a[:b]) for a in (w, q, d))
            scale = torch.tensor(20.0)

            def ours(**kw):
                return lambda: weighted_contrastive_loss(left, right, weights, scale, **kw).backward()

            base = best_of(lambda: ClipLoss()(right, left, scale).backward())
            cases = {"no ids": ours(), "ids": ours(left_ids=lid, right_ids=rid),
                     "ids + table": ours(left_ids=lid, right_ids=rid, known=known)}
            times = {name: best_of(fn) for name, fn in cases.items()}
            figures = ", ".join(f"{name} {t * 1e3:.0f} ms ({t / base:.2f}x)" for name, t in times.items())
            print(f"  batch {b}: ClipLoss {base * 1e3:.0f} ms; {figures}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
