"""Matryoshka widths: nDCG@10 at a quarter of the embedding width against the full width, and
the full width against a run without Matryoshka.

    python benchmarks/matryoshka.py [--seeds 0 1] [--dims 32 16] [--data FOLDER]

The example TrainJob (tiny ViT with 64-d embeddings, random init, batch 64, lr 2e-3, 8 epochs)
on the example's data (generated into the output folder, or ``--data``), once without
``matryoshkaDims`` and once with them, same seeds. Prints, per seed, nDCG@10 (linear and
exponential gains) at full width for both runs and at each trained width, and the ratios the
issue's goals name: width/full and full/without.
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
from kontrast.trainer.data.example_data import generate  # noqa: E402
from kontrast.trainer.run.train import train  # noqa: E402
from kontrast.trainer.spec import resolve  # noqa: E402


def run(name: str, seed: int, data: Path, out: Path, dims: list[int]) -> dict:
    job = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "trainjob.yaml").read_text()))
    job["metadata"] = {"name": f"matryoshka-{name}-{seed}"}
    job["spec"].update({"model": str(ROOT / "examples" / "tiny-vit.json"), "trainData": str(data / "train.csv"),
                        "evalData": str(data / "eval.csv"), "output": str(out / f"{name}-{seed}"), "seed": seed})
    if dims:
        job["spec"]["matryoshkaDims"] = dims
    return train(resolve(apply_defaults(job)))["eval"]["after"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 16])
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kontrast-matryoshka-"))
    data = Path(args.data).resolve() if args.data else generate(out / "data")
    rows = []
    for seed in args.seeds:
        plain = run("plain", seed, data, out, [])
        nested = run("nested", seed, data, out, args.dims)
        row = {"seed": seed}
        for key in ("ndcg@10", "ndcg_exp@10"):
            row[f"without {key}"] = plain[key]
            row[f"full {key}"] = nested[key]
            for d in args.dims:
                row[f"dim{d} {key}"] = nested[f"{key}@dim{d}"]
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    for key in ("ndcg@10", "ndcg_exp@10"):
        without = statistics.mean(r[f"without {key}"] for r in rows)
        full = statistics.mean(r[f"full {key}"] for r in rows)
        print(f"{key}: without {without:.4f}  full {full:.4f} (full/without {full / without:.4f})  " + "  ".join(
            f"dim{d} {statistics.mean(r[f'dim{d} {key}'] for r in rows):.4f} "
            f"(/full {statistics.mean(r[f'dim{d} {key}'] for r in rows) / full:.4f})" for d in args.dims))


if __name__ == "__main__":
    main()
