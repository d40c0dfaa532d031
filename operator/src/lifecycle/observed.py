"""One frozen snapshot of everything a rule may read, and :func:`observe`, which builds it."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence

from kontrast.api.defaults import defaulted_spec
from kontrast.api.scheduling import Scheduling

from ..children import names

from .objects import (attempt_of, bound_queue, controller_uid, deleting, job_held, job_queue, job_suspended,
                      requested_queue, restarts_spent)
from .phases import PENDING, PHASE_CONDITION, RESTARTING, condition, condition_true, parse_time
from .pods import PodFailure, pod_failure, pod_lives, pod_running


@dataclasses.dataclass(frozen=True)
class Observed:
    """One snapshot of everything a rule may read; rules never look anywhere else."""

    now: dt.datetime
    name: str
    generation: Optional[int]
    deleting: bool  # the TrainJob itself is being deleted
    sched: Scheduling  # spec.scheduling with the CRD's defaults
    nodes: int
    status: Mapping[str, Any]  # the TrainJob's status as read
    phase: Optional[str]  # the phase the operator decided last (:func:`recorded`)
    jobs: tuple[Mapping[str, Any], ...]  # every worker Job, oldest attempt first
    current: Optional[Mapping[str, Any]]  # the newest Job, unless it is being deleted
    next_attempt: int  # above every attempt seen, on Jobs, on pods that outlived theirs, in status
    restarts: int  # budget spent: the larger of status.restarts and the newest Job's record
    pods: tuple[Mapping[str, Any], ...]  # the pods the current Job controls (by uid)
    older_pods: tuple[Mapping[str, Any], ...]  # live pods of any other Job (or TrainJob of this name)
    failures: tuple[PodFailure, ...]  # how pods of the current attempt failed
    #: Why the current Job cannot create its pods (its FailedCreate events: quota, PodSecurity).
    failed_creates: tuple[str, ...] = ()
    #: Kinds of the base children (ServiceAccount, Role, ...) found missing; repaired at once.
    missing_children: frozenset[str] = frozenset()
    #: Restart a Running job whose progress has not moved for this long (None: never).
    hang_after: Optional[float] = None
    #: Kueue's Workload of the current Job, read while Kueue holds it (why it waits).
    workload: Optional[Mapping[str, Any]] = None
    #: The operator's record on the TrainJob as read (:func:`recorded`; empty before the first).
    record: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: The platform's ttlSecondsAfterFinished for TrainJobs that set none (None: keep them).
    default_ttl: Optional[float] = None
    #: The LocalQueue Kueue gave an attempt created without one (a LocalQueue named `default`).
    kueue_default: Optional[str] = None
    #: What the spec sets that the platform's policy does not allow, one message per field.
    violations: tuple[str, ...] = ()

    @property
    def live(self) -> tuple[Mapping[str, Any], ...]:
        """Jobs not being deleted."""
        return tuple(j for j in self.jobs if not deleting(j))

    @property
    def queue(self) -> Optional[str]:
        """The LocalQueue named by today's spec (a new or released attempt goes there)."""
        return self.sched.queue_name

    @property
    def target_queue(self) -> Optional[str]:
        """Where a new or released attempt goes: today's spec, else the queue Kueue gave this
        TrainJob's attempts by default (it would label the next one so again)."""
        return self.queue or self.kueue_default

    @property
    def hold(self) -> bool:
        """Whether a new attempt must start held: older attempts or their pods still exist.

        Held attempts bound for a queue carry the parking queue's label, so Kueue cannot admit
        them early either."""
        return bool(self.jobs) or bool(self.older_pods)

    @property
    def current_suspended(self) -> bool:
        return job_suspended(self.current)

    @property
    def queued(self) -> bool:
        """Kueue holds the current attempt: suspended, and not by the operator (whatever its
        label says: Kueue also suspends unlabelled Jobs with manageJobsWithoutQueueName)."""
        return _queued(self.current)

    @property
    def held(self) -> bool:
        """The operator holds the current attempt: suspended and not (yet) handed on."""
        return job_held(self.current)

    @property
    def all_running(self) -> bool:
        return sum(1 for p in self.pods if pod_running(p)) >= self.nodes

    @property
    def pods_missing(self) -> bool:
        """The current attempt runs (not suspended) but has fewer pods than nodes."""
        return _pods_missing(self.current, self.pods, self.nodes)

    def condition(self, ctype: str) -> Optional[Mapping[str, Any]]:
        return condition(self.status, ctype)

    def condition_true(self, ctype: str) -> bool:
        return condition_true(self.status, ctype)

    def waiting_message(self) -> str:
        if self.target_queue:
            return f"Waiting for Kueue to admit the worker Job (LocalQueue {self.target_queue})"
        return f"Waiting for {self.nodes} node(s) to start"

    def pending_phase(self) -> str:
        """The phase while an attempt is not (yet) running: Restarting during a restart."""
        return RESTARTING if self.condition_true("Restarting") else PENDING

    @property
    def ttl(self) -> Optional[float]:
        """Seconds a finished TrainJob is kept: its own spec.scheduling, else the platform's."""
        own = self.sched.ttl_seconds_after_finished
        return float(own) if own is not None else self.default_ttl

    def finished_at(self) -> Optional[dt.datetime]:
        """When the job Succeeded or Failed: status.completionTime, else its condition's transition."""
        stamp = self.status.get("completionTime") or (
            self.condition(PHASE_CONDITION.get(self.phase or "", "")) or {}).get("lastTransitionTime")
        return parse_time(stamp)

    def last_progress(self) -> Optional[dt.datetime]:
        """When the trainer last reported progress, or the attempt started running if later."""
        times = [parse_time((self.status.get("progress") or {}).get("updatedAt")),
                 parse_time((self.condition("Running") or {}).get("lastTransitionTime"))]
        return max((t for t in times if t is not None), default=None)


def _queued(current: Optional[Mapping[str, Any]]) -> bool:
    return job_suspended(current) and not job_held(current)


def _failed_in_kueue(current: Optional[Mapping[str, Any]], failures: Sequence[PodFailure]) -> bool:
    """The current attempt is in a Kueue queue and its pods or the Job failed: whether Kueue
    evicted it (its Workload) decides whether that counts."""
    queue = job_queue(current) if current is not None else None
    return bool(queue) and queue != names.PARKING_QUEUE and (
        bool(failures) or condition_true(current.get("status"), "Failed"))


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _kueue_default(jobs: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """The queue Kueue put the newest attempt in that the operator created without one (the
    label Kueue defaulted, or the queue a parked attempt inherited from its predecessor)."""
    return next((bound_queue(j) for j in reversed(jobs) if requested_queue(j) is None and bound_queue(j)), None)


def _pods_missing(current: Optional[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], nodes: int) -> bool:
    return current is not None and not job_suspended(current) and len(pods) < nodes


def recorded(tj: Mapping[str, Any]) -> dict[str, str]:
    """The operator's own record of what it decided: its annotations on the TrainJob."""
    annotations = tj["metadata"].get("annotations") or {}
    return {k: annotations[k] for k in (names.ANNOTATION_PHASE, names.ANNOTATION_RESTARTS) if k in annotations}


def record_of(phase: str, restarts: int) -> dict[str, str]:
    return {names.ANNOTATION_PHASE: phase, names.ANNOTATION_RESTARTS: str(restarts)}


class Reads(Protocol):
    """The two reads that depend on what was observed (:class:`kontrast.operator.kube.Kube`)."""

    def failed_creates(self, job: Mapping[str, Any]) -> Sequence[str]: ...

    def workload(self, job: Mapping[str, Any]) -> Optional[Mapping[str, Any]]: ...


def observe(tj: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
            now: dt.datetime, *, failed_creates: Sequence[str] = (), missing_children: frozenset[str] = frozenset(),
            hang_after: Optional[float] = None, workload: Optional[Mapping[str, Any]] = None,
            violations: Sequence[str] = (), read: Optional[Reads] = None,
            default_ttl: Optional[float] = None) -> Observed:
    """The snapshot. ``read`` (the cluster) is asked only for what the snapshot shows it needs:
    the current Job's FailedCreate events while the Job is short of pods, its Workload while
    Kueue holds it or once its pods failed in a Kueue queue (read after the pods, so never older
    than they are). Without ``read``, ``failed_creates`` and ``workload`` are taken as given.
    ``violations``: what the platform's policy does not allow in the spec (:mod:`..policy`)."""
    meta, spec = tj["metadata"], defaulted_spec(tj.get("spec") or {})
    status = dict(tj.get("status") or {})
    jobs = tuple(sorted(jobs, key=attempt_of))
    pods = tuple(pods)
    latest = jobs[-1] if jobs else None
    current = latest if latest is not None and not deleting(latest) else None
    current_uid = ((current or {}).get("metadata") or {}).get("uid")
    # Pods belong to the Job that controls them, never to an attempt number or a name: a
    # re-created Job or TrainJob of the same name must not inherit the old pods' failures.
    mine = [bool(current_uid) and controller_uid(p) == current_uid for p in pods]
    attempt_pods = tuple(p for p, m in zip(pods, mine) if m)
    if read is not None and _pods_missing(current, attempt_pods, spec["nodes"]):
        # Pods that cannot be created (quota, PodSecurity) show only as the Job's events.
        failed_creates = read.failed_creates(current)
    failures = tuple(f for f in (pod_failure(p) for p in attempt_pods) if f is not None)
    if read is not None and (_queued(current) or _failed_in_kueue(current, failures)):
        workload = read.workload(current)
    # status.phase and status.restarts are read only for a TrainJob this operator version has
    # not reconciled yet (created by an older one); from then on its own record decides.
    record = recorded(tj)
    phase = record.get(names.ANNOTATION_PHASE, status.get("phase") if not record else None)
    spent = int(record.get(names.ANNOTATION_RESTARTS, 0 if record else status.get("restarts") or 0))
    return Observed(
        now=now,
        name=meta["name"],
        generation=meta.get("generation"),
        deleting=bool(meta.get("deletionTimestamp")),
        sched=Scheduling.from_spec(spec),
        nodes=spec["nodes"],
        status=status,
        phase=phase,
        jobs=jobs,
        current=current,
        # The status records the newest attempt too: a Job deleted by hand with its pods
        # leaves no object that carries its number.
        next_attempt=max([attempt_of(o) for o in (*jobs, *pods)] + [_int(status.get("attempt"), -1)]) + 1,
        restarts=max(spent, restarts_spent(latest)),
        pods=attempt_pods,
        older_pods=tuple(p for p, m in zip(pods, mine) if not m and pod_lives(p)),
        failures=failures,
        failed_creates=tuple(failed_creates),
        missing_children=missing_children,
        hang_after=hang_after,
        workload=workload,
        record=record,
        default_ttl=default_ttl,
        kueue_default=_kueue_default(jobs),
        violations=tuple(violations),
    )
