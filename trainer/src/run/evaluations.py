"""The evaluations of a run: measuring the model on its eval sets, the history, and the best checkpoint.

An evaluation measures every eval set (``SetMetrics``: set name -> metrics, in the spec's
order). The first set selects: its nDCG@10 decides the best checkpoint, and its metrics are
the flat ``metrics`` of events, status and summary.json (what they held before there were
several sets, so readers of one set see no change); ``sets`` holds every set's.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ..distributed import unwrap
from ..evaluation.evaluate import eval_batch_size, evaluate
from ..evaluation.metrics import BEST_BY
from ..precision import Precision
from ..report.reporters import Reporters
from .setup import RunEval
from .state import Progress

MAX_HISTORY = 200           #: evaluations kept in status.metrics.history

SetMetrics = dict[str, dict[str, float]]   #: eval set name -> its metrics, in the spec's order


def measure(net, evaluations: Sequence[RunEval], *, batch_size: int, device, precision: Precision,
            workers: int = 0, gallery_phase: Optional[str] = None,
            dims: tuple[int, ...] = ()) -> Optional[SetMetrics]:
    """Retrieval metrics of the current model on each eval set (None without any). Collective:
    every rank encodes and searches its share of each set (``evaluate``), the sets in the same
    order on every rank, so no rank idles in a barrier under the process-group timeout while
    another evaluates. ``workers`` DataLoader workers decode the images (the run's
    ``workers``). With ``gallery_phase`` ("before", "after") rank 0 also keeps the report's
    examples of the set that has a gallery from the same top-k lists. ``dims``: the Matryoshka
    widths, whose metrics are added (``evaluate``)."""
    if not evaluations:
        return None
    sets: SetMetrics = {}
    for evaluation in evaluations:
        result = evaluate(unwrap(net), evaluation.pairs, evaluation.eval_set, batch_size=eval_batch_size(batch_size),
                          device=device, precision=precision, workers=workers, docs=evaluation.docs, dims=dims)
        if gallery_phase and evaluation.gallery is not None:
            evaluation.gallery.record(gallery_phase, result.top_docs, result.top_scores)
        sets[evaluation.name] = result.metrics
    return sets


def selecting(sets: Mapping[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """(name, metrics) of the set that selects: the first."""
    name = next(iter(sets))
    return name, sets[name]


def is_new_best(progress: Progress, sets: Optional[SetMetrics]) -> bool:
    return sets is not None and (progress.best is None or selecting(sets)[1][BEST_BY] > progress.best[BEST_BY])


def eval_entry(epoch: int, phase: str, sets: SetMetrics) -> dict[str, Any]:
    """One evaluation as the history, the events and summary.json hold it."""
    return {"epoch": epoch, "phase": phase, "metrics": selecting(sets)[1], "sets": sets}


def eval_summary(before: Optional[SetMetrics], after: Optional[SetMetrics]) -> dict[str, Any]:
    """summary.json's ``eval``: the first set's before and after, and every set's under ``sets``."""
    names = list(after or before or {})
    if not names:
        return {}
    return {"before": (before or {}).get(names[0]), "after": (after or {}).get(names[0]), "selectBy": names[0],
            "sets": {n: {"before": (before or {}).get(n), "after": (after or {}).get(n)} for n in names}}


def record_eval(progress: Progress, report: Reporters, phase: str, sets: Optional[SetMetrics], *,
                is_main: bool) -> Optional[SetMetrics]:
    """Note and report an evaluation of the model at ``progress.epoch``, whose checkpoint (if
    any) is already saved."""
    if sets is None:
        return None
    saved = [c for c in progress.checkpoints if c["epoch"] == progress.epoch]
    note_eval(progress, phase, sets, saved[-1]["uri"] if saved else None)
    report_eval(progress, report, phase, sets, is_main=is_main)
    return sets


def note_eval(progress: Progress, phase: str, sets: SetMetrics, model_file: Optional[str]) -> None:
    """Add an evaluation of the model at ``progress.epoch`` to the history, and make it the best
    when it beats the best by the first set's nDCG@10 and the model is saved as ``model_file``.
    Done before the epoch's save, so the checkpoint holds it (a run resumed there still knows it)."""
    epoch = progress.epoch
    progress.history = (progress.history + [eval_entry(epoch, phase, sets)])[-MAX_HISTORY:]
    if model_file and is_new_best(progress, sets):
        name, metrics = selecting(sets)
        progress.best = {"uri": model_file, "epoch": epoch, BEST_BY: metrics[BEST_BY], "evalSet": name}


def report_eval(progress: Progress, report: Reporters, phase: str, sets: Optional[SetMetrics], *,
                is_main: bool) -> None:
    """The evaluation's event (progress.jsonl, status.metrics), after its checkpoint's."""
    if sets is not None and is_main:
        report.on_eval({**eval_entry(progress.epoch, phase, sets), "selectBy": selecting(sets)[0],
                        "history": progress.history, "best": progress.best})
