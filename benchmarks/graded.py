"""Graded relevance: the graded multi-positive loss against single-positive weighted CE.

    python benchmarks/graded.py [--seeds 0 1 2] [--epochs 8] [--partial 4]
    python benchmarks/graded.py --data examples/data --seeds 0    # the example's own data set

Data: the synthetic product-search generator (``kontrast.trainer.data.example_data``) with its own
seed and ``partial`` grade-1 documents per query, so every query has several graded documents
(3: all attributes match, 2: the pattern differs, 1: the category matches) and a random batch
of 64 holds several queries twice. Eval queries are unseen in training. ``--data`` takes a
folder with a train.csv and an eval.csv of the same columns instead (the example's: the
effect of the loss on ``kontrast train examples/trainjob.yaml``).

The variants run the example TrainJob (tiny ViT, random init, batch 64, lr 2e-3) through the
shipped trainer, same data, same seeds; they differ only in the loss:

* ``graded``: as shipped; every pair known from the batch's rows or the training table is a
  positive, with its weight.
* ``batch``: only the pairs known from the batch's own rows are positives (the table's pairs
  are not looked up): what the table adds.
* ``single``: the loss gets no query/document identities, so each row's own document is its
  only positive and every other column a negative, nothing masked: plain single-positive
  weighted CE (the baseline of issue #15).

Prints nDCG@10 with exponential gains (2^g - 1) and with linear gains on the eval set after
training, per seed, and the mean and standard deviation over seeds of each variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ensure_importable  # noqa: E402

ensure_importable()

import yaml  # noqa: E402

from kontrast.api import apply_defaults  # noqa: E402
from kontrast.trainer.step import accumulation  # noqa: E402
from kontrast.trainer.data.example_data import generate  # noqa: E402
from kontrast.trainer.spec import resolve  # noqa: E402
from kontrast.trainer.run.train import train  # noqa: E402

SHIPPED_LOSS = accumulation.weighted_contrastive_loss


def single_positive_loss(*args, **kwargs):
    kwargs["left_ids"] = kwargs["right_ids"] = kwargs["known"] = None
    return SHIPPED_LOSS(*args, **kwargs)


def batch_only_loss(*args, **kwargs):
    kwargs["known"] = None
    return SHIPPED_LOSS(*args, **kwargs)


LOSSES = {"graded": SHIPPED_LOSS, "batch": batch_only_loss, "single": single_positive_loss}


def run(variant: str, seed: int, data: Path, out: Path, epochs: int) -> dict:
    job = yaml.safe_load((ROOT / "examples" / "trainjob.yaml").read_text())
    job = copy.deepcopy(job)
    job["metadata"] = {"name": f"graded-{variant}-{seed}"}
    job["spec"].update({"model": str(ROOT / "examples" / "tiny-vit.json"), "trainData": str(data / "train.csv"),
                        "evalData": str(data / "eval.csv"), "output": str(out / f"{variant}-{seed}"),
                        "seed": seed, "epochs": epochs})
    accumulation.weighted_contrastive_loss = LOSSES[variant]
    try:
        summary = train(resolve(apply_defaults(job)))
    finally:
        accumulation.weighted_contrastive_loss = SHIPPED_LOSS
    return summary["eval"]["after"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--variants", nargs="+", choices=sorted(LOSSES), default=list(LOSSES))
    ap.add_argument("--partial", type=int, default=4, help="grade-1 documents sampled per query")
    ap.add_argument("--data-seed", type=int, default=15)
    ap.add_argument("--data", default=None, help="a folder with train.csv and eval.csv (default: generate one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kontrast-graded-"))
    data = Path(args.data).resolve() if args.data else generate(out / "data", seed=args.data_seed,
                                                                  partial=args.partial)
    results: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    for seed in args.seeds:
        for variant in (args.variants if seed % 2 == 0 else args.variants[::-1]):
            metrics = run(variant, seed, data, out, args.epochs)
            results[variant].append(metrics)
            print(json.dumps({"variant": variant, "seed": seed, "ndcg_exp@10": round(metrics["ndcg_exp@10"], 4),
                              "ndcg@10": round(metrics["ndcg@10"], 4)}), flush=True)
    for key in ("ndcg_exp@10", "ndcg@10"):
        for variant, rows in results.items():
            values = [m[key] for m in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{key:12s} {variant:7s} mean {statistics.mean(values):.4f}  stdev {spread:.4f}  "
                  f"values {[round(v, 4) for v in values]}")


if __name__ == "__main__":
    main()
