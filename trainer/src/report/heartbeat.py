"""The set-up's progress, reported from code far from the reporters.

Reading and checking the data, prefetching every image and the first evaluation can take
longer than the operator's hang limit. Rank 0's training points :func:`report_to` at its
reporters before set-up, and the code that does the long work (the image prefetch, the
evaluation) calls :func:`stage` as it moves on, without reporters passed down to it. The
cluster status then shows the stage (``status.progress.stage``) and moves ``updatedAt`` only
when the stage moves, so the hang watchdog judges each stage by its own progress.
"""

from __future__ import annotations

from typing import Callable, Optional

LOADING, PREFETCHING, EVALUATING, TRAINING = "Loading", "Prefetching", "Evaluating", "Training"
MINING = "Mining"   #: hardNegatives: embedding the training queries and the candidates

Sink = Callable[[str, int, Optional[int]], None]  # (stage, done, total)

_sink: Optional[Sink] = None


def report_to(sink: Optional[Sink]) -> None:
    """Where :func:`stage` goes from now on (None: nowhere, e.g. on ranks other than 0)."""
    global _sink
    _sink = sink


def stage(name: str, done: int = 0, total: Optional[int] = None) -> None:
    """The trainer is at ``done`` of ``total`` items of stage ``name`` (cheap: call per item)."""
    if _sink is not None:
        _sink(name, done, total)
