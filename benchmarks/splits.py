"""Honest splits: nDCG@10 on GCL's four evaluation splits, before and after training, in one run.

    python benchmarks/splits.py [--seeds 0 1] [--fraction 0.2] [--corpus] [--data FOLDER]

The example's data (train.csv and eval.csv together, generated into the output folder or
``--data``) is cut by ``kontrast split`` into train.csv and the in-domain, novel-queries,
novel-documents and zero-shot eval files; the example TrainJob (tiny ViT, random init, batch
64, lr 2e-3, 8 epochs) trains on train.csv with the four files as ``evalSets``. Prints, per
seed, every split's nDCG@10 (linear and exponential gains) before and after training: the
gap between in-domain and zero-shot is what one eval file drawn from the training table hides.
Without ``--corpus`` each set ranks only its own file's documents (pools of different sizes);
with it every set ranks the same corpus, the whole table's distinct documents.
"""

from __future__ import annotations

import argparse
import copy
import csv
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
from kontrast.split import split_file  # noqa: E402
from kontrast.trainer.data.example_data import generate  # noqa: E402
from kontrast.trainer.run.train import train  # noqa: E402
from kontrast.trainer.spec import resolve  # noqa: E402

SPLITS = {"in-domain": "eval_in_domain", "novel-queries": "eval_novel_queries",
          "novel-documents": "eval_novel_documents", "zero-shot": "eval_zero_shot"}


def whole_table(data: Path, out: Path) -> Path:
    """train.csv and eval.csv in one table, image paths made absolute (the splits live elsewhere)."""
    rows: list[list[str]] = []
    for name in ("train.csv", "eval.csv"):
        with open(data / name, newline="") as f:
            body = list(csv.reader(f))
        header, body = body[0], body[1:]
        image = header.index("image")
        rows += [[str((data / v).resolve()) if i == image else v for i, v in enumerate(r)] for r in body]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return out


def corpus_of(table: Path, out: Path) -> Path:
    """The table's distinct documents (image, title) as a corpus file."""
    with open(table, newline="") as f:
        docs = sorted({(r["image"], r["title"]) for r in csv.DictReader(f)})
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows([("image", "title"), *docs])
    return out


def run(seed: int, splits: Path, out: Path, corpus: Path | None) -> dict:
    job = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "trainjob.yaml").read_text()))
    job["metadata"] = {"name": f"splits-{seed}"}
    job["spec"].pop("evalData")
    job["spec"].update({"model": str(ROOT / "examples" / "tiny-vit.json"), "trainData": str(splits / "train.csv"),
                        "evalSets": [{"name": n, "data": str(splits / f"{stem}.csv"),
                                      **({"corpus": str(corpus)} if corpus else {})} for n, stem in SPLITS.items()],
                        "output": str(out / f"run-{seed}"), "seed": seed})
    return train(resolve(apply_defaults(job)))["eval"]["sets"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--corpus", action="store_true", help="every set ranks the whole table's documents")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kontrast-splits-"))
    data = Path(args.data).resolve() if args.data else generate(out / "data")
    splits = out / "splits"
    table = whole_table(data, out / "all.csv")
    counts = split_file(table, splits, ["query"], ["image", "title"], fraction=args.fraction, seed=0)
    corpus = corpus_of(table, out / "corpus.csv") if args.corpus else None
    print(json.dumps({"rows": counts}), flush=True)
    results = []
    for seed in args.seeds:
        sets = run(seed, splits, out, corpus)
        row = {"seed": seed, **{f"{name} {phase} {key}": sets[name][phase][key] for name in SPLITS
                                for phase in ("before", "after") for key in ("ndcg@10", "ndcg_exp@10")}}
        results.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    for key in ("ndcg@10", "ndcg_exp@10"):
        print(f"{key} mean over seeds: " + "  ".join(
            f"{name} {statistics.mean(r[f'{name} before {key}'] for r in results):.4f} -> "
            f"{statistics.mean(r[f'{name} after {key}'] for r in results):.4f}" for name in SPLITS))


if __name__ == "__main__":
    main()
