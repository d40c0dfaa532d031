"""The TrainJob's evaluation without training: the starting model or a checkpoint on its eval sets.

Evaluates the TrainJob's starting model (its ``model`` and ``pretrained``), or a checkpoint
(a path or URI of an ``epoch_N.pt`` this or another run wrote), on its ``evalData`` (ranking
the ``corpusData`` documents when set) or each of its ``evalSets``, with the same identities,
grades and metrics as the evaluations during training: it sets up the model and the eval
data with training's own pieces (``run.setup``). With torchrun every process encodes and searches its share.

With frozenRight the documents are encoded by the starting model and the queries by the
checkpoint, as in training and serving.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from ..data.images import ImageCache
from ..data.load import cache_folder
from ..distributed import init_from_env, shutdown
from ..errors import PermanentError
from ..run import checkpoint as ckpt
from ..run.setup import build_fused, eval_datasets, load_eval_inputs, run_precision
from ..spec import Resolved
from .evaluate import EvalResult, eval_batch_size, evaluate

log = logging.getLogger(__name__)


def evaluate_trainjob(resolved: Resolved, checkpoint: Optional[str] = None, device: Optional[str] = None,
                      top_k_file: Optional[str] = None) -> dict[str, Any]:
    """Metrics of the starting model or ``checkpoint`` on the TrainJob's eval sets (every rank):
    ``metrics`` the first set's, ``sets`` every set's by name; ``top_k_file`` gets the first set's
    top-k lists."""
    params = resolved.params
    if not params.eval_sets:
        raise PermanentError("evaluate: the TrainJob has no evalData or evalSets")
    world = init_from_env(device)
    try:
        precision = run_precision(params, world.device)
        evals = [load_eval_inputs(params, world, spec) for spec in params.eval_sets]
        bundle, fused = build_fused(resolved, precision, world.device)
        if checkpoint:
            _load(bundle.model, checkpoint)
        cache = ImageCache(cache_folder(params))
        sets = {}
        for i, inputs in enumerate(evals):
            pairs, docs = eval_datasets(inputs, bundle, params, cache)
            result: EvalResult = evaluate(fused, pairs, inputs.eval_set,
                                          batch_size=eval_batch_size(params.batch_size), device=world.device,
                                          precision=precision, docs=docs, dims=params.matryoshka_dims or ())
            if i == 0 and world.is_main and top_k_file:
                result.save(top_k_file, inputs.eval_set)
            sets[inputs.name] = result.metrics
        return {"model": params.model, "pretrained": params.pretrained, "checkpoint": checkpoint,
                "evalData": params.eval_data, "corpusData": params.corpus_data,
                "metrics": sets[evals[0].name], "sets": sets}
    finally:
        shutdown()


def _load(model, location: str) -> None:
    state = ckpt.load_checkpoint_file(location)
    try:
        model.load_state_dict(ckpt.strip_module_prefix(state.get("state_dict", state)))
    except (RuntimeError, KeyError) as exc:
        raise PermanentError(f"evaluate: {location} does not fit the TrainJob's model: "
                             f"{str(exc).strip().splitlines()[-1].strip()}") from None
