"""``kontrast evaluate FILE [--checkpoint C]``: the TrainJob's evaluation without training.

Evaluates the TrainJob's starting model (its ``model`` and ``pretrained``), or a checkpoint
(a path or URI of an ``epoch_N.pt`` this or another run wrote), on its ``evalData`` (ranking
the ``corpusData`` documents when set), with the same identities, grades and metrics as the
evaluations during training. With torchrun every
process encodes and searches its share. Prints the metrics as JSON (rank 0); ``--top-k FILE``
also writes every query's top documents (``EvalResult.save``: ``top_docs``/``top_scores``
[queries, k], ``query_rows``/``doc_rows`` mapping them to rows of the eval file, and of
``doc_file`` for documents: the corpus when there is one).

With frozenRight the documents are encoded by the starting model and the queries by the
checkpoint, as in training and serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

from . import checkpoint as ckpt
from . import data
from .distributed import init_from_env, shutdown
from .errors import PermanentError
from .evaluate import EvalResult, build_eval_set, evaluate
from .model import build_model
from .spec import Resolved

log = logging.getLogger(__name__)


def evaluate_trainjob(resolved: Resolved, checkpoint: Optional[str] = None, device: Optional[str] = None,
                      top_k_file: Optional[str] = None) -> dict[str, Any]:
    """Metrics of the starting model or ``checkpoint`` on the TrainJob's evalData (every rank)."""
    from .train import EVAL_BATCH, _precision, _setup_fused, seed_everything

    params = resolved.params
    if not params.eval_data:
        raise PermanentError("evaluate: the TrainJob has no evalData")
    world = init_from_env(device)
    try:
        precision = _precision(params, world.device)
        eval_ex, _ = data.load_data(params.eval_data, params, require_positive_weight=False, progress=world.is_main)
        corpus_ex, _ = data.load_corpus(params, progress=world.is_main)
        eval_set = build_eval_set(eval_ex, params.eval_grades, corpus_ex)   # a document missing fails here
        seed_everything(params.seed)
        bundle = build_model(resolved, precision, world.device)
        fused = _setup_fused(bundle.model, params, precision, world.device,
                             image_norm=data.image_normalization(bundle.preprocess_val))
        if checkpoint:
            _load(bundle.model, checkpoint)
        cache = data.ImageCache(data.cache_folder(params))
        pairs, docs = (data.PairDataset(ex, bundle.preprocess_val, bundle.tokenizer, bundle.image_size,
                                        seed=params.seed, cache=cache) if ex is not None else None
                       for ex in (eval_ex, corpus_ex))
        result: EvalResult = evaluate(fused, pairs, eval_set, batch_size=min(EVAL_BATCH, max(params.batch_size, 32)),
                                      device=world.device, precision=precision, docs=docs)
        if world.is_main and top_k_file:
            result.save(top_k_file, eval_set)
        return {"model": params.model, "pretrained": params.pretrained, "checkpoint": checkpoint,
                "evalData": params.eval_data, "corpusData": params.corpus_data, "metrics": result.metrics}
    finally:
        shutdown()


def _load(model, location: str) -> None:
    state = ckpt.load_checkpoint_file(location)
    try:
        model.load_state_dict(ckpt.strip_module_prefix(state.get("state_dict", state)))
    except (RuntimeError, KeyError) as exc:
        raise PermanentError(f"evaluate: {location} does not fit the TrainJob's model: "
                             f"{str(exc).strip().splitlines()[-1].strip()}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .__main__ import load_resolved, run_permanent

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
