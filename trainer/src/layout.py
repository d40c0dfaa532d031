"""Where a run's files go: the output folder's layout and the node's cache folder.

Every name below ``output`` and below the cache folder is written here once; the modules
that write or read those files ask an ``OutputFolder`` or a ``CacheFolder`` for the place.

``<output>/``::

    checkpoints/step_N.pt      resumable checkpoints (checkpointEvery, SIGTERM, epoch ends)
    checkpoints/epoch_N.pt     model-only checkpoints of the epoch ends that save
    model/                     the exported open_clip model folder with its model card
    plots/*.png                the report's plots
    report.html                the run report
    progress.jsonl             one event a line: start, step, eval, checkpoint, end
    progress.N.jsonl           on object stores, its continuation parts (``progress_parts``)
    summary.json               the final summary
    gallery.json               the report's before/after examples
    tensorboard/               TensorBoard scalars (when tensorboard is installed)
    mlflow_run.json            the MLflow run this output belongs to (spec.tracking.mlflow)
    hard_negatives/KEY-rR.npz  mined hard negatives of round R, keyed by the run's identity

``<cache>/`` (data.cache, else $KONTRAST_CACHE, else ~/.cache/kontrast)::

    tables/KEY.arrow           the node-shared checked tables' numbers (and KEY.lock)
    tables/KEY.arrow.texts     their text columns
    tables/KEY.arrow.known*    the known pairs of a training table
    images/                    the node-local image cache
    images/.incoming/          its files being written
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kontrast import contract

from . import storage


def _place(*parts: str) -> property:
    """A place inside the output folder: its root joined with ``parts``."""
    return property(lambda self: storage.join(self.root, *parts))


@dataclass(frozen=True)
class OutputFolder:
    """The places inside one run's output folder (a local path or a URI)."""

    root: str

    CHECKPOINTS: ClassVar[str] = "checkpoints"
    MODEL: ClassVar[str] = "model"
    PLOTS: ClassVar[str] = "plots"
    REPORT: ClassVar[str] = "report.html"
    PROGRESS: ClassVar[str] = "progress.jsonl"
    PROGRESS_PART_BYTES: ClassVar[int] = 1 << 20
    SUMMARY: ClassVar[str] = "summary.json"
    GALLERY: ClassVar[str] = "gallery.json"
    TENSORBOARD: ClassVar[str] = "tensorboard"
    MLFLOW_RUN: ClassVar[str] = "mlflow_run.json"
    HARD_NEGATIVES: ClassVar[str] = "hard_negatives"

    checkpoints = _place(CHECKPOINTS)
    model = _place(MODEL)
    plots = _place(PLOTS)
    report = _place(REPORT)
    progress = _place(PROGRESS)
    summary = _place(SUMMARY)
    gallery = _place(GALLERY)
    tensorboard = _place(TENSORBOARD)
    mlflow_run = _place(MLFLOW_RUN)

    def progress_part(self, n: int) -> str:
        """Part ``n`` of the progress log on an object store: part 0 is progress.jsonl itself,
        and the writer starts part n + 1 once part n holds ``PROGRESS_PART_BYTES``, so no upload
        carries more than a part (an object cannot be appended to). Local logs are one file."""
        return storage.join(self.root, self._progress_name(n))

    def progress_parts(self) -> list[str]:
        """The progress log's parts that exist, in order (read them all, one after the other)."""
        names = set(storage.list_names(self.root))
        parts = []
        while self._progress_name(len(parts)) in names:
            parts.append(self.progress_part(len(parts)))
        return parts

    def _progress_name(self, n: int) -> str:
        return self.PROGRESS if n == 0 else f"progress.{n}.jsonl"

    def resumable(self, step: int) -> str:
        return storage.join(self.root, self.CHECKPOINTS, f"step_{step}.pt")

    def epoch_model(self, epoch: int) -> str:
        return storage.join(self.root, self.CHECKPOINTS, f"epoch_{epoch}.pt")

    def hard_negatives(self, key: str, round_: int) -> str:
        return storage.join(self.root, self.HARD_NEGATIVES, f"{key}-r{round_}.npz")

    def plot(self, stem: str) -> str:
        return storage.join(self.root, self.PLOTS, f"{stem}.png")


def default_cache() -> str:
    """$KONTRAST_CACHE, else ~/.cache/kontrast (see data.cache in the CRD)."""
    return os.environ.get(contract.CACHE_ENV) or str(Path.home() / ".cache" / "kontrast")


@dataclass(frozen=True)
class CacheFolder:
    """The places inside the node's cache folder (always local: it is shared through the node's disk)."""

    root: str

    @property
    def tables(self) -> Path:
        return Path(self.root) / "tables"

    @property
    def images(self) -> Path:
        return Path(self.root) / "images"

    @property
    def incoming_images(self) -> Path:
        return self.images / ".incoming"
