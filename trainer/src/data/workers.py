"""DataLoader workers that survive the SIGTERM meant for their trainer.

torchrun stops a training process by sending SIGTERM to its whole process group, which
holds the DataLoader workers too. torch's own worker handler lets SIGTERM kill a worker
unless its parent sent it, and a dead worker takes the trainer down (``DataLoader worker
(pid ...) is killed by signal: Terminated``) before it can save. So the workers ignore
SIGTERM: the trainer finishes its step, saves, and shuts them down; a worker whose trainer
is gone (SIGKILL) notices within torch's 5 s watchdog interval and exits.
"""

from __future__ import annotations

import signal
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def ignore_sigterm(_worker_id: int) -> None:
    """A DataLoader's ``worker_init_fn``: ignore SIGTERM (discarding one pending since the
    fork, see ``start``), then take signals again."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def start(loader: Iterable[T]) -> Iterator[T]:
    """``iter(loader)`` with SIGTERM blocked while it forks the workers: one that arrives
    between a fork and ``ignore_sigterm`` stays pending in the worker (and is discarded)
    instead of killing it; the trainer gets its own copy once the mask is restored."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
