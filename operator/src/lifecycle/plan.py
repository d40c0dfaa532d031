"""From a decision to a :class:`Plan`: the operator-owned status fields, the actions, the events."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import Any, Iterable, Mapping, Optional

from ..children import names
from ..children.base import BASE_KINDS
from . import kueue
from .objects import job_queue, name_of
from .observed import Observed, observe, record_of
from .phases import PENDING, PHASE_CONDITION, RUNNING, SUSPENDED, TERMINAL, Conditions, truncate
from .rules import KEEP, RULES, Create, Decision, DeleteJobs, Event, deadline_left

#: Status fields the operator owns; the trainer owns the rest (progress, checkpoints, metrics,
#: resolved, data, outputs: the chart's admissionPolicy.trainerStatusFields).
OWNED_FIELDS = ("phase", "observedGeneration", "conditions", "startTime", "completionTime", "restarts", "attempt",
                "message")


@dataclasses.dataclass
class Plan:
    """What to do: the status to write, the children to create, the Jobs to delete, ..."""

    status: dict[str, Any]
    create: Optional[Create] = None
    delete_jobs: list[str] = dataclasses.field(default_factory=list)
    cleanup: bool = False  # delete every child but the TrainJob (after completion)
    delete_trainjob: bool = False  # the TrainJob itself (its TTL ran out), after the events
    events: list[Event] = dataclasses.field(default_factory=list)
    release: Optional[str] = None  # hand this held worker Job on
    release_queue: Optional[str] = None  # ... to this Kueue LocalQueue (None: unsuspend it)
    release_unpark: bool = False  # ... first taking it out of the parking queue
    repair: tuple[str, ...] = ()  # kinds of missing base children to create again
    requeue_after: Optional[float] = None  # reconcile again after this many seconds
    #: The operator's record of the decided phase and restarts: the TrainJob's annotations
    #: that changed (written after the status; observe() reads them back).
    record: dict[str, str] = dataclasses.field(default_factory=dict)

    def status_patch(self, current: Mapping[str, Any] | None) -> dict[str, Any]:
        """A merge patch of the owned fields that differ from ``current`` (None deletes)."""
        current = current or {}
        return {key: self.status.get(key) for key in OWNED_FIELDS if self.status.get(key) != current.get(key)}


def decide(tj: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
           now: dt.datetime, **observed: Any) -> Plan:
    """Observe, let the first rule that applies decide, plan. ``observed``: see :func:`.observed.observe`."""
    o = observe(tj, jobs, pods, now, **observed)
    decision = next(d for d in (rule(o) for rule in RULES) if d is not None)
    return plan(o, decision)


def conditions(o: Observed, d: Decision, message: str) -> list[dict[str, Any]]:
    """Every condition from the decided phase and the observed children, so none can drift:
    exactly the phase's own condition is True among Running, Restarting, Suspended,
    Succeeded and Failed; Created is True while a worker Job exists or is being created
    and its pods could be created."""
    conds = Conditions(o.status.get("conditions") or [], o.now, o.generation)
    own = PHASE_CONDITION.get(d.phase)
    if own and (d.reason or not conds.is_true(own)):
        conds.set(own, True, d.reason or d.phase, d.detail or message)
    for ctype in PHASE_CONDITION.values():
        if ctype != own and conds.is_true(ctype):
            conds.set(ctype, False, d.reason or d.phase, d.detail or message)
    if o.queued:
        why = kueue.queueing(o.workload, job_queue(o.current))
        conds.set("Queued", True, why.reason, why.message)
    elif conds.is_true("Queued"):
        admitted = o.current is not None and not o.current_suspended and not d.create
        conds.set("Queued", False, "Admitted" if admitted else d.phase,
                  "Kueue admitted the worker Job" if admitted else message)
    if o.pods_missing and o.failed_creates:
        conds.set("Created", False, "FailedCreate", f"the worker Job cannot create pods: {o.failed_creates[0]}")
    elif (o.jobs or d.create) and not conds.is_true("Created"):
        job = name_of(o.current) if o.current is not None and not d.create else names.job_name(
            o.name, d.create.attempt if d.create else o.next_attempt, o.nodes)
        conds.set("Created", True, "ChildrenCreated", f"created the worker Job {job} for {o.nodes} node(s)")
    return conds.as_list()


def plan(o: Observed, d: Decision) -> Plan:
    """The decision as status fields, actions and the events of the conditions that flipped."""
    st = {k: o.status.get(k) for k in OWNED_FIELDS}
    for key, value in (("message", d.message), ("startTime", d.start_time), ("completionTime", d.completion_time)):
        if value is not KEEP:
            st[key] = value
    st.update(phase=d.phase, observedGeneration=o.generation, conditions=conditions(o, d, st.get("message") or ""),
              restarts=o.restarts if d.restarts is None else d.restarts,
              attempt=d.create.attempt if d.create else _newest_attempt(o))
    create = d.create
    if create is not None:
        # An attempt Kueue admits starts the deadline's count again (``queued`` clears
        # startTime), so its Job carries the whole deadline, not what was left before it.
        left = deadline_left(o, None if o.target_queue else st.get("startTime"))
        create = dataclasses.replace(create, queue=o.target_queue,
                                     active_deadline_seconds=max(1, math.ceil(left)) if left else None)
    active = d.phase not in TERMINAL and not o.deleting
    return Plan(
        status=st, create=create, delete_jobs=_jobs_to_delete(o, d.delete_jobs),
        cleanup=d.cleanup, delete_trainjob=d.delete_trainjob, release=d.release,
        release_queue=_release_queue(o) if d.release else None,
        release_unpark=bool(d.release) and not _release_queue(o) and job_queue(o.current) == names.PARKING_QUEUE,
        repair=tuple(k for k in BASE_KINDS if k in o.missing_children) if active and create is None else (),
        requeue_after=_requeue_after(o, d, st),
        record={} if o.deleting else {k: v for k, v in record_of(st["phase"], st["restarts"]).items()
                                      if o.record.get(k) != v},
        events=[*_transition_events(o.status.get("conditions") or [], st["conditions"]), *d.events])


def _newest_attempt(o: Observed) -> Optional[int]:
    """The highest attempt number seen (status.attempt keeps it when no Job or pod does)."""
    return o.next_attempt - 1 if o.next_attempt else None


def _release_queue(o: Observed) -> Optional[str]:
    """Where a held attempt goes: its target queue, else the queue Kueue labelled it with."""
    label = job_queue(o.current)
    return o.target_queue or (label if label != names.PARKING_QUEUE else None)


def _jobs_to_delete(o: Observed, which: DeleteJobs) -> list[str]:
    if which is DeleteJobs.NONE:
        return []
    return [name_of(j) for j in o.live if which is DeleteJobs.ALL or j is not o.current]


def _requeue_after(o: Observed, d: Decision, st: Mapping[str, Any]) -> Optional[float]:
    """When a time-based rule (deadline, hang watchdog, waits) must look again, if sooner
    than any event: an explicit wake-up instead of polling. A finished job wakes up only for
    its TTL."""
    if o.deleting or d.delete_trainjob:
        return None
    if d.phase in TERMINAL:
        return None if d.requeue_after is None else max(1.0, d.requeue_after)
    if d.phase == SUSPENDED:
        return None
    times = [d.requeue_after]
    if st.get("startTime") and not o.queued:
        times.append(deadline_left(o, st["startTime"]))
    last = o.last_progress()
    if o.hang_after is not None and d.phase == RUNNING and last is not None:
        times.append(o.hang_after - (o.now - last).total_seconds())
    times = [t for t in times if t is not None]
    return max(1.0, min(times)) if times else None


def create_failed(tj: Mapping[str, Any], message: str, now: dt.datetime) -> dict[str, Any]:
    """The status patch that says why the children could not be created: Created turns False,
    the rest stays as read (no decision is written: the next pass decides again)."""
    old = tj.get("status") or {}
    conds = Conditions(old.get("conditions") or [], now, tj["metadata"].get("generation"))
    conds.set("Created", False, "CreateFailed", message)
    patch = {"conditions": conds.as_list(), "message": truncate(message),
             "observedGeneration": tj["metadata"].get("generation")}
    if not old.get("phase"):
        patch["phase"] = PENDING
    return patch


_EVENTS = {
    # (condition, status): (event type, event reason)
    ("Created", "True"): ("Normal", "Created"),
    ("Created", "False"): ("Warning", "FailedCreate"),
    ("Running", "True"): ("Normal", "Running"),
    ("Restarting", "True"): ("Warning", "Restarting"),
    ("Succeeded", "True"): ("Normal", "Succeeded"),
    ("Failed", "True"): ("Warning", "Failed"),
    ("Suspended", "True"): ("Normal", "Suspended"),
    ("Suspended", "False"): ("Normal", "Resumed"),
}


def _transition_events(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]) -> list[Event]:
    """An event for each condition that flipped (or changed message, e.g. a second restart)."""
    before = {c["type"]: c for c in old}
    out = []
    for c in new:
        key = (c["type"], c["status"])
        prev = before.get(c["type"])
        changed = prev is None or prev.get("status") != c["status"] or (
            key in (("Restarting", "True"), ("Created", "False")) and prev.get("message") != c.get("message"))
        if key in _EVENTS and changed and not (c["status"] == "False" and prev is None):
            etype, reason = _EVENTS[key]
            out.append(Event(etype, reason, c.get("message") or c.get("reason", "")))
    return out
