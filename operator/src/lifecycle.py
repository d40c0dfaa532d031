"""A TrainJob's lifecycle: what the operator observed -> the new status and the actions. Pure.

``decide(tj, jobs, pods, now)`` first builds one frozen snapshot, :class:`Observed`, from

- the TrainJob (spec, current status, generation),
- every worker Job of the TrainJob (all attempts, including ones being deleted),
- every pod of the TrainJob (matched to its Job by the controller uid, never by name),
- optionally: the current Job's FailedCreate events, which base children are missing, and
  the hang watchdog's limit,

then tries the rules of :data:`RULES` in order; the first that applies returns a
:class:`Decision` (phase, children to create, Jobs to delete, ...), and :func:`plan` turns it
into a :class:`Plan`: the operator-owned status fields, the actions and the events. The
conditions are derived from the decided phase by one function (:func:`conditions`), so they
cannot disagree with it or with each other.

State lives in the cluster, never in the operator's memory:

- The newest worker Job (highest ``kontrast.dev/attempt``) is the current attempt. Each Job
  carries the restart budget spent when it was created (annotation ``kontrast.dev/restarts``),
  so a restart decision is recorded by the very object it creates: an operator that crashes
  between creating the next attempt and patching status can never count a failure twice.
- Succeeded and Failed are terminal and sticky: cleanup deletes children, and a TrainJob
  whose children are gone is never restarted (so cleanup cannot reset the restart budget).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import Any, Callable, Iterable, Mapping, Optional

from kontrast import contract

from . import kueue, render

PENDING, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED = (
    "Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
TERMINAL = frozenset({SUCCEEDED, FAILED})
CONDITION_TYPES = ("Created", "Queued", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
#: Status fields the operator owns; the trainer owns the rest (progress, checkpoints, metrics,
#: resolved, data, outputs: the chart's admissionPolicy.trainerStatusFields).
OWNED_FIELDS = ("phase", "observedGeneration", "conditions", "startTime", "completionTime", "restarts", "message")
MESSAGE_LIMIT = 2000
#: A new attempt waits (created suspended) until the pods of older attempts are gone, so two
#: generations of a gang never train, hold GPUs or write checkpoints at once; at most this
#: long after their deletion started (a pod on a dead node may never confirm).
TERMINATION_WAIT_SECONDS = 120.0


# --- small helpers ------------------------------------------------------------------------
def fmt_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: Optional[str]) -> Optional[dt.datetime]:
    if not s:
        return None
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cond(obj: Mapping[str, Any], ctype: str) -> Optional[Mapping[str, Any]]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def _true(obj: Mapping[str, Any], ctype: str) -> bool:
    c = _cond(obj, ctype)
    return bool(c) and c.get("status") == "True"


def attempt_of(obj: Mapping[str, Any]) -> int:
    try:
        return int(((obj.get("metadata") or {}).get("labels") or {}).get(render.LABEL_ATTEMPT, -1))
    except ValueError:
        return -1


def _deleting(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _name(obj: Mapping[str, Any]) -> str:
    return obj["metadata"]["name"]


# --- conditions ---------------------------------------------------------------------------
class Conditions:
    """Conditions keyed by type; lastTransitionTime moves only when the status flips."""

    def __init__(self, current: Iterable[Mapping[str, Any]], now: dt.datetime, generation: Optional[int]):
        self._by_type = {c["type"]: dict(c) for c in current or [] if "type" in c}
        self._now = fmt_time(now)
        self._generation = generation

    def set(self, ctype: str, status: bool, reason: str, message: str = "") -> None:
        value = "True" if status else "False"
        old = self._by_type.get(ctype)
        cond = {
            "type": ctype,
            "status": value,
            "reason": reason,
            "message": truncate(message),
            "lastTransitionTime": self._now if not old or old.get("status") != value else old.get(
                "lastTransitionTime", self._now),
        }
        if self._generation is not None:
            cond["observedGeneration"] = self._generation
        self._by_type[ctype] = cond

    def is_true(self, ctype: str) -> bool:
        c = self._by_type.get(ctype)
        return bool(c) and c.get("status") == "True"

    def as_list(self) -> list[dict[str, Any]]:
        order = {t: i for i, t in enumerate(CONDITION_TYPES)}
        return sorted(self._by_type.values(), key=lambda c: (order.get(c["type"], 99), c["type"]))


# --- pods ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PodFailure:
    pod: str
    index: Optional[int]
    exit_code: Optional[int]
    reason: str
    message: str
    disrupted: bool

    @property
    def permanent(self) -> bool:
        return self.exit_code == contract.EXIT_PERMANENT

    def describe(self) -> str:
        where = f"pod {self.pod}" + (f" (node {self.index})" if self.index is not None else "")
        if self.disrupted:
            what = f"was disrupted ({self.reason})" if self.reason else "was disrupted"
        elif self.exit_code is not None:
            what = f"exited with code {self.exit_code}" + (f" ({self.reason})" if self.reason else "")
        else:
            what = f"failed ({self.reason})" if self.reason else "failed"
        text = f"{where} {what}"
        return f"{text}: {self.message}" if self.message else text


def pod_index(pod: Mapping[str, Any]) -> Optional[int]:
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(render.COMPLETION_INDEX_ANNOTATION) or (
        meta.get("labels") or {}).get(render.COMPLETION_INDEX_ANNOTATION)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _trainer_state(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == render.TRAINER_CONTAINER:
            return cs.get("state") or {}
    return {}


def pod_failure(pod: Mapping[str, Any]) -> Optional[PodFailure]:
    """How a pod failed, or None while it has not (DisruptionTarget counts at once)."""
    status = pod.get("status") or {}
    disruption = _cond(pod, "DisruptionTarget")
    disrupted = bool(disruption) and disruption.get("status") == "True"
    if status.get("phase") != "Failed" and not disrupted:
        return None
    term = _trainer_state(pod).get("terminated") or {}
    if disrupted:
        reason = disruption.get("reason") or ""
        message = disruption.get("message") or ""
    else:
        reason = term.get("reason") or status.get("reason") or ""
        message = term.get("message") or status.get("message") or ""
    return PodFailure(
        pod=_name(pod), index=pod_index(pod), exit_code=term.get("exitCode"),
        reason=reason, message=truncate(message), disrupted=disrupted,
    )


def pod_waiting(pod: Mapping[str, Any]) -> Optional[str]:
    """A stuck pod's reason (ImagePullBackOff, CreateContainerConfigError, Unschedulable...)."""
    waiting = _trainer_state(pod).get("waiting") or {}
    reason = waiting.get("reason")
    if reason and reason not in ("ContainerCreating", "PodInitializing"):
        return f"pod {_name(pod)}: {reason}" + (f": {waiting['message']}" if waiting.get("message") else "")
    sched = _cond(pod, "PodScheduled")
    if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        return f"pod {_name(pod)} is unschedulable: {sched.get('message', '')}".rstrip(": ")
    return None


def _running(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" and not _deleting(pod)


def _lives(pod: Mapping[str, Any]) -> bool:
    """Whether a pod's processes may still run (it holds its hostname, ports and GPUs)."""
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def controller_uid(obj: Mapping[str, Any]) -> Optional[str]:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def job_queue(job: Mapping[str, Any]) -> Optional[str]:
    """The Kueue LocalQueue a worker Job was handed to (its own label, not today's spec)."""
    return ((job.get("metadata") or {}).get("labels") or {}).get(render.KUEUE_QUEUE_LABEL)


# --- what was observed --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Observed:
    """One snapshot of everything a rule may read; rules never look anywhere else."""

    now: dt.datetime
    name: str
    generation: Optional[int]
    deleting: bool  # the TrainJob itself is being deleted
    sched: Mapping[str, Any]  # spec.scheduling with the CRD's defaults
    nodes: int
    status: Mapping[str, Any]  # the TrainJob's status as read
    jobs: tuple[Mapping[str, Any], ...]  # every worker Job, oldest attempt first
    current: Optional[Mapping[str, Any]]  # the newest Job, unless it is being deleted
    next_attempt: int  # above every attempt seen, on Jobs and on pods that outlived theirs
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

    @property
    def phase(self) -> Optional[str]:
        return self.status.get("phase")

    @property
    def live(self) -> tuple[Mapping[str, Any], ...]:
        """Jobs not being deleted."""
        return tuple(j for j in self.jobs if not _deleting(j))

    @property
    def queue(self) -> Optional[str]:
        """The LocalQueue named by today's spec (a new or released attempt goes there)."""
        return self.sched.get("queueName")

    @property
    def hold(self) -> bool:
        """Whether a new attempt must start held: older attempts or their pods still exist.

        Held attempts carry no Kueue label, so Kueue cannot admit them early either."""
        return bool(self.jobs) or bool(self.older_pods)

    @property
    def current_suspended(self) -> bool:
        return self.current is not None and bool((self.current.get("spec") or {}).get("suspend"))

    @property
    def queued(self) -> bool:
        """Kueue holds the current attempt: suspended, and handed to a queue by its own label."""
        return self.current_suspended and bool(job_queue(self.current))

    @property
    def held(self) -> bool:
        """The operator holds the current attempt: suspended and not (yet) handed to Kueue."""
        return self.current_suspended and not job_queue(self.current)

    @property
    def all_running(self) -> bool:
        return sum(1 for p in self.pods if _running(p)) >= self.nodes

    @property
    def pods_missing(self) -> bool:
        """The current attempt runs (not suspended) but has fewer pods than nodes."""
        return self.current is not None and not self.current_suspended and len(self.pods) < self.nodes

    def condition(self, ctype: str) -> Optional[Mapping[str, Any]]:
        return next((c for c in self.status.get("conditions") or [] if c.get("type") == ctype), None)

    def condition_true(self, ctype: str) -> bool:
        return (self.condition(ctype) or {}).get("status") == "True"

    def cleanup_wanted(self, succeeded: bool) -> bool:
        return self.sched["cleanup"] == "Always" or (self.sched["cleanup"] == "OnSuccess" and succeeded)

    def waiting_message(self) -> str:
        if self.queue:
            return f"Waiting for Kueue to admit the worker Job (LocalQueue {self.queue})"
        return f"Waiting for {self.nodes} node(s) to start"

    def pending_phase(self) -> str:
        """The phase while an attempt is not (yet) running: Restarting during a restart."""
        return RESTARTING if self.condition_true("Restarting") else PENDING

    def last_progress(self) -> Optional[dt.datetime]:
        """When the trainer last reported progress, or the attempt started running if later."""
        times = [parse_time((self.status.get("progress") or {}).get("updatedAt")),
                 parse_time((self.condition("Running") or {}).get("lastTransitionTime"))]
        return max((t for t in times if t is not None), default=None)


def _spent(job: Optional[Mapping[str, Any]]) -> int:
    if job is None:
        return 0
    try:
        return int(((job.get("metadata") or {}).get("annotations") or {}).get(render.ANNOTATION_RESTARTS, 0))
    except ValueError:
        return 0


def observe(tj: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
            now: dt.datetime, **extra: Any) -> Observed:
    """The snapshot; ``extra`` fills the optional fields (failed_creates, missing_children, hang_after)."""
    meta, spec = tj["metadata"], tj.get("spec") or {}
    status = dict(tj.get("status") or {})
    jobs = tuple(sorted(jobs, key=attempt_of))
    pods = tuple(pods)
    latest = jobs[-1] if jobs else None
    current = latest if latest is not None and not _deleting(latest) else None
    current_uid = ((current or {}).get("metadata") or {}).get("uid")
    # Pods belong to the Job that controls them, never to an attempt number or a name: a
    # re-created Job or TrainJob of the same name must not inherit the old pods' failures.
    mine = [bool(current_uid) and controller_uid(p) == current_uid for p in pods]
    attempt_pods = tuple(p for p, m in zip(pods, mine) if m)
    return Observed(
        now=now,
        name=meta["name"],
        generation=meta.get("generation"),
        deleting=bool(meta.get("deletionTimestamp")),
        sched=render.scheduling(spec),
        nodes=int(spec.get("nodes", 1)),
        status=status,
        jobs=jobs,
        current=current,
        next_attempt=max([attempt_of(o) for o in (*jobs, *pods)], default=-1) + 1,
        restarts=max(int(status.get("restarts") or 0), _spent(latest)),
        pods=attempt_pods,
        older_pods=tuple(p for p, m in zip(pods, mine) if not m and _lives(p)),
        failures=tuple(f for f in (pod_failure(p) for p in attempt_pods) if f is not None),
        **extra,
    )


# --- what a rule decides ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Create:
    """Create the children of one attempt (idempotent: existing ones are kept).

    ``hold``: create the worker Job suspended and without Kueue's label, because older
    attempts or their pods still exist; a later reconcile releases it (``Plan.release``).
    ``active_deadline_seconds``: what is left of the TrainJob's deadline, so the Job
    controller enforces it too.
    """
    attempt: int
    restarts: int
    reason: str
    hold: bool = False
    active_deadline_seconds: Optional[int] = None


_KEEP: Any = object()  # a status field the decision leaves as it was


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one rule decided. Fields left at their default change nothing.

    Conditions are not listed here: :func:`conditions` derives all of them from the phase,
    so they cannot disagree with it. ``reason``/``detail`` describe the phase's own condition
    (None: keep it as it is) and the reason of conditions that flip to False.
    """

    phase: str
    reason: Optional[str] = None
    detail: str = ""
    message: Any = _KEEP
    start_time: Any = _KEEP
    completion_time: Any = _KEEP
    restarts: Optional[int] = None
    create: Optional[Create] = None
    delete_jobs: Optional[tuple[str, ...]] = None  # None: the stale attempts (live, not current)
    cleanup: bool = False  # delete every child but the TrainJob (after completion)
    release: Optional[str] = None  # hand this held worker Job on (to Kueue, or unsuspend it)
    requeue_after: Optional[float] = None  # reconcile again after this many seconds
    events: tuple[Event, ...] = ()  # besides the events of conditions that flip


@dataclasses.dataclass
class Plan:
    status: dict[str, Any]
    create: Optional[Create] = None
    delete_jobs: list[str] = dataclasses.field(default_factory=list)
    cleanup: bool = False  # delete every child but the TrainJob (after completion)
    events: list[Event] = dataclasses.field(default_factory=list)
    release: Optional[str] = None  # hand this held worker Job on
    release_queue: Optional[str] = None  # ... to this Kueue LocalQueue (None: unsuspend it)
    repair: tuple[str, ...] = ()  # kinds of missing base children to create again
    requeue_after: Optional[float] = None  # reconcile again after this many seconds

    def status_patch(self, current: Mapping[str, Any] | None) -> dict[str, Any]:
        """A merge patch of the owned fields that differ from ``current`` (None deletes)."""
        current = current or {}
        return {key: self.status.get(key) for key in OWNED_FIELDS if self.status.get(key) != current.get(key)}


# --- the rules, in the order they are tried -------------------------------------------------
Rule = Callable[[Observed], Optional[Decision]]


def _all_live(o: Observed) -> tuple[str, ...]:
    return tuple(_name(j) for j in o.live)


def deleted(o: Observed) -> Optional[Decision]:
    """Deleted: garbage collection removes the children; nothing to do."""
    if o.deleting:
        return Decision(phase=o.phase or PENDING, delete_jobs=())
    return None


def terminal(o: Observed) -> Optional[Decision]:
    """Terminal phases are sticky. Finish any cleanup a crash interrupted."""
    if o.phase not in TERMINAL:
        return None
    if o.live and o.cleanup_wanted(o.phase == SUCCEEDED):
        return Decision(phase=o.phase, cleanup=True, delete_jobs=_all_live(o))
    return Decision(phase=o.phase)


def suspended(o: Observed) -> Optional[Decision]:
    """Suspend: stop the pods (delete the attempt), keep the checkpoints and the budget."""
    if not o.sched["suspend"]:
        return None
    return Decision(
        phase=SUSPENDED, reason="Suspended", delete_jobs=_all_live(o),
        detail="spec.scheduling.suspend is true: the training pods are stopped; checkpoints are kept",
        message="Suspended: set spec.scheduling.suspend to false to resume from the newest checkpoint")


def resumed(o: Observed) -> Optional[Decision]:
    """Resume: a fresh attempt from the newest checkpoint; the deadline counts from the new start."""
    if o.phase != SUSPENDED and not o.condition_true("Suspended"):
        return None
    return Decision(
        phase=PENDING, reason="Resumed", detail="spec.scheduling.suspend is false: resuming from the newest checkpoint",
        delete_jobs=_all_live(o), create=Create(o.next_attempt, o.restarts, "Resumed", hold=o.hold),
        start_time=None, completion_time=None, message=o.waiting_message())


def first_creation(o: Observed) -> Optional[Decision]:
    """First reconcile: create everything (held while pods of a same-named predecessor live)."""
    if o.jobs or o.condition_true("Created") or o.phase not in (None, PENDING):
        return None
    return Decision(phase=PENDING, create=Create(o.next_attempt, o.restarts, "Created", hold=o.hold),
                    message=o.waiting_message())


def succeeded(o: Observed) -> Optional[Decision]:
    if o.current is None or not _true(o.current, "Complete"):
        return None
    job_status = o.current.get("status") or {}
    cleans = o.cleanup_wanted(True)
    return Decision(
        phase=SUCCEEDED, reason="Completed", detail="all nodes finished training", message="Training completed",
        completion_time=job_status.get("completionTime") or fmt_time(o.now),
        start_time=o.status.get("startTime") or job_status.get("startTime"),
        cleanup=cleans, delete_jobs=_all_live(o) if cleans else None)


def _failed(o: Observed, reason: str, message: str, stop: bool) -> Decision:
    """Failed for good: the pods are kept for debugging unless cleanup or ``stop`` says not."""
    cleans = o.cleanup_wanted(False)
    return Decision(
        phase=FAILED, reason=reason, detail=message, message=truncate(message), completion_time=fmt_time(o.now),
        cleanup=cleans, delete_jobs=_all_live(o) if cleans or stop else None)


def _job_failed(o: Observed) -> Optional[Mapping[str, Any]]:
    """The current Job's Failed condition, if it failed."""
    return _cond(o.current, "Failed") if o.current is not None and _true(o.current, "Failed") else None


def deadline_left(o: Observed, start: Optional[str]) -> Optional[float]:
    """Seconds left of spec.scheduling.activeDeadlineSeconds, counted from ``start``."""
    deadline = o.sched.get("activeDeadlineSeconds")
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
                   f"({o.sched.get('activeDeadlineSeconds')}s)", stop=True)


def permanent_error(o: Observed) -> Optional[Decision]:
    """The trainer's permanent exit code (bad data, bad parameters): fail at once, no restart."""
    job_cond = _job_failed(o)
    permanent = [f for f in o.failures if f.permanent]
    if job_cond is None or not (permanent or job_cond.get("reason") == "PodFailurePolicy"):
        return None
    message = (permanent[0].message or permanent[0].describe()) if permanent else job_cond.get("message", "")
    return _failed(o, "PermanentError", message or "the trainer exited with a permanent error", stop=False)


def gang_restart(o: Observed) -> Optional[Decision]:
    """A pod failed or was disrupted: restart every node from the newest checkpoint.

    Disruptions (preemption, eviction, drain) are not the job's fault and spend no budget.
    """
    job_cond = _job_failed(o)
    disrupted = [f for f in o.failures if f.disrupted]
    if o.current is None or o.current_suspended or not (disrupted or job_cond is not None):
        return None
    if disrupted:
        return restart(o, "Disrupted", disrupted[0].describe(), spend=False)
    ordinary = [f for f in o.failures if not f.disrupted]
    cause = ordinary[0].describe() if ordinary else (job_cond or {}).get("message") or "the worker Job failed"
    return restart(o, "PodFailed", cause, spend=True)


def hung(o: Observed) -> Optional[Decision]:
    """The watchdog: a Running job whose progress has not moved for ``hang_after`` restarts."""
    last = o.last_progress()
    if o.hang_after is None or o.phase != RUNNING or not o.all_running or last is None:
        return None
    quiet = (o.now - last).total_seconds()
    if quiet < o.hang_after:
        return None
    cause = (f"no progress reported for {quiet:.0f}s (the operator's hang limit is {o.hang_after:.0f}s): "
             "the trainer looks hung")
    decision = restart(o, "Hung", cause, spend=True)
    return dataclasses.replace(decision, events=(Event("Warning", "Hung", cause),))


def restart(o: Observed, reason: str, cause: str, spend: bool) -> Decision:
    """A new attempt (held until the old pods are gone), or Failed when the budget is spent."""
    limit = int(o.sched["maxRestarts"])
    if spend and o.restarts >= limit:
        return _failed(o, "RestartLimitExceeded",
                       f"{cause} (restart budget spent: {o.restarts} of spec.scheduling.maxRestarts={limit})",
                       stop=reason == "Hung")
    restarts = o.restarts + 1 if spend else o.restarts
    budget = f"restart {restarts} of {limit}" if spend else "does not count against maxRestarts"
    return Decision(
        phase=RESTARTING, reason=reason, restarts=restarts, delete_jobs=_all_live(o),
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
    waiting = [_name(j) for j in o.jobs if j is not o.current and _deletion_age(j, o.now) < TERMINATION_WAIT_SECONDS]
    waiting += [_name(p) for p in o.older_pods if _deletion_age(p, o.now) < TERMINATION_WAIT_SECONDS]
    if not waiting:
        return dataclasses.replace(progress(o), release=_name(o.current))
    ages = [_deletion_age(x, o.now) for x in (*o.jobs, *o.older_pods) if _deleting(x) and x is not o.current]
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
    Job Kueue holds is never unsuspended by the operator (no fight over suspend)."""
    if not o.queued or job_queue(o.current) == o.queue:
        return None
    where = f"to LocalQueue {o.queue}" if o.queue else "out of Kueue"
    return Decision(phase=o.pending_phase(), delete_jobs=_all_live(o),
                    create=Create(o.next_attempt, o.restarts, "QueueChanged", hold=True),
                    message=f"spec.scheduling.queueName changed: moving the job {where}")


def queued(o: Observed) -> Optional[Decision]:
    """Kueue holds the attempt (suspended) until it admits it, or again after preempting it.
    A re-queued attempt starts the deadline's count again, as a suspend does."""
    if not o.queued:
        return None
    why = kueue.queueing(o.workload, job_queue(o.current))
    return Decision(phase=o.pending_phase(), start_time=None, message=truncate(
        f"Queued by Kueue in LocalQueue {job_queue(o.current)} ({why.reason}): {why.message}"))


def progress(o: Observed) -> Decision:
    """The current attempt is alive: Running once every node runs."""
    job_status = (o.current or {}).get("status") or {}
    start = o.status.get("startTime") or job_status.get("startTime") or (fmt_time(o.now) if o.pods else None)
    running = [p for p in o.pods if _running(p)]
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


#: How soon to look again while the current Job has fewer pods than nodes (quota, admission).
POD_CREATE_RECHECK_SECONDS = 15.0

RULES: tuple[Rule, ...] = (
    deleted, terminal, suspended, resumed, first_creation, succeeded, deadline_exceeded,
    permanent_error, gang_restart, hung, missing_job, held_attempt, queue_changed, queued, progress,
)


# --- from a decision to a plan --------------------------------------------------------------
def decide(tj: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
           now: dt.datetime, **extra: Any) -> Plan:
    return decide_observed(observe(tj, jobs, pods, now, **extra))


def decide_observed(o: Observed) -> Plan:
    decision = next(d for d in (rule(o) for rule in RULES) if d is not None)
    return plan(o, decision)


#: The condition that is True in each phase (Pending has none).
PHASE_CONDITION = {RUNNING: "Running", RESTARTING: "Restarting", SUSPENDED: "Suspended",
                   SUCCEEDED: "Succeeded", FAILED: "Failed"}


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
        job = _name(o.current) if o.current is not None and not d.create else render.job_name(
            o.name, d.create.attempt if d.create else o.next_attempt, o.nodes)
        conds.set("Created", True, "ChildrenCreated", f"created the worker Job {job} for {o.nodes} node(s)")
    return conds.as_list()


def plan(o: Observed, d: Decision) -> Plan:
    """The decision as status fields, actions and the events of the conditions that flipped."""
    st = {k: o.status.get(k) for k in OWNED_FIELDS}
    for key, value in (("message", d.message), ("startTime", d.start_time), ("completionTime", d.completion_time)):
        if value is not _KEEP:
            st[key] = value
    st.update(phase=d.phase, observedGeneration=o.generation, conditions=conditions(o, d, st.get("message") or ""),
              restarts=o.restarts if d.restarts is None else d.restarts)
    create = d.create
    if create is not None:
        left = deadline_left(o, st.get("startTime"))
        create = dataclasses.replace(create, active_deadline_seconds=max(1, math.ceil(left)) if left else None)
    stale = tuple(_name(j) for j in o.live if j is not o.current)
    active = d.phase not in TERMINAL and not o.deleting
    return Plan(
        status=st, create=create, delete_jobs=list(stale if d.delete_jobs is None else d.delete_jobs),
        cleanup=d.cleanup, release=d.release, release_queue=o.queue if d.release else None,
        repair=tuple(k for k in BASE_KINDS if k in o.missing_children) if active and create is None else (),
        requeue_after=_wake_up(o, d, st),
        events=[*_transition_events(o.status.get("conditions") or [], st["conditions"]), *d.events])


#: The base children (everything but the worker Jobs), in the order they are created.
BASE_KINDS = ("ServiceAccount", "Role", "RoleBinding", "Service", "ConfigMap")


def _wake_up(o: Observed, d: Decision, st: Mapping[str, Any]) -> Optional[float]:
    """When a time-based rule (deadline, hang watchdog, waits) must look again, if sooner
    than any event: an explicit wake-up instead of polling."""
    if d.phase in TERMINAL or d.phase == SUSPENDED or o.deleting:
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
    """The status patch that says why the children could not be created (the rest unchanged)."""
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
