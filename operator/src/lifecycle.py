"""A TrainJob's lifecycle: what the operator observed -> the new status and the actions. Pure.

``decide(tj, jobs, pods, now)`` first builds one frozen snapshot, :class:`Observed`, from

- the TrainJob (spec, current status, generation),
- every worker Job of the TrainJob (all attempts, including ones being deleted),
- every pod of the TrainJob,

then tries the rules of :data:`RULES` in order; the first that applies returns a
:class:`Decision` (phase, condition changes, children to create, Jobs to delete, ...), and
:func:`plan` turns it into a :class:`Plan`: the operator-owned status fields and the events.

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
from typing import Any, Callable, Iterable, Mapping, Optional

from kontrast import contract

from . import render

PENDING, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED = (
    "Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
TERMINAL = frozenset({SUCCEEDED, FAILED})
CONDITION_TYPES = ("Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
#: Status fields the operator owns; the trainer owns progress, checkpoints, metrics, resolved.
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

    def clear(self, ctype: str, reason: str, message: str = "") -> None:
        """Set False only if the condition exists (conditions appear when they first matter)."""
        if ctype in self._by_type:
            self.set(ctype, False, reason, message)

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
    next_attempt: int
    restarts: int  # budget spent: the larger of status.restarts and the newest Job's record
    pods: tuple[Mapping[str, Any], ...]  # the pods of the current attempt
    failures: tuple[PodFailure, ...]  # how pods of the current attempt failed

    @property
    def phase(self) -> Optional[str]:
        return self.status.get("phase")

    @property
    def live(self) -> tuple[Mapping[str, Any], ...]:
        """Jobs not being deleted."""
        return tuple(j for j in self.jobs if not _deleting(j))

    @property
    def queue(self) -> Optional[str]:
        return self.sched.get("queueName")

    @property
    def hold(self) -> bool:
        """Whether a new attempt must start held: older attempts still exist (no Kueue)."""
        return bool(self.jobs) and not self.queue

    @property
    def current_suspended(self) -> bool:
        return self.current is not None and bool((self.current.get("spec") or {}).get("suspend"))

    def condition_true(self, ctype: str) -> bool:
        return any(c.get("type") == ctype and c.get("status") == "True"
                   for c in self.status.get("conditions") or [])

    def cleanup_wanted(self, succeeded: bool) -> bool:
        return self.sched["cleanup"] == "Always" or (self.sched["cleanup"] == "OnSuccess" and succeeded)

    def waiting_message(self) -> str:
        if self.queue:
            return f"Waiting for Kueue to admit the worker Job (LocalQueue {self.queue})"
        return f"Waiting for {self.nodes} node(s) to start"

    def pending_phase(self) -> str:
        """The phase while an attempt is not (yet) running: Restarting during a restart."""
        return RESTARTING if self.condition_true("Restarting") else PENDING


def _spent(job: Optional[Mapping[str, Any]]) -> int:
    if job is None:
        return 0
    try:
        return int(((job.get("metadata") or {}).get("annotations") or {}).get(render.ANNOTATION_RESTARTS, 0))
    except ValueError:
        return 0


def observe(tj: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
            now: dt.datetime) -> Observed:
    meta, spec = tj["metadata"], tj.get("spec") or {}
    status = dict(tj.get("status") or {})
    jobs = tuple(sorted(jobs, key=attempt_of))
    latest = jobs[-1] if jobs else None
    current = latest if latest is not None and not _deleting(latest) else None
    attempt_pods = tuple(p for p in pods if current is not None and attempt_of(p) == attempt_of(current))
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
        next_attempt=attempt_of(latest) + 1 if latest is not None else 0,
        restarts=max(int(status.get("restarts") or 0), _spent(latest)),
        pods=attempt_pods,
        failures=tuple(f for f in (pod_failure(p) for p in attempt_pods) if f is not None),
    )


# --- what a rule decides ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Create:
    """Create the children of one attempt (idempotent: existing ones are kept).

    ``hold``: create the worker Job suspended, because older attempts still exist; a later
    reconcile releases it (``Plan.release``) once their pods are gone.
    """
    attempt: int
    restarts: int
    reason: str
    hold: bool = False


#: (type, True/False, reason, message): set a condition. False with ``clear=True`` (see
#: :meth:`Conditions.clear`) only touches a condition that already exists.
@dataclasses.dataclass(frozen=True)
class Cond:
    type: str
    status: bool
    reason: str
    message: str = ""
    clear: bool = False


def clear(ctype: str, reason: str, message: str = "") -> Cond:
    return Cond(ctype, False, reason, message, clear=True)


_KEEP: Any = object()  # a status field the decision leaves as it was


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one rule decided. Fields left at their default change nothing."""

    phase: str
    message: Any = _KEEP
    conditions: tuple[Cond, ...] = ()
    start_time: Any = _KEEP
    completion_time: Any = _KEEP
    restarts: Optional[int] = None
    create: Optional[Create] = None
    delete_jobs: Optional[tuple[str, ...]] = None  # None: the stale attempts (live, not current)
    cleanup: bool = False  # delete every child but the TrainJob (after completion)
    release: Optional[str] = None  # unsuspend this held worker Job
    requeue_after: Optional[float] = None  # reconcile again after this many seconds


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass
class Plan:
    status: dict[str, Any]
    create: Optional[Create] = None
    delete_jobs: list[str] = dataclasses.field(default_factory=list)
    cleanup: bool = False  # delete every child but the TrainJob (after completion)
    events: list[Event] = dataclasses.field(default_factory=list)
    release: Optional[str] = None  # unsuspend this held worker Job
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
        phase=SUSPENDED, delete_jobs=_all_live(o),
        message="Suspended: set spec.scheduling.suspend to false to resume from the newest checkpoint",
        conditions=(Cond("Suspended", True, "Suspended",
                         "spec.scheduling.suspend is true: the training pods are stopped; checkpoints are kept"),
                    clear("Running", "Suspended", "training is suspended"),
                    clear("Restarting", "Suspended", "training is suspended")))


def resumed(o: Observed) -> Optional[Decision]:
    """Resume: a fresh attempt from the newest checkpoint; the deadline counts from the new start."""
    if o.phase != SUSPENDED and not o.condition_true("Suspended"):
        return None
    return Decision(
        phase=PENDING, delete_jobs=_all_live(o),
        create=Create(o.next_attempt, o.restarts, "Resumed", hold=o.hold),
        conditions=(Cond("Suspended", False, "Resumed",
                         "spec.scheduling.suspend is false: resuming from the newest checkpoint"),),
        start_time=None, completion_time=None, message=o.waiting_message())


def first_creation(o: Observed) -> Optional[Decision]:
    """First reconcile: create everything."""
    if o.jobs or o.condition_true("Created") or o.phase not in (None, PENDING):
        return None
    return Decision(
        phase=PENDING, create=Create(0, o.restarts, "Created"), message=o.waiting_message(),
        conditions=(Cond("Created", True, "ChildrenCreated",
                         f"created the worker Job {render.job_name(o.name, 0, o.nodes)} for {o.nodes} node(s)"),))


def succeeded(o: Observed) -> Optional[Decision]:
    if o.current is None or not _true(o.current, "Complete"):
        return None
    job_status = o.current.get("status") or {}
    cleans = o.cleanup_wanted(True)
    return Decision(
        phase=SUCCEEDED, message="Training completed",
        completion_time=job_status.get("completionTime") or fmt_time(o.now),
        start_time=o.status.get("startTime") or job_status.get("startTime"),
        conditions=(Cond("Succeeded", True, "Completed", "all nodes finished training"),
                    clear("Running", "Completed", "training finished"),
                    clear("Restarting", "Completed", "training finished")),
        cleanup=cleans, delete_jobs=_all_live(o) if cleans else None)


def _failed(o: Observed, reason: str, message: str, stop: bool) -> Decision:
    """Failed for good: the pods are kept for debugging unless cleanup or ``stop`` says not."""
    cleans = o.cleanup_wanted(False)
    return Decision(
        phase=FAILED, message=truncate(message), completion_time=fmt_time(o.now),
        conditions=(Cond("Failed", True, reason, message),
                    clear("Running", reason, "training failed"),
                    clear("Restarting", reason, "training failed")),
        cleanup=cleans, delete_jobs=_all_live(o) if cleans or stop else None)


def deadline_exceeded(o: Observed) -> Optional[Decision]:
    """Active deadline, counted from the start (a resume starts the count again)."""
    deadline = o.sched.get("activeDeadlineSeconds")
    start = parse_time(o.status.get("startTime"))
    if not deadline or start is None or (o.now - start).total_seconds() < float(deadline):
        return None
    return _failed(o, "DeadlineExceeded",
                   f"the job ran longer than spec.scheduling.activeDeadlineSeconds ({deadline}s)", stop=True)


def _job_failed(o: Observed) -> Optional[Mapping[str, Any]]:
    """The current Job's Failed condition, if it failed."""
    return _cond(o.current, "Failed") if o.current is not None and _true(o.current, "Failed") else None


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
        reason, spend, cause = "Disrupted", False, disrupted[0].describe()
    else:
        ordinary = [f for f in o.failures if not f.disrupted]
        reason, spend = "PodFailed", True
        cause = ordinary[0].describe() if ordinary else (job_cond or {}).get("message") or "the worker Job failed"
    return restart(o, reason, cause, spend)


def restart(o: Observed, reason: str, cause: str, spend: bool) -> Decision:
    """A new attempt (held until the old pods are gone), or Failed when the budget is spent."""
    limit = int(o.sched["maxRestarts"])
    if spend and o.restarts >= limit:
        return _failed(o, "RestartLimitExceeded",
                       f"{cause} (restart budget spent: {o.restarts} of spec.scheduling.maxRestarts={limit})",
                       stop=False)
    restarts = o.restarts + 1 if spend else o.restarts
    budget = f"restart {restarts} of {limit}" if spend else "does not count against maxRestarts"
    return Decision(
        phase=RESTARTING, restarts=restarts, delete_jobs=_all_live(o),
        create=Create(o.next_attempt, restarts, reason, hold=o.hold),
        message=truncate(f"Restarting: {cause}"),
        conditions=(Cond("Restarting", True, reason,
                         f"{cause}; restarting all nodes from the newest checkpoint ({budget})"),
                    clear("Running", reason, "restarting")))


def missing_job(o: Observed) -> Optional[Decision]:
    """No worker Job although one should run (deleted by hand, or a crash between steps)."""
    if o.current is not None:
        return None
    return Decision(
        phase=o.pending_phase(), create=Create(o.next_attempt, o.restarts, "Recreated", hold=o.hold),
        message="the worker Job was missing: recreated it (resumes from the newest checkpoint)",
        conditions=(Cond("Created", True, "ChildrenCreated",
                         f"created the worker Job {render.job_name(o.name, o.next_attempt, o.nodes)}"),))


def held_attempt(o: Observed) -> Optional[Decision]:
    """A held attempt: released once the older attempts' pods are gone (or waited for long enough)."""
    if not o.current_suspended or o.queue:
        return None
    older = [j for j in o.jobs if j is not o.current]
    waiting = [j for j in older if not _deleting(j) or _deletion_age(j, o.now) < TERMINATION_WAIT_SECONDS]
    if not waiting:
        return dataclasses.replace(progress(o), release=_name(o.current))
    ages = [_deletion_age(j, o.now) for j in waiting if _deleting(j)]
    return Decision(
        phase=o.pending_phase(),
        message=f"waiting for the pods of {', '.join(_name(j) for j in waiting)} to stop",
        requeue_after=max(1.0, TERMINATION_WAIT_SECONDS - min(ages)) if ages else None)


def _deletion_age(job: Mapping[str, Any], now: dt.datetime) -> float:
    return (now - parse_time(job["metadata"]["deletionTimestamp"])).total_seconds()


def queued(o: Observed) -> Optional[Decision]:
    """Kueue holds the attempt (suspended) until it admits it."""
    if not o.current_suspended:
        return None
    return Decision(phase=o.pending_phase(), message=o.waiting_message(),
                    conditions=(clear("Running", "Queued", "waiting for admission"),))


def progress(o: Observed) -> Decision:
    """The current attempt is alive: Running once every node runs."""
    job_status = (o.current or {}).get("status") or {}
    start = o.status.get("startTime") or job_status.get("startTime") or (fmt_time(o.now) if o.pods else None)
    running = [p for p in o.pods if _running(p)]
    if len(running) >= o.nodes:
        conds = (Cond("Running", True, "PodsRunning", f"all {o.nodes} node(s) are running"),)
        if o.condition_true("Restarting"):
            conds = (Cond("Restarting", False, "Restarted",
                          f"all {o.nodes} node(s) are running again (attempt {attempt_of(o.current)})"), *conds)
        return Decision(phase=RUNNING, start_time=start, message=f"Training on {o.nodes} node(s)", conditions=conds)
    stuck = [w for w in (pod_waiting(p) for p in o.pods) if w]
    message = truncate(f"{len(running)} of {o.nodes} node(s) running" + (f"; {'; '.join(stuck)}" if stuck else ""))
    # While Running, a replacement pod may be starting; the gang restarts if training breaks.
    phase = RESTARTING if o.condition_true("Restarting") else RUNNING if o.condition_true("Running") else PENDING
    return Decision(phase=phase, start_time=start, message=message)


RULES: tuple[Rule, ...] = (
    deleted, terminal, suspended, resumed, first_creation, succeeded, deadline_exceeded,
    permanent_error, gang_restart, missing_job, held_attempt, queued, progress,
)


# --- from a decision to a plan --------------------------------------------------------------
def decide(tj: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
           now: dt.datetime) -> Plan:
    o = observe(tj, jobs, pods, now)
    decision = next(d for d in (rule(o) for rule in RULES) if d is not None)
    return plan(o, decision)


def plan(o: Observed, d: Decision) -> Plan:
    """The decision as status fields, actions and the events of the conditions that flipped."""
    conds = Conditions(o.status.get("conditions") or [], o.now, o.generation)
    for c in d.conditions:
        if c.clear:
            conds.clear(c.type, c.reason, c.message)
        else:
            conds.set(c.type, c.status, c.reason, c.message)
    st = {k: o.status.get(k) for k in OWNED_FIELDS}
    st.update(phase=d.phase, observedGeneration=o.generation, conditions=conds.as_list(),
              restarts=o.restarts if d.restarts is None else d.restarts)
    for key, value in (("message", d.message), ("startTime", d.start_time), ("completionTime", d.completion_time)):
        if value is not _KEEP:
            st[key] = value
    stale = tuple(_name(j) for j in o.live if j is not o.current)
    return Plan(
        status=st, create=d.create, delete_jobs=list(stale if d.delete_jobs is None else d.delete_jobs),
        cleanup=d.cleanup, release=d.release, requeue_after=d.requeue_after,
        events=_transition_events(o.status.get("conditions") or [], st["conditions"]))


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
    ("Running", "True"): ("Normal", "Running"),
    ("Restarting", "True"): ("Warning", "Restarting"),
    ("Succeeded", "True"): ("Normal", "Succeeded"),
    ("Failed", "True"): ("Warning", "Failed"),
    ("Suspended", "True"): ("Normal", "Suspended"),
    ("Suspended", "False"): ("Normal", "Resumed"),
}


def _transition_events(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]) -> list[Event]:
    """An event for each condition that flipped (or changed reason, e.g. a second restart)."""
    before = {c["type"]: c for c in old}
    out = []
    for c in new:
        key = (c["type"], c["status"])
        prev = before.get(c["type"])
        changed = prev is None or prev.get("status") != c["status"] or (
            c["status"] == "True" and c["type"] == "Restarting" and prev.get("message") != c.get("message"))
        if key in _EVENTS and changed:
            if key == ("Suspended", "False") and prev is None:
                continue
            etype, reason = _EVENTS[key]
            out.append(Event(etype, reason, c.get("message") or c.get("reason", "")))
    return out


def is_active(tj: Mapping[str, Any]) -> bool:
    """Whether a TrainJob's pods may be running (the deadline timer watches only these)."""
    phase = (tj.get("status") or {}).get("phase")
    return phase not in TERMINAL and phase != SUSPENDED
