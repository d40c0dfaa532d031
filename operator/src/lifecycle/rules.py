"""The rules, tried in the order of :data:`RULES`: the first that applies decides.

Each rule reads only the :class:`~.observed.Observed` snapshot and returns a :class:`Decision`
(phase, children to create, Jobs to delete, ...) or None when it does not apply.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from typing import Any, Callable, Mapping, Optional

from . import kueue
from .objects import deleting, job_queue, name_of, requested_queue
from .observed import Observed
from .phases import (FAILED, PENDING, RESTARTING, RUNNING, SUCCEEDED, SUSPENDED, TERMINAL, condition,
                     condition_true, fmt_time, parse_time, truncate)
from .pods import pod_running, pod_waiting, unready_since

#: A new attempt waits (created suspended) until the pods of older attempts are gone, so two
#: generations of a gang never train, hold GPUs or write checkpoints at once; at most this
#: long after their deletion started (a pod on a dead node may never confirm).
TERMINATION_WAIT_SECONDS = 120.0
#: How soon to look again while the current Job has fewer pods than nodes (quota, admission).
POD_CREATE_RECHECK_SECONDS = 15.0
#: How long peers' failures wait for a pod that stopped being Ready (its node may be lost) to
#: be evicted: the node controller's taint-based eviction comes after 300 s (the default
#: tolerationSeconds of not-ready/unreachable) and marks it DisruptionTarget, a restart that
#: spends no budget. After this long the failure counts.
NODE_LOSS_WAIT_SECONDS = 360.0


@dataclasses.dataclass(frozen=True)
class Create:
    """Create the children of one attempt (idempotent: existing ones are kept).

    ``hold``: create the worker Job suspended (and, bound for a queue, in the parking queue),
    because older attempts or their pods still exist; a later reconcile releases it
    (``Plan.release``). ``queue``: the LocalQueue it goes to (:attr:`.Observed.target_queue`).
    ``active_deadline_seconds``: what is left of the TrainJob's deadline, so the Job
    controller enforces it too. The last two are filled in by :func:`.plan.plan`.
    """
    attempt: int
    restarts: int
    reason: str
    hold: bool = False
    queue: Optional[str] = None
    active_deadline_seconds: Optional[int] = None


KEEP: Any = object()  # a status field the decision leaves as it was


class DeleteJobs(enum.Enum):
    """Which worker Jobs a decision deletes (never one that is already being deleted)."""

    STALE = "stale"  # every attempt but the current one
    ALL = "all"  # every attempt, the current one too
    NONE = "none"  # none at all


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one rule decided. Fields left at their default change nothing (but stale
    attempts are deleted: see ``delete_jobs``).

    Conditions are not listed here: :func:`.plan.conditions` derives all of them from the phase,
    so they cannot disagree with it. ``reason``/``detail`` describe the phase's own condition
    (None: keep it as it is) and the reason of conditions that flip to False.
    """

    phase: str
    reason: Optional[str] = None
    detail: str = ""
    message: Any = KEEP
    start_time: Any = KEEP
    completion_time: Any = KEEP
    restarts: Optional[int] = None
    create: Optional[Create] = None
    delete_jobs: DeleteJobs = DeleteJobs.STALE  # by default, older attempts still alive go
    cleanup: bool = False  # delete every child but the TrainJob (after completion)
    delete_trainjob: bool = False  # its TTL after finishing ran out: the TrainJob goes, its children with it
    release: Optional[str] = None  # hand this held worker Job on (to Kueue, or unsuspend it)
    requeue_after: Optional[float] = None  # reconcile again after this many seconds
    events: tuple[Event, ...] = ()  # besides the events of conditions that flip


Rule = Callable[[Observed], Optional[Decision]]


def deleted(o: Observed) -> Optional[Decision]:
    """Deleted: garbage collection removes the children; nothing to do."""
    if o.deleting:
        return Decision(phase=o.phase or PENDING, delete_jobs=DeleteJobs.NONE)
    return None


def ttl_left(o: Observed) -> Optional[float]:
    """Seconds until a finished TrainJob's ttlSecondsAfterFinished runs out (None: no TTL, or not finished)."""
    finished = o.finished_at() if o.phase in TERMINAL else None
    if o.ttl is None or finished is None:
        return None
    return o.ttl - (o.now - finished).total_seconds()


def expired(o: Observed) -> Optional[Decision]:
    """A finished TrainJob past its ttlSecondsAfterFinished is deleted; garbage collection takes
    its children (ownerReferences). The output volume and a registered model are not children."""
    left = ttl_left(o)
    if left is None or left > 0:
        return None
    message = (f"deleting the TrainJob: it {o.phase.lower()} at {fmt_time(o.finished_at())}, "
               f"{o.ttl:.0f}s ago (ttlSecondsAfterFinished); its output is kept")
    return Decision(phase=o.phase, delete_trainjob=True, delete_jobs=DeleteJobs.NONE,
                    events=(Event("Normal", "TTLExpired", message),))


def terminal(o: Observed) -> Optional[Decision]:
    """Terminal phases are sticky. Finish any cleanup a crash interrupted; wake up when the TTL runs out."""
    if o.phase not in TERMINAL:
        return None
    if o.live and o.sched.cleans_up(o.phase == SUCCEEDED):
        return Decision(phase=o.phase, cleanup=True, delete_jobs=DeleteJobs.ALL, requeue_after=ttl_left(o))
    return Decision(phase=o.phase, requeue_after=ttl_left(o))


def forbidden(o: Observed) -> Optional[Decision]:
    """The spec passes the pods something the platform's policy does not allow: fail, and stop
    any attempt (a TrainJob changed to break the policy does not go on either)."""
    if not o.violations:
        return None
    return _failed(o, "PolicyViolation", "not allowed by the platform's policy: " + "; ".join(o.violations), stop=True)


def suspended(o: Observed) -> Optional[Decision]:
    """Suspend: stop the pods (delete the attempt), keep the checkpoints and the budget."""
    if not o.sched.suspend:
        return None
    return Decision(
        phase=SUSPENDED, reason="Suspended", delete_jobs=DeleteJobs.ALL,
        detail="spec.scheduling.suspend is true: the training pods are stopped; checkpoints are kept",
        message="Suspended: set spec.scheduling.suspend to false to resume from the newest checkpoint")


def resumed(o: Observed) -> Optional[Decision]:
    """Resume: a fresh attempt from the newest checkpoint; the deadline counts from the new start."""
    if o.phase != SUSPENDED and not o.condition_true("Suspended"):
        return None
    return Decision(
        phase=PENDING, reason="Resumed", detail="spec.scheduling.suspend is false: resuming from the newest checkpoint",
        delete_jobs=DeleteJobs.ALL, create=Create(o.next_attempt, o.restarts, "Resumed", hold=o.hold),
        start_time=None, completion_time=None, message=o.waiting_message())


def first_creation(o: Observed) -> Optional[Decision]:
    """First reconcile: create everything (held while pods of a same-named predecessor live)."""
    if o.jobs or o.condition_true("Created") or o.phase not in (None, PENDING):
        return None
    return Decision(phase=PENDING, create=Create(o.next_attempt, o.restarts, "Created", hold=o.hold),
                    message=o.waiting_message())


def succeeded(o: Observed) -> Optional[Decision]:
    if o.current is None or not condition_true(o.current.get("status"), "Complete"):
        return None
    job_status = o.current.get("status") or {}
    cleans = o.sched.cleans_up(True)
    return Decision(
        phase=SUCCEEDED, reason="Completed", detail="all nodes finished training", message="Training completed",
        completion_time=job_status.get("completionTime") or fmt_time(o.now),
        start_time=o.status.get("startTime") or job_status.get("startTime"),
        cleanup=cleans, delete_jobs=DeleteJobs.ALL if cleans else DeleteJobs.STALE)


def _failed(o: Observed, reason: str, message: str, stop: bool) -> Decision:
    """Failed for good: the pods are kept for debugging unless cleanup or ``stop`` says not."""
    cleans = o.sched.cleans_up(False)
    return Decision(
        phase=FAILED, reason=reason, detail=message, message=truncate(message), completion_time=fmt_time(o.now),
        cleanup=cleans, delete_jobs=DeleteJobs.ALL if cleans or stop else DeleteJobs.STALE)


def _job_failed(o: Observed) -> Optional[Mapping[str, Any]]:
    """The current Job's Failed condition, if it failed."""
    status = (o.current or {}).get("status")
    return condition(status, "Failed") if condition_true(status, "Failed") else None


def deadline_left(o: Observed, start: Optional[str]) -> Optional[float]:
    """Seconds left of spec.scheduling.activeDeadlineSeconds, counted from ``start``."""
    deadline = o.sched.active_deadline_seconds
    if not deadline:
        return None
    started = parse_time(start)
    return float(deadline) - ((o.now - started).total_seconds() if started else 0.0)


def deadline_exceeded(o: Observed) -> Optional[Decision]:
    """Active deadline, counted from the start (a resume or a Kueue re-queue starts it again).

    The worker Job carries what is left as its own activeDeadlineSeconds, so the Job
    controller may stop it first: its DeadlineExceeded is this rule's too, not a restart."""
    left = deadline_left(o, o.status.get("startTime"))
    job_deadline = (_job_failed(o) or {}).get("reason") == "DeadlineExceeded"
    if not job_deadline and (left is None or o.status.get("startTime") is None or left > 0):
        return None
    return _failed(o, "DeadlineExceeded", f"the job ran longer than spec.scheduling.activeDeadlineSeconds "
                   f"({o.sched.active_deadline_seconds}s)", stop=True)


def permanent_error(o: Observed) -> Optional[Decision]:
    """The trainer's permanent exit code (bad data, bad parameters) or an OOM kill: fail at
    once, no restart."""
    job_cond = _job_failed(o)
    permanent = [f for f in o.failures if f.permanent]
    if job_cond is None or not (permanent or job_cond.get("reason") == "PodFailurePolicy"):
        return None
    if permanent and permanent[0].oom_killed:
        return _failed(o, "OOMKilled", permanent[0].describe(), stop=False)
    message = (permanent[0].message or permanent[0].describe()) if permanent else job_cond.get("message", "")
    return _failed(o, "PermanentError", message or "the trainer exited with a permanent error", stop=False)


def gang_restart(o: Observed) -> Optional[Decision]:
    """A pod failed or was disrupted: restart every node from the newest checkpoint.

    Disruptions (preemption, eviction, drain) are not the job's fault and spend no budget. The
    Job's own state decides before any pod failure counts: when Kueue evicts an attempt it
    suspends the Job and the Job controller deletes the pods, which end Failed without a
    DisruptionTarget, so they (and a Job failed by them) may be observed before, or without,
    the suspension. A Job suspended and not failed is Kueue's to re-admit (see ``queued``); one
    whose Workload Kueue evicted restarts without spending the budget.
    """
    job_cond = _job_failed(o)
    disrupted = [f for f in o.failures if f.disrupted]
    if o.current is None or not (disrupted or job_cond is not None):
        return None
    if o.current_suspended and job_cond is None:
        return None
    if disrupted:
        return restart(o, "Disrupted", disrupted[0].describe(), spend=False)
    waiting = _node_loss_wait(o)
    if waiting is not None:
        return waiting
    if kueue.evicted(o.workload):
        why = kueue.queueing(o.workload, job_queue(o.current))
        return restart(o, "Evicted", f"Kueue evicted the worker Job ({why.reason}: {why.message})", spend=False)
    ordinary = [f for f in o.failures if not f.disrupted]
    cause = ordinary[0].describe() if ordinary else (job_cond or {}).get("message") or "the worker Job failed"
    return restart(o, "PodFailed", cause, spend=True)


def _node_loss_wait(o: Observed) -> Optional[Decision]:
    """Peers failed while a pod of the attempt still runs but is not Ready: its node has likely
    stopped reporting (a crashed node's pod stays Running, without DisruptionTarget, until its
    eviction). Wait for the eviction rather than charge the node's crash to the job."""
    lost = [(p, parse_time(unready_since(p))) for p in o.pods if unready_since(p)]
    if not lost:
        return None
    pod, since = lost[0]
    left = NODE_LOSS_WAIT_SECONDS - ((o.now - since).total_seconds() if since else 0.0)
    if left <= 0:
        return None
    return Decision(phase=o.phase or PENDING, requeue_after=max(1.0, left), message=truncate(
        f"pod {name_of(pod)} is not Ready (its node may be lost) while its peers failed: waiting up to "
        f"{NODE_LOSS_WAIT_SECONDS:.0f}s for its eviction before counting a failure"))


def hung(o: Observed) -> Optional[Decision]:
    """The watchdog: a Running job whose progress has not moved for ``hang_after`` restarts.

    Each stage of the trainer is judged by its own progress: the trainer moves
    ``progress.updatedAt`` when the stage it reports (``progress.stage``: Loading, Prefetching
    n/N images, Evaluating q/Q queries, Training steps) moves on, so a long set-up that moves is
    not a hang, and one stuck on an image is."""
    last = o.last_progress()
    if o.hang_after is None or o.phase != RUNNING or not o.all_running or last is None:
        return None
    quiet = (o.now - last).total_seconds()
    if quiet < o.hang_after:
        return None
    stage = (o.status.get("progress") or {}).get("stageText")
    cause = (f"no progress reported for {quiet:.0f}s{f' (stage {stage})' if stage else ''} "
             f"(the operator's hang limit is {o.hang_after:.0f}s): the trainer looks hung")
    decision = restart(o, "Hung", cause, spend=True)
    return dataclasses.replace(decision, events=(Event("Warning", "Hung", cause),))


def restart(o: Observed, reason: str, cause: str, spend: bool) -> Decision:
    """A new attempt (held until the old pods are gone), or Failed when the budget is spent."""
    limit = o.sched.max_restarts
    if spend and o.restarts >= limit:
        return _failed(o, "RestartLimitExceeded",
                       f"{cause} (restart budget spent: {o.restarts} of spec.scheduling.maxRestarts={limit})",
                       stop=reason == "Hung")
    restarts = o.restarts + 1 if spend else o.restarts
    budget = f"restart {restarts} of {limit}" if spend else "does not count against maxRestarts"
    return Decision(
        phase=RESTARTING, reason=reason, restarts=restarts, delete_jobs=DeleteJobs.ALL,
        detail=f"{cause}; restarting all nodes from the newest checkpoint ({budget})",
        create=Create(o.next_attempt, restarts, reason, hold=True),
        message=truncate(f"Restarting: {cause}"))


def missing_job(o: Observed) -> Optional[Decision]:
    """No worker Job although one should run (deleted by hand, or a crash between steps)."""
    if o.current is not None:
        return None
    return Decision(
        phase=o.pending_phase(), create=Create(o.next_attempt, o.restarts, "Recreated", hold=o.hold),
        message="the worker Job was missing: recreated it (resumes from the newest checkpoint)")


def held_attempt(o: Observed) -> Optional[Decision]:
    """A held attempt: handed on once the older attempts' pods are gone (or waited for long enough)."""
    if not o.held:
        return None
    waiting = [name_of(j) for j in o.jobs if j is not o.current and _deletion_age(j, o.now) < TERMINATION_WAIT_SECONDS]
    waiting += [name_of(p) for p in o.older_pods if _deletion_age(p, o.now) < TERMINATION_WAIT_SECONDS]
    if not waiting:
        return dataclasses.replace(progress(o), release=name_of(o.current))
    ages = [_deletion_age(x, o.now) for x in (*o.jobs, *o.older_pods) if deleting(x) and x is not o.current]
    return Decision(
        phase=o.pending_phase(), message=truncate(f"waiting for {', '.join(waiting)} to stop"),
        requeue_after=max(1.0, TERMINATION_WAIT_SECONDS - min(ages)) if ages else None)


def _deletion_age(obj: Mapping[str, Any], now: dt.datetime) -> float:
    """Seconds since ``obj``'s deletion was due (-inf while nobody deletes it)."""
    stamp = parse_time((obj.get("metadata") or {}).get("deletionTimestamp"))
    return (now - stamp).total_seconds() if stamp else float("-inf")


def queue_changed(o: Observed) -> Optional[Decision]:
    """spec.scheduling.queueName changed (or went) while Kueue holds the attempt: a fresh
    attempt, held until the old Job is gone, then handed to the new queue or started. Not a
    relabel: a Job whose label is removed leaves its Workload behind in the old queue, and a
    Job Kueue holds is never unsuspended by the operator (no fight over suspend).

    Changed means: the spec names another queue than it did when the attempt was created, and
    than the Job's label. A label Kueue defaulted (a LocalQueue named `default`) is no change."""
    if not o.queued or o.queue in (requested_queue(o.current), job_queue(o.current)):
        return None
    where = f"to LocalQueue {o.queue}" if o.queue else "out of Kueue"
    return Decision(phase=o.pending_phase(), delete_jobs=DeleteJobs.ALL,
                    create=Create(o.next_attempt, o.restarts, "QueueChanged", hold=True),
                    message=f"spec.scheduling.queueName changed: moving the job {where}")


def queued(o: Observed) -> Optional[Decision]:
    """Kueue holds the attempt (suspended) until it admits it, or again after preempting it.
    A re-queued attempt starts the deadline's count again, as a suspend does."""
    if not o.queued:
        return None
    queue = job_queue(o.current)
    why = kueue.queueing(o.workload, queue)
    where = f"in LocalQueue {queue}" if queue else "without a LocalQueue (set spec.scheduling.queueName)"
    return Decision(phase=o.pending_phase(), start_time=None, message=truncate(
        f"Queued by Kueue {where} ({why.reason}): {why.message}"))


def progress(o: Observed) -> Decision:
    """The current attempt is alive: Running once every node runs."""
    job_status = (o.current or {}).get("status") or {}
    start = o.status.get("startTime") or job_status.get("startTime") or (fmt_time(o.now) if o.pods else None)
    running = [p for p in o.pods if pod_running(p)]
    if len(running) >= o.nodes:
        return Decision(phase=RUNNING, reason="PodsRunning", detail=f"all {o.nodes} node(s) are running",
                        start_time=start, message=f"Training on {o.nodes} node(s)")
    stuck = [w for w in (pod_waiting(p) for p in o.pods) if w]
    if o.pods_missing and o.failed_creates:
        stuck.append(f"the Job cannot create pods: {o.failed_creates[0]}")
    message = truncate(f"{len(running)} of {o.nodes} node(s) running" + (f"; {'; '.join(stuck)}" if stuck else ""))
    # While Running, a replacement pod may be starting; the gang restarts if training breaks.
    phase = RESTARTING if o.condition_true("Restarting") else RUNNING if o.condition_true("Running") else PENDING
    # Pods that cannot be created produce no event of their own: look again soon.
    return Decision(phase=phase, start_time=start, message=message,
                    requeue_after=POD_CREATE_RECHECK_SECONDS if o.pods_missing else None)


RULES: tuple[Rule, ...] = (
    deleted, expired, terminal, forbidden, suspended, resumed, first_creation, succeeded, deadline_exceeded,
    permanent_error, gang_restart, hung, missing_job, held_attempt, queue_changed, queued, progress,
)


