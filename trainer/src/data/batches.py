"""Batches: which rows each optimizer step takes, where a resumed epoch picks up, and the
DataLoader that loads them.

Every epoch has one permutation of the rows per (seed, epoch), the same on every rank.
Sharding is strided (rank r takes positions r, r+W, r+2W, ... of it), so at every step the W
ranks together hold exactly the consecutive window of the permutation that one process with
a W-times larger batch would take: with the gathered loss, training on 2 processes x B is
the same computation as 1 process x 2B. The remainder that does not divide by W is dropped,
and so is the tail of a shard that does not fill a whole optimizer step, so every rank takes
the same number of steps.

A run resumed from a mid-epoch checkpoint rebuilds the epoch's permutation and skips the
steps already taken, so it sees the same remaining rows in the same order as the
uninterrupted run. Indices stay in numpy arrays (no Python object per row).

One DataLoader (``TrainLoader``) serves the whole run with persistent workers, pinned memory
on CUDA: each epoch hands it new batches of (epoch, index) pairs, so workers keep their
state (the mapped table, the open cache) and still seed augmentations per epoch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from ..distributed import World
from .dataset import PairDataset, collate
from .workers import ignore_sigterm, start


def shard_indices(n: int, world: World, epoch: int, seed: int) -> np.ndarray:
    """This rank's row indices for one epoch, in the order it trains on them."""
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)]).permutation(n)
    usable = (n // world.world_size) * world.world_size
    return perm[world.rank:usable:world.world_size]


def steps_per_epoch(n_rows: int, world_size: int, step_rows: int) -> int:
    """Whole optimizer steps of ``step_rows`` rows per rank in one epoch."""
    return (n_rows // world_size) // step_rows


class StepSampler:
    """A DataLoader ``batch_sampler``: this rank's micro-batches of one epoch, whole optimizer
    steps of ``step_rows`` rows cut into micro-batches of ``micro`` rows.

    ``set_epoch(epoch, start_step)`` chooses the epoch and the first step to take (a resumed
    epoch skips the steps done); a DataLoader, persistent workers included, picks it up on
    its next ``iter``.
    """

    def __init__(self, n_rows: int, world: World, seed: int, step_rows: int, micro: int):
        if step_rows % micro:
            raise ValueError(f"micro-batch {micro} must divide the optimizer step's {step_rows} rows")
        self.n_rows, self.world, self.seed = n_rows, world, seed
        self.step_rows, self.micro = step_rows, micro
        self.steps_per_epoch = steps_per_epoch(n_rows, world.world_size, step_rows)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start step {start_step} is outside the epoch's {self.steps_per_epoch} steps")
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[list[int]]:
        rows = shard_indices(self.n_rows, self.world, self.epoch, self.seed)
        start, stop = self.start_step * self.step_rows, self.steps_per_epoch * self.step_rows
        for i in range(start, stop, self.micro):
            yield rows[i:i + self.micro].tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * (self.step_rows // self.micro)


class _EpochBatches:
    """The batch sampler of a TrainLoader: the current epoch's batches as (epoch, index) pairs.
    It runs in the main process, so replacing its batches between epochs reaches the workers."""

    def __init__(self):
        self.epoch, self.batches = 0, []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(self.epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class TrainLoader:
    """``loader.epoch(e, batches)`` iterates one epoch's batches (lists of dataset positions)."""

    def __init__(self, dataset: PairDataset, workers: int, pin_memory: bool, prefetch_factor: int = 4):
        self.sampler = _EpochBatches()
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers,
                                                  collate_fn=collate, pin_memory=pin_memory,
                                                  worker_init_fn=ignore_sigterm if workers else None,
                                                  **extra)

    def epoch(self, epoch: int, batches: Sequence[Sequence[int]]) -> Iterator[dict[str, torch.Tensor]]:
        self.sampler.epoch, self.sampler.batches = epoch, list(batches)
        return start(self.loader)

    def close(self) -> None:
        """Stop the persistent workers now (torch's own shutdown, a private method). Left to
        interpreter exit, multiprocessing would SIGTERM them, which they ignore
        (``workers.py``), and then wait for them."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None
