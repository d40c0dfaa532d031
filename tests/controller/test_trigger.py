"""The operator's pass scheduling (handlers.trigger) with a reconciler that blocks until told:
at thousands of TrainJobs the periodic resyncs outnumber what the API server serves, and a
state change must not queue behind them (benchmarks/operator_running.py measured p50 92 s at
2,000 running TrainJobs before this)."""

from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import kopf

from kontrast.operator import handlers
from kontrast.operator.config import OperatorConfig


class Gate:
    """A reconciler whose passes block until released; records which TrainJobs it served."""

    def __init__(self):
        self.started: list[str] = []
        self.release = threading.Event()
        self.seen: list = []

    def reconcile(self, namespace, name, present):
        self.started.append(name)
        self.seen.append(present("uid-" + name))
        self.release.wait(30)
        return None


def memo_with(gate: Gate, workers: int) -> kopf.Memo:
    memo = kopf.Memo()
    memo.config = OperatorConfig(reconcile_workers=workers)
    memo.reconciler = gate
    memo.running, memo.dirty, memo.wakeups = set(), set(), {}
    memo.children = {"uid-event": frozenset({("ServiceAccount", "event-trainer")})}
    memo.executor = ThreadPoolExecutor(workers)
    memo.resync_slots = asyncio.Semaphore(max(1, workers // 4))
    return memo


async def until(predicate, what: str) -> None:
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached: {what}")


def test_resyncs_take_a_quarter_of_the_workers_and_an_event_is_served_past_them():
    async def main():
        gate = Gate()
        memo = memo_with(gate, workers=8)
        resyncs = [asyncio.ensure_future(handlers.trigger(memo, "ns", f"resync-{i}", periodic=True))
                   for i in range(40)]
        await until(lambda: len(gate.started) == 2, "two resync passes")
        # 8 workers // 4: both resync slots are taken, so the other 38 resyncs wait on them
        assert memo.resync_slots.locked() and len(gate.started) == 2
        event = asyncio.ensure_future(handlers.trigger(memo, "ns", "event"))
        await until(lambda: "event" in gate.started, "the event's pass")
        assert gate.seen[-1] == frozenset({"ServiceAccount"})   # its own children, read when it ran
        # a resync of a TrainJob whose event pass runs is dropped, not queued behind it
        await handlers.trigger(memo, "ns", "event", periodic=True)
        assert gate.started.count("event") == 1
        gate.release.set()
        await asyncio.gather(event, *resyncs)
        assert sorted(gate.started) == sorted(["event", *(f"resync-{i}" for i in range(40))])
        assert not memo.running
        memo.executor.shutdown()
    asyncio.run(main())


def test_an_event_during_a_pass_runs_one_more_pass():
    async def main():
        gate = Gate()
        memo = memo_with(gate, workers=4)
        first = asyncio.ensure_future(handlers.trigger(memo, "ns", "a"))
        await until(lambda: gate.started == ["a"], "the first pass")
        for _ in range(5):                       # events meanwhile collapse into one more pass
            await handlers.trigger(memo, "ns", "a")
        gate.release.set()
        await first
        assert gate.started == ["a", "a"]
        memo.executor.shutdown()
    asyncio.run(main())


def test_the_resync_listing_updates_the_shared_children_only_for_trainjobs_that_exist():
    """The listing repairs what the watches missed (a relist sends no DELETED), in the dict the
    handlers' copies of the memo share, and keeps no entry for a TrainJob already deleted (a
    listing that raced its deletion, or a child's DELETED that came after the TrainJob's)."""
    class Listing:
        def base_children_seen(self, namespaces):
            return {"uid-alive": {("Role", "alive-trainer")}, "uid-deleted": {("Role", "deleted-trainer")}}

    async def main():
        memo = kopf.Memo()
        memo.config = OperatorConfig(resync_seconds=0.01)
        memo.kube = Listing()
        memo.children = {"uid-alive": frozenset({("Role", "alive-trainer"), ("ConfigMap", "alive-trainjob")}),
                         "uid-gone": frozenset(), "uid-quiet": frozenset({("Role", "quiet-trainer")})}
        memo.trainjobs = {"uid-alive", "uid-quiet"}
        handler_view = copy.copy(memo)       # what kopf hands each handler
        task = asyncio.ensure_future(handlers._refresh_children(memo))
        try:
            await until(lambda: "uid-gone" not in handler_view.children, "the listing applied")
        finally:
            task.cancel()
        assert handler_view.children == {"uid-alive": frozenset({("Role", "alive-trainer")}),
                                         "uid-quiet": frozenset()}

    asyncio.run(main())
