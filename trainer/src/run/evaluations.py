"""The evaluations of a run: measuring the model on evalData, the history, and the best checkpoint."""

from __future__ import annotations

from typing import Optional

from ..distributed import unwrap
from ..evaluation.evaluate import eval_batch_size, evaluate
from ..precision import Precision
from ..report.reporters import Reporters
from .setup import RunEval
from .state import Progress

BEST_BY = "ndcg@10"         #: the metric that names status.checkpoints.best
MAX_HISTORY = 200           #: evaluations kept in status.metrics.history


def measure(net, evaluation: Optional[RunEval], *, batch_size: int, device, precision: Precision,
            workers: int = 0, gallery_phase: Optional[str] = None,
            dims: tuple[int, ...] = ()) -> Optional[dict[str, float]]:
    """Retrieval metrics of the current model on evalData (None without it). Collective: every
    rank encodes and searches its share (``evaluate``), so no rank idles in a barrier under the
    process-group timeout while another evaluates. ``workers`` DataLoader workers decode the
    images (the run's ``workers``). With ``gallery_phase`` ("before", "after")
    rank 0 also keeps the report's examples from the same top-k lists. ``dims``: the Matryoshka
    widths, whose metrics are added (``evaluate``)."""
    if evaluation is None:
        return None
    result = evaluate(unwrap(net), evaluation.pairs, evaluation.eval_set, batch_size=eval_batch_size(batch_size),
                      device=device, precision=precision, workers=workers, docs=evaluation.docs, dims=dims)
    if gallery_phase and evaluation.gallery is not None:
        evaluation.gallery.record(gallery_phase, result.top_docs, result.top_scores)
    return result.metrics


def is_new_best(progress: Progress, metrics: Optional[dict[str, float]]) -> bool:
    return metrics is not None and (progress.best is None or metrics[BEST_BY] > progress.best[BEST_BY])


def record_eval(progress: Progress, report: Reporters, phase: str, metrics: Optional[dict[str, float]], *,
                is_main: bool) -> Optional[dict[str, float]]:
    """Note and report an evaluation of the model at ``progress.epoch``, whose checkpoint (if
    any) is already saved."""
    if metrics is None:
        return None
    saved = [c for c in progress.checkpoints if c["epoch"] == progress.epoch]
    note_eval(progress, phase, metrics, saved[-1]["uri"] if saved else None)
    report_eval(progress, report, phase, metrics, is_main=is_main)
    return metrics


def note_eval(progress: Progress, phase: str, metrics: dict[str, float], model_file: Optional[str]) -> None:
    """Add an evaluation of the model at ``progress.epoch`` to the history, and make it the best
    when it beats the best by nDCG@10 and the model is saved as ``model_file``. Done before the
    epoch's save, so the checkpoint holds it (a run resumed there still knows it)."""
    epoch = progress.epoch
    progress.history = (progress.history + [{"epoch": epoch, "phase": phase, "metrics": metrics}])[-MAX_HISTORY:]
    if model_file and is_new_best(progress, metrics):
        progress.best = {"uri": model_file, "epoch": epoch, BEST_BY: metrics[BEST_BY]}


def report_eval(progress: Progress, report: Reporters, phase: str, metrics: Optional[dict[str, float]], *,
                is_main: bool) -> None:
    """The evaluation's event (progress.jsonl, status.metrics), after its checkpoint's."""
    if metrics is not None and is_main:
        report.on_eval({"phase": phase, "epoch": progress.epoch, "metrics": metrics, "history": progress.history,
                        "best": progress.best})
