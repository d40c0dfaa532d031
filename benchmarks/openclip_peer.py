"""Drive open_clip_train's own training loop (the peer we compare against) on in-memory batches.

`train_one_epoch` reads a data dict, a dataloader with two counters, and an argparse namespace
of main.py's flags; the benchmarks and the accumulation tests build exactly these here.
"""

from __future__ import annotations

import argparse


class _Loader:
    """The two attributes and iteration that train_one_epoch reads from data['train'].dataloader."""

    def __init__(self, batches):
        self.batches = batches
        self.num_batches = len(batches)
        self.num_samples = sum(len(b[0]) for b in batches)

    def __iter__(self):
        return iter(self.batches)


class _Data:
    def __init__(self, loader):
        self.dataloader = loader

    def set_epoch(self, epoch):
        pass


def peer_data(batches) -> dict:
    """The `data` argument of train_one_epoch for a list of (images, texts) batches."""
    return {"train": _Data(_Loader(batches))}


def peer_args(*, batch_size: int, accum_freq: int = 1, device: str = "cpu", precision: str = "fp32") -> argparse.Namespace:
    """main.py's flags that train_one_epoch reads: one process, no scheduler, no clipping."""
    return argparse.Namespace(device=device, precision=precision, accum_freq=accum_freq, distill=False,
                              skip_scheduler=True, grad_clip_norm=None, horovod=False, log_every_n_steps=10 ** 9,
                              batch_size=batch_size, world_size=1, rank=0, local_rank=0, wandb=False)
