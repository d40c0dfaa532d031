"""data/workers.py: DataLoader workers outlive the SIGTERM torchrun sends their process group,
also one that arrives between a worker's fork and its ``worker_init_fn``."""

from __future__ import annotations

import os
import signal

import torch

from kontrast.trainer.data.workers import ignore_sigterm, start


class Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return os.getpid()


def sigterm_before_init(worker_id: int) -> None:
    """The worst moment: SIGTERM reaches the worker before its init function has run."""
    os.kill(os.getpid(), signal.SIGTERM)
    ignore_sigterm(worker_id)


def test_a_sigterm_between_fork_and_init_does_not_kill_the_worker():
    loader = torch.utils.data.DataLoader(Pids(), batch_size=1, num_workers=2, worker_init_fn=sigterm_before_init)
    pids = {int(batch) for batch in start(loader)}
    assert len(pids) == 2 and os.getpid() not in pids          # both workers served their batches


def test_workers_ignore_sigterm_and_the_trainer_keeps_its_handler():
    got = []
    previous = signal.signal(signal.SIGTERM, lambda *_: got.append(1))
    try:
        loader = torch.utils.data.DataLoader(Pids(), batch_size=1, num_workers=2, worker_init_fn=ignore_sigterm,
                                             persistent_workers=True)
        it = start(loader)
        pids = {int(next(it))}
        for pid in {w.pid for w in it._workers}:
            os.kill(pid, signal.SIGTERM)
        pids |= {int(batch) for batch in it}
        assert len(pids) == 2                                     # the workers lived on
        os.kill(os.getpid(), signal.SIGTERM)
        assert got == [1]                                         # SIGTERM is not blocked in the trainer
        it._shutdown_workers()
    finally:
        signal.signal(signal.SIGTERM, previous)
