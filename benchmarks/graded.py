"""Graded relevance: the graded multi-positive loss against single-positive weighted CE.

    python benchmarks/graded.py [--seeds 0 1 2] [--epochs 8] [--partial 4]
    python benchmarks/graded.py --data examples/data --seeds 0    # the example's own data set
    python benchmarks/graded.py --shape grades --seeds 0 1 2 3 4 --variants graded single

Data: the synthetic product-search generator (``kontrast.trainer.data.example_data``) with its own
seed and ``partial`` grade-1 documents per query, so every query has several graded documents
(3: all attributes match, 2: the pattern differs, 1: the category matches) and a random batch
of 64 holds several queries twice. Eval queries are unseen in training.

``--shape grades`` (issue #25's shape) is denser: few queries, each with every grade in
every batch's reach. Queries name all three attributes; grade 3 is the product itself, 2 the
same colour and category in another pattern (3 products), 1 the same pattern and category in
another colour (7 products), nothing else is relevant. 52 training queries x 11 rows = 572
rows, so a batch of 64 holds about 1.2 rows of each query and nearly every batch holds some
query with documents of two or three grades; each product answers about three training
queries. The eval set grades the same way (its grade-1 documents are not a sample), with
exponential gains 7 / 3 / 1 the gaps matter. ``--data`` takes a
folder with a train.csv and an eval.csv of the same columns instead (the example's: the
effect of the loss on ``kontrast train examples/trainjob.yaml``).

The variants run the example TrainJob (tiny ViT, random init, batch 64, lr 2e-3) through the
shipped trainer, same data, same seeds; they differ only in the loss:

* ``graded``: as shipped; every pair known from the batch's rows or the training table has
  its weight as its grade, and each row's own pair outranks the lower grades and the unknown
  pairs (``losses.py``).
* ``batch``: only the pairs known from the batch's own rows are known (the table's pairs
  are not looked up): what the table adds.
* ``single``: the loss gets no query/document identities, so each row's own document is its
  only positive and every other column a negative, nothing masked: plain single-positive
  weighted CE (the baseline of issue #15).

Prints nDCG@10 with exponential gains (2^g - 1) and with linear gains on the eval set after
training, per seed (with the logit scale at each epoch's end), and the mean, standard
deviation and max - min over seeds of each variant.
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
from kontrast.trainer.data import example_data  # noqa: E402
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

GRADES_TRAIN_QUERIES, GRADES_EVAL_QUERIES = 52, 40


def _grade(query: tuple, product: tuple) -> int:
    """Issue #25's grades: 3 the product, 2 another pattern, 1 another colour, else 0."""
    (qc, qk, qp), (c, k, p) = query, product
    if qc != c:
        return 0
    return 3 if (qk, qp) == (k, p) else 2 if qk == k else 1 if qp == p else 0


def generate_grades(folder: Path, seed: int) -> Path:
    """The ``--shape grades`` set (see the module docstring) into ``folder``."""
    import csv
    import random

    rng = random.Random(seed)
    products = [(c, k, p) for c in example_data.CATEGORIES for k in example_data.COLOURS
                for p in example_data.PATTERNS]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for c, k, p in products:
        example_data.draw_product(c, k, p).save(folder / "images" / f"{example_data.product_id(c, k, p)}.png")
    queries = rng.sample(products, GRADES_TRAIN_QUERIES + GRADES_EVAL_QUERIES)
    splits = {"train.csv": queries[:GRADES_TRAIN_QUERIES], "eval.csv": queries[GRADES_TRAIN_QUERIES:]}
    for name, qs in splits.items():
        rows = [[example_data.query_text(q), f"images/{example_data.product_id(*d)}.png", example_data.title(*d),
                 _grade(q, d)] for q in qs for d in products if _grade(q, d)]
        rng.shuffle(rows)
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([example_data.HEADER] + rows)
    return folder


def run(variant: str, seed: int, data: Path, out: Path, epochs: int) -> tuple[dict, list[float]]:
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
    return summary["eval"]["after"], _logit_scales(Path(job["spec"]["output"]) / "progress.jsonl")


def _logit_scales(progress: Path) -> list[float]:
    """The logit scale at the end of each epoch: the first thing to look at when seeds disagree."""
    last: dict[int, float] = {}
    for line in progress.read_text().splitlines():
        entry = json.loads(line)
        if "logitScale" in entry:
            last[entry["epoch"]] = entry["logitScale"]
    return [round(last[e], 2) for e in sorted(last)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--variants", nargs="+", choices=sorted(LOSSES), default=list(LOSSES))
    ap.add_argument("--partial", type=int, default=4, help="grade-1 documents sampled per query")
    ap.add_argument("--data-seed", type=int, default=15)
    ap.add_argument("--shape", choices=("partial", "grades"), default="partial",
                    help="the generated set: the example generator's (partial) or issue #25's (grades)")
    ap.add_argument("--data", default=None, help="a folder with train.csv and eval.csv (default: generate one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kontrast-graded-"))
    if args.data:
        data = Path(args.data).resolve()
    elif args.shape == "grades":
        data = generate_grades(out / "data", seed=args.data_seed)
    else:
        data = generate(out / "data", seed=args.data_seed, partial=args.partial)
    results: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    for seed in args.seeds:
        for variant in (args.variants if seed % 2 == 0 else args.variants[::-1]):
            metrics, scales = run(variant, seed, data, out, args.epochs)
            results[variant].append(metrics)
            print(json.dumps({"variant": variant, "seed": seed, "ndcg_exp@10": round(metrics["ndcg_exp@10"], 4),
                              "ndcg@10": round(metrics["ndcg@10"], 4), "logit_scale_per_epoch": scales}),
                  flush=True)
    for key in ("ndcg_exp@10", "ndcg@10"):
        for variant, rows in results.items():
            values = [m[key] for m in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{key:12s} {variant:7s} mean {statistics.mean(values):.4f}  stdev {spread:.4f}  "
                  f"max-min {max(values) - min(values):.4f}  values {[round(v, 4) for v in values]}")


if __name__ == "__main__":
    main()
