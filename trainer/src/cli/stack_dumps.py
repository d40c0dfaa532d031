"""Where a run is stuck: SIGUSR1 prints every thread's stack of each training process and
DataLoader worker to the log, and the run goes on.

``kontrast train`` (each torchrun worker) registers faulthandler for SIGUSR1, which its forked
DataLoader workers inherit. ``kontrast launch`` (the pods' command, PID 1) passes the signal on
to every process below it that has the handler and not to torchrun's agent, which SIGUSR1
would end, one process at a time with a line naming it first: faulthandler writes a dump in
many small writes, and processes dumping at once would interleave them into an unreadable log.
So ``kubectl exec POD -- sh -c 'kill -USR1 1'`` is enough.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("kontrast.launch")

#: Between one process's dump and the next signal: a dump takes milliseconds.
STAGGER_S = 0.5


def print_stacks_on_sigusr1() -> None:
    """To the process's own stderr (file descriptor 2, the pod's log), whatever ``sys.stderr``
    has been replaced with (``kontrast train`` called in-process by a test or a notebook)."""
    if sys.__stderr__ is not None:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux's /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def handles(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(caught & (1 << (signum - 1)))


def runs_the_trainer(pid: int) -> bool:
    """A trainer (``-m kontrast.trainer``) or a DataLoader worker it forked (same command line)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"kontrast.trainer" in f.read()
    except OSError:
        return False


def stack_printers(pid: int) -> list[int]:
    """The trainer processes below ``pid`` that print their stacks on SIGUSR1 (not any other
    program with a SIGUSR1 handler: a Go binary's runtime has one, and gunicorn reopens its logs)."""
    return [p for p in descendants(pid) if runs_the_trainer(p) and handles(p, signal.SIGUSR1)]


def describe(pid: int, printers: list[int]) -> str:
    """``rank R`` for a trainer, ``a DataLoader worker of rank R`` for a process it forked."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        with open(f"/proc/{pid}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return "a process that has ended"
    rank = env.get(b"RANK", b"?").decode()
    return f"a DataLoader worker of rank {rank}" if parent in printers else f"rank {rank}"


def print_stacks_below(pid: int) -> None:
    printers = stack_printers(pid)
    if not printers:   # before the trainers start, after they end, or no /proc/PID/task/TID/children
        log.warning("SIGUSR1: no training process below this one to print its stacks")
    for i, child in enumerate(printers):
        if i:
            time.sleep(STAGGER_S)
        log.warning("SIGUSR1: the stacks of process %d (%s), %d of %d", child, describe(child, printers),
                    i + 1, len(printers))
        try:
            os.kill(child, signal.SIGUSR1)
        except ProcessLookupError:
            pass


def forward_sigusr1_to_stack_printers() -> None:
    """On SIGUSR1 a thread has the processes below print their stacks; torchrun's agent in
    the main thread carries on meanwhile."""
    def forward(signum, frame):
        threading.Thread(target=print_stacks_below, args=(os.getpid(),), name="kontrast-stacks",
                         daemon=True).start()
    signal.signal(signal.SIGUSR1, forward)
