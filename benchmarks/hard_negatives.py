"""Mined hard negatives: nDCG@10 with ``hardNegatives`` against without, same seeds, same epochs.

    python benchmarks/hard_negatives.py [--seeds 0 1 2] [--epochs 6] [--per-query 2] [--every 1] [--margins 0 0.05]

Data (``generate_distractors``): a catalogue of products that differ from their nearest
neighbours in one attribute only: (category, colour, pattern, size), where the size ("small",
"large") is one word of the title and nothing in the image, and the colour or the pattern is a
few pixels' hue or stripes. 6 x 8 x 4 x 2 = 384 products. Every query names all four
attributes ("small red striped mug"), and its only relevant document is that product; its 18
one-attribute siblings are the hard distractors. Queries are split 60/40 into train and eval;
every product is in the corpus (corpusData), so an eval query ranks the whole catalogue. A
random batch of 32 out of 230 training products holds about 2.5 of a query's 18 siblings, and
usually not the one that differs only by the size word: in-batch negatives rarely pair them.

The two variants run the example TrainJob's settings (tiny ViT, random init, lr 2e-3, fp32)
through the shipped trainer with batch 32; the mined variants add ``hardNegatives: {perQuery,
from: train, everyEpochs, margin}``, one per margin. The starting model is random, so the negatives it mines before
training are close to random: re-mining every epoch with the model being trained is what
finds the siblings. The labels are complete (no sibling is relevant), so the margin has no
false negative to catch; it can only drop true ones. Prints eval.after nDCG@10 per seed and
variant with the last mining's counts, then the means and the differences to the plain run.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ensure_importable  # noqa: E402

ensure_importable()

import yaml  # noqa: E402

from kontrast.api import apply_defaults  # noqa: E402
from kontrast.trainer.data import example_data  # noqa: E402
from kontrast.trainer.run.train import train  # noqa: E402
from kontrast.trainer.spec import resolve  # noqa: E402

SIZES = ("small", "large")
TRAIN_FRACTION = 0.6


def _title(product: tuple) -> str:
    """The title names everything but the colour, which only the image shows: the 8 colours of
    a product share one title."""
    category, _, pattern, size = product
    return f"{size} {pattern} {example_data.CATEGORIES[category]} {category}"


def _query(product: tuple) -> str:
    category, colour, pattern, size = product
    return f"{size} {colour} {pattern} {category}"


def generate_distractors(folder: Path, seed: int = 0) -> Path:
    """train.csv and eval.csv (query, image, title, score: one relevant product per query) and
    corpus.csv (image, title: every product) into ``folder``."""
    rng = random.Random(seed)
    products = [(c, k, p, s) for c in example_data.CATEGORIES for k in example_data.COLOURS
                for p in example_data.PATTERNS for s in SIZES]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for c, k, p, _ in products:
        image = folder / "images" / f"{example_data.product_id(c, k, p)}.png"
        if not image.exists():
            example_data.draw_product(c, k, p).save(image)

    def image(product: tuple) -> str:
        return f"images/{example_data.product_id(*product[:3])}.png"

    queries = rng.sample(products, len(products))
    n_train = int(len(products) * TRAIN_FRACTION)
    for name, qs in (("train.csv", queries[:n_train]), ("eval.csv", queries[n_train:])):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([example_data.HEADER] + [[_query(q), image(q), _title(q), 1] for q in qs])
    with open(folder / "corpus.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["image", "title"]] + [[image(p), _title(p)] for p in products])
    return folder


def run(variant: str, seed: int, data: Path, out: Path, args, margin: Optional[float] = None) -> dict:
    """One TrainJob: without hard negatives when ``margin`` is None, else mining with that margin."""
    job = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "trainjob.yaml").read_text()))
    job["metadata"] = {"name": f"hn-{variant}-{seed}"}
    job["spec"].update({"model": str(ROOT / "examples" / "tiny-vit.json"), "trainData": str(data / "train.csv"),
                        "evalData": str(data / "eval.csv"), "corpusData": str(data / "corpus.csv"),
                        "output": str(out / f"{variant}-{seed}"), "seed": seed, "epochs": args.epochs,
                        "batchSize": args.batch, "warmup": 10, "saveFrequency": args.epochs})
    if margin is not None:
        job["spec"]["hardNegatives"] = {"perQuery": args.per_query, "from": "train", "everyEpochs": args.every,
                                        "margin": margin}
    started = time.monotonic()
    summary = train(resolve(apply_defaults(job)))
    return {"ndcg@10": summary["eval"]["after"]["ndcg@10"], "hardNegatives": summary.get("hardNegatives"),
            "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--per-query", type=int, default=2)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.05])
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kontrast-hard-negatives-"))
    data = generate_distractors(Path(args.data).resolve() if args.data else out / "data")
    rows = []
    for seed in args.seeds:
        row = {"seed": seed, "plain": run("plain", seed, data, out, args)}
        for m in args.margins:
            row[f"margin {m}"] = run(f"margin{m}", seed, data, out, args, margin=m)
        rows.append(row)
        print(json.dumps(row), flush=True)
    plain = [r["plain"]["ndcg@10"] for r in rows]
    print(f"nDCG@10 plain: mean {statistics.mean(plain):.4f}  " + "  ".join(f"{s:.4f}" for s in plain))
    for m in args.margins:
        mined = [r[f"margin {m}"]["ndcg@10"] for r in rows]
        deltas = [a - b for a, b in zip(mined, plain)]
        print(f"nDCG@10 mined, margin {m}: mean {statistics.mean(mined):.4f}  " + "  ".join(f"{s:.4f}" for s in mined)
              + f"  delta mean {statistics.mean(deltas):+.4f} (min {min(deltas):+.4f}, max {max(deltas):+.4f})")


if __name__ == "__main__":
    main()
