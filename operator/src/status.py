"""Observed children + current status -> new status and the actions to take. Pure.

``decide(tj, jobs, pods, now)`` is the whole control loop's brain. It reads:

- the TrainJob (spec, current status, generation),
- every worker Job of the TrainJob (all attempts, including ones being deleted),
- every pod of the TrainJob,

and returns a :class:`Plan`: the operator-owned status fields (phase, observedGeneration,
conditions, startTime, completionTime, restarts, message), the children to create, the Jobs
to delete, whether to clean up after completion, and the events to post.

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
from typing import Any, Iterable, Mapping, Optional

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


def _truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
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
            "message": _truncate(message),
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
        reason=reason, message=_truncate(message), disrupted=disrupted,
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


# --- the plan -----------------------------------------------------------------------------
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
        patch: dict[str, Any] = {}
        for key in OWNED_FIELDS:
            new = self.status.get(key)
            if new != current.get(key):
                patch[key] = new
        return patch


# --- the decision -------------------------------------------------------------------------
def decide(tj: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
           now: dt.datetime) -> Plan:
    meta, spec = tj["metadata"], tj.get("spec") or {}
    old = dict(tj.get("status") or {})
    sched = render.scheduling(spec)
    nodes = int(spec.get("nodes", 1))
    generation = meta.get("generation")
    jobs = sorted(jobs, key=attempt_of)
    pods = list(pods)
    conds = Conditions(old.get("conditions") or [], now, generation)

    latest = jobs[-1] if jobs else None
    current = latest if latest is not None and not _deleting(latest) else None
    next_attempt = attempt_of(latest) + 1 if latest is not None else 0
    live = [j for j in jobs if not _deleting(j)]
    queue = sched.get("queueName")
    hold = bool(jobs) and not queue  # older attempts exist: start the new one held
    stale = [_name(j) for j in live if j is not current]
    restarts = int(old.get("restarts") or 0)
    if latest is not None:
        try:
            restarts = max(restarts, int(latest["metadata"].get("annotations", {}).get(render.ANNOTATION_RESTARTS, 0)))
        except ValueError:
            pass

    st: dict[str, Any] = {k: old.get(k) for k in OWNED_FIELDS}
    st["observedGeneration"] = generation
    st["restarts"] = restarts
    plan = Plan(status=st, delete_jobs=list(stale))
    phase_before = old.get("phase")

    def finish(phase: str) -> Plan:
        st["phase"] = phase
        st["conditions"] = conds.as_list()
        plan.events.extend(_transition_events(old.get("conditions") or [], st["conditions"]))
        return plan

    def cleanup_wanted(succeeded: bool) -> bool:
        return sched["cleanup"] == "Always" or (sched["cleanup"] == "OnSuccess" and succeeded)

    # Deleted: garbage collection removes the children; nothing to do.
    if meta.get("deletionTimestamp"):
        plan.delete_jobs = []
        return finish(phase_before or PENDING)

    # Terminal phases are sticky. Finish any cleanup a crash interrupted.
    if phase_before in TERMINAL:
        if live and cleanup_wanted(phase_before == SUCCEEDED):
            plan.cleanup = True
            plan.delete_jobs = [_name(j) for j in live]
        return finish(phase_before)

    # Suspend: stop the pods (delete the attempt), keep the checkpoints and the budget.
    if sched["suspend"]:
        plan.delete_jobs = [_name(j) for j in live]
        conds.set("Suspended", True, "Suspended",
                  "spec.scheduling.suspend is true: the training pods are stopped; checkpoints are kept")
        conds.clear("Running", "Suspended", "training is suspended")
        conds.clear("Restarting", "Suspended", "training is suspended")
        st["message"] = "Suspended: set spec.scheduling.suspend to false to resume from the newest checkpoint"
        return finish(SUSPENDED)

    if phase_before == SUSPENDED or conds.is_true("Suspended"):
        # Resume: a fresh attempt that resumes from the newest checkpoint. The active deadline
        # counts from the new start.
        plan.delete_jobs = [_name(j) for j in live]
        plan.create = Create(next_attempt, restarts, "Resumed", hold=hold)
        conds.set("Suspended", False, "Resumed", "spec.scheduling.suspend is false: resuming from the newest checkpoint")
        st["startTime"] = None
        st["completionTime"] = None
        st["message"] = _waiting_message(sched, nodes)
        return finish(PENDING)

    # First reconcile: create everything.
    if latest is None and not conds.is_true("Created") and phase_before in (None, PENDING):
        plan.create = Create(0, restarts, "Created")
        conds.set("Created", True, "ChildrenCreated",
                  f"created the worker Job {render.job_name(meta['name'], 0, nodes)} for {nodes} node(s)")
        st["message"] = _waiting_message(sched, nodes)
        return finish(PENDING)

    attempt_pods = [p for p in pods if current is not None and attempt_of(p) == attempt_of(current)]
    failures = [f for f in (pod_failure(p) for p in attempt_pods) if f is not None]

    # Success.
    if current is not None and _true(current, "Complete"):
        st["completionTime"] = (current.get("status") or {}).get("completionTime") or fmt_time(now)
        st["startTime"] = st.get("startTime") or (current.get("status") or {}).get("startTime")
        conds.set("Succeeded", True, "Completed", "all nodes finished training")
        conds.clear("Running", "Completed", "training finished")
        conds.clear("Restarting", "Completed", "training finished")
        st["message"] = "Training completed"
        if cleanup_wanted(True):
            plan.cleanup = True
            plan.delete_jobs = [_name(j) for j in live]
        return finish(SUCCEEDED)

    def fail(reason: str, message: str, stop: bool) -> Plan:
        conds.set("Failed", True, reason, message)
        conds.clear("Running", reason, "training failed")
        conds.clear("Restarting", reason, "training failed")
        st["completionTime"] = fmt_time(now)
        st["message"] = _truncate(message)
        if cleanup_wanted(False):
            plan.cleanup = True
            plan.delete_jobs = [_name(j) for j in live]
        elif stop:
            plan.delete_jobs = [_name(j) for j in live]
        return finish(FAILED)

    # Active deadline, counted from the start (a resume starts the count again).
    deadline = sched.get("activeDeadlineSeconds")
    start = parse_time(st.get("startTime"))
    if deadline and start is not None and (now - start).total_seconds() >= float(deadline):
        return fail("DeadlineExceeded", f"the job ran longer than spec.scheduling.activeDeadlineSeconds ({deadline}s)",
                    stop=True)

    # Failures of the current attempt.
    job_failed = current is not None and _true(current, "Failed")
    disrupted = [f for f in failures if f.disrupted]
    permanent = [f for f in failures if f.permanent]
    job_cond = _cond(current, "Failed") if current is not None else None
    if job_failed and (permanent or (job_cond or {}).get("reason") == "PodFailurePolicy"):
        first = permanent[0] if permanent else None
        message = (first.message or first.describe()) if first else (job_cond or {}).get("message", "")
        return fail("PermanentError", message or "the trainer exited with a permanent error", stop=False)
    suspended = current is not None and bool((current.get("spec") or {}).get("suspend"))
    if current is not None and not suspended and (disrupted or job_failed):
        if disrupted:
            reason, spend = "Disrupted", False
            cause = disrupted[0].describe()
        else:
            reason, spend = "PodFailed", True
            ordinary = [f for f in failures if not f.disrupted]
            cause = ordinary[0].describe() if ordinary else (job_cond or {}).get("message") or "the worker Job failed"
        if spend and restarts >= int(sched["maxRestarts"]):
            return fail("RestartLimitExceeded",
                        f"{cause} (restart budget spent: {restarts} of spec.scheduling.maxRestarts="
                        f"{sched['maxRestarts']})", stop=False)
        if spend:
            restarts += 1
            st["restarts"] = restarts
            budget = f"restart {restarts} of {sched['maxRestarts']}"
        else:
            budget = "does not count against maxRestarts"
        plan.create = Create(next_attempt, restarts, reason, hold=hold)
        plan.delete_jobs = [_name(j) for j in live]
        conds.set("Restarting", True, reason, f"{cause}; restarting all nodes from the newest checkpoint ({budget})")
        conds.clear("Running", reason, "restarting")
        st["message"] = _truncate(f"Restarting: {cause}")
        return finish(RESTARTING)

    # No worker Job although one should run (deleted by hand, or a crash between steps).
    if current is None:
        plan.create = Create(next_attempt, restarts, "Recreated", hold=hold)
        conds.set("Created", True, "ChildrenCreated",
                  f"created the worker Job {render.job_name(meta['name'], next_attempt, nodes)}")
        st["message"] = "the worker Job was missing: recreated it (resumes from the newest checkpoint)"
        return finish(RESTARTING if conds.is_true("Restarting") else PENDING)

    # The current attempt is alive.
    job_status = current.get("status") or {}
    if suspended and not queue:
        # A held attempt: release it once the older attempts' pods are gone.
        older = [j for j in jobs if j is not current]
        waiting = [j for j in older if not _deleting(j)
                   or (now - parse_time(j["metadata"]["deletionTimestamp"])).total_seconds() < TERMINATION_WAIT_SECONDS]
        if not waiting:
            plan.release = _name(current)
        else:
            started = [parse_time(j["metadata"]["deletionTimestamp"]) for j in waiting if _deleting(j)]
            if started:
                plan.requeue_after = max(1.0, TERMINATION_WAIT_SECONDS - min((now - t).total_seconds() for t in started))
            st["message"] = f"waiting for the pods of {', '.join(_name(j) for j in waiting)} to stop"
            return finish(RESTARTING if conds.is_true("Restarting") else PENDING)
    elif suspended:
        conds.clear("Running", "Queued", "waiting for admission")
        st["message"] = _waiting_message(sched, nodes)
        return finish(RESTARTING if conds.is_true("Restarting") else PENDING)
    if not st.get("startTime") and (job_status.get("startTime") or attempt_pods):
        st["startTime"] = job_status.get("startTime") or fmt_time(now)
    running = [p for p in attempt_pods if (p.get("status") or {}).get("phase") == "Running" and not _deleting(p)]
    if len(running) >= nodes:
        if conds.is_true("Restarting"):
            conds.set("Restarting", False, "Restarted", f"all {nodes} node(s) are running again (attempt {attempt_of(current)})")
        conds.set("Running", True, "PodsRunning", f"all {nodes} node(s) are running")
        st["message"] = f"Training on {nodes} node(s)"
        return finish(RUNNING)
    stuck = [w for w in (pod_waiting(p) for p in attempt_pods) if w]
    started = len(running)
    st["message"] = _truncate(
        f"{started} of {nodes} node(s) running" + (f"; {'; '.join(stuck)}" if stuck else ""))
    if conds.is_true("Restarting"):
        return finish(RESTARTING)
    if conds.is_true("Running"):
        return finish(RUNNING)  # a replacement pod is starting; the gang restarts if training breaks
    return finish(PENDING)


def _waiting_message(sched: Mapping[str, Any], nodes: int) -> str:
    if sched.get("queueName"):
        return f"Waiting for Kueue to admit the worker Job (LocalQueue {sched['queueName']})"
    return f"Waiting for {nodes} node(s) to start"


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
