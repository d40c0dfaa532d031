"""``kontrast evaluate FILE [--checkpoint C]``: the TrainJob's evaluation without training.

Prints the metrics of ``evaluation.job.evaluate_trainjob`` as JSON (rank 0); ``--top-k FILE``
also writes every query's top documents (``EvalResult.save``: ``top_docs``/``top_scores``
[queries, k], ``query_rows``/``doc_rows`` mapping them to rows of the eval file, and of
``doc_file`` for documents: the corpus when there is one). Under torchrun
(``torchrun --nproc-per-node=N -m kontrast.trainer.cli.evaluate FILE``) every process takes
its share.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from ..evaluation.job import evaluate_trainjob
from ..spec import load_resolved
from .exits import run_permanent


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="kontrast evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("file", help="the TrainJob YAML")
    ap.add_argument("--checkpoint", help="a checkpoint path or URI (default: the TrainJob's starting model)")
    ap.add_argument("--device", choices=["cpu", "cuda"])
    ap.add_argument("--top-k", dest="top_k", metavar="FILE.npz", help="also write each query's top documents")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def go() -> int:
        out = evaluate_trainjob(load_resolved(args.file), args.checkpoint, args.device, args.top_k)
        if int(os.environ.get("RANK", "0")) == 0:   # under torchrun every rank has the same result
            print(json.dumps(out, indent=2))
        return 0

    return run_permanent(go, "kontrast evaluate")


if __name__ == "__main__":
    sys.exit(main())
