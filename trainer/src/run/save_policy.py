"""When to save a resumable checkpoint in the middle of an epoch, and when to stop.

Two reasons: the ``checkpointEvery`` interval (steps or minutes) and a request to stop
(SIGTERM: preemption or a deleted pod; torchrun forwards it to every worker). Every rank must
save and stop at the same step, or the collectives of the next step would hang, so after
each optimizer step the ranks combine their flags in one small all-reduce: the time interval
is measured on rank 0 alone, and a SIGTERM seen by any rank stops them all. The handler only
sets a flag; the step in flight finishes, then the checkpoint is written and the run raises
``Interrupted``. So a stop costs the rest of the current step plus one save (BENCHMARKS.md
has the save time; the pod's terminationGracePeriodSeconds must cover both).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Callable, Iterator, Optional

from ..distributed import World, all_reduce_max
from ..params import CheckpointEvery

log = logging.getLogger(__name__)


class SavePolicy:
    """Decides, after each optimizer step, whether to save and whether to stop."""

    def __init__(self, every: Optional[CheckpointEvery], world: World,
                 clock: Callable[[], float] = time.monotonic):
        self.every, self.world, self.clock = every, world, clock
        self.last_save = clock()
        self.stop_requested = False

    def request_stop(self, signum: int, _frame=None) -> None:
        """Signal handler: remember the request; ``poll`` acts on it after the current step."""
        if not self.stop_requested:
            log.warning("received %s: saving a checkpoint after the current step, then stopping",
                        signal.Signals(signum).name)
        self.stop_requested = True

    def poll(self, step: int) -> tuple[bool, bool]:
        """(save, stop) after optimizer step ``step`` (1-based), the same on every rank."""
        due, stop = self._interval_due(step), self.stop_requested
        if self.world.distributed:
            due, stop = all_reduce_max([int(due), int(stop)])
        return bool(due or stop), bool(stop)

    def stop_wanted(self) -> bool:
        """Whether any rank was asked to stop (the same answer on every rank; collective)."""
        stop = self.stop_requested
        if self.world.distributed:
            stop = all_reduce_max([int(stop)])[0]
        return bool(stop)

    def saved(self) -> None:
        """A checkpoint was just written: the time interval starts again."""
        self.last_save = self.clock()

    def _interval_due(self, step: int) -> bool:
        if self.every is None:
            return False
        if self.every.steps is not None:
            return step % self.every.steps == 0
        return self.world.is_main and self.clock() - self.last_save >= 60.0 * self.every.minutes


@contextlib.contextmanager
def stop_on_sigterm(policy: SavePolicy) -> Iterator[None]:
    """While training, SIGTERM asks ``policy`` to stop instead of killing the process. Only
    the main thread can install a handler; elsewhere SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, policy.request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
