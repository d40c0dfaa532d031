"""A pod's state as the lifecycle reads it: how it failed, why it is stuck, whether it still runs."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from kontrast import contract

from ..children import names
from .objects import deleting, name_of
from .phases import condition, condition_true, truncate


@dataclasses.dataclass(frozen=True)
class PodFailure:
    pod: str
    index: Optional[int]
    exit_code: Optional[int]
    reason: str
    message: str
    disrupted: bool
    memory_limit: Optional[str] = None  # the trainer container's, as the pod spec gives it

    @property
    def oom_killed(self) -> bool:
        return not self.disrupted and self.reason == "OOMKilled"

    @property
    def permanent(self) -> bool:
        """The trainer's permanent exit code, or the kernel's OOM kill: a restart from the
        checkpoint would need the same memory again, so it would only spend the budget."""
        return self.exit_code == contract.EXIT_PERMANENT or self.oom_killed

    def describe(self) -> str:
        where = f"pod {self.pod}" + (f" (node {self.index})" if self.index is not None else "")
        if self.oom_killed:
            limit = f"its memory limit {self.memory_limit}" if self.memory_limit else "the node's memory"
            return (f"{where}: container {names.TRAINER_CONTAINER} was killed for using more than {limit} "
                    "(OOMKilled); raise spec.scheduling.resources.limits.memory, or lower batchSize or workers")
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
    raw = (meta.get("annotations") or {}).get(names.COMPLETION_INDEX_ANNOTATION) or (
        meta.get("labels") or {}).get(names.COMPLETION_INDEX_ANNOTATION)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _trainer_state(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == names.TRAINER_CONTAINER:
            return cs.get("state") or {}
    return {}


def _trainer_memory_limit(pod: Mapping[str, Any]) -> Optional[str]:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == names.TRAINER_CONTAINER:
            return ((c.get("resources") or {}).get("limits") or {}).get("memory")
    return None


def pod_failure(pod: Mapping[str, Any]) -> Optional[PodFailure]:
    """How a pod failed, or None while it has not (DisruptionTarget counts at once)."""
    status = pod.get("status") or {}
    disrupted = condition_true(status, "DisruptionTarget")
    if status.get("phase") != "Failed" and not disrupted:
        return None
    term = _trainer_state(pod).get("terminated") or {}
    if disrupted:
        disruption = condition(status, "DisruptionTarget")
        reason = disruption.get("reason") or ""
        message = disruption.get("message") or ""
    else:
        reason = term.get("reason") or status.get("reason") or ""
        message = term.get("message") or status.get("message") or ""
    return PodFailure(
        pod=name_of(pod), index=pod_index(pod), exit_code=term.get("exitCode"),
        reason=reason, message=truncate(message), disrupted=disrupted, memory_limit=_trainer_memory_limit(pod),
    )


def pod_waiting(pod: Mapping[str, Any]) -> Optional[str]:
    """A stuck pod's reason (ImagePullBackOff, CreateContainerConfigError, Unschedulable...)."""
    waiting = _trainer_state(pod).get("waiting") or {}
    reason = waiting.get("reason")
    if reason and reason not in ("ContainerCreating", "PodInitializing"):
        return f"pod {name_of(pod)}: {reason}" + (f": {waiting['message']}" if waiting.get("message") else "")
    sched = condition(pod.get("status"), "PodScheduled")
    if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        return f"pod {name_of(pod)} is unschedulable: {sched.get('message', '')}".rstrip(": ")
    return None


def pod_running(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" and not deleting(pod)


def pod_lives(pod: Mapping[str, Any]) -> bool:
    """Whether a pod's processes may still run (it holds its hostname, ports and GPUs)."""
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


#: The Ready=False reasons a kubelet gives itself; the node controller, marking the pods of a
#: node that stopped reporting, only flips the status (the reason stays Ready=True's, none).
KUBELET_UNREADY_REASONS = frozenset({"ContainersNotReady", "PodCompleted", "ReadinessGatesNotReady"})


def unready_since(pod: Mapping[str, Any]) -> Optional[str]:
    """When a Running pod was marked not Ready by the node controller (its node stopped
    reporting; it is evicted later), or None."""
    if not pod_running(pod):
        return None
    ready = condition(pod.get("status"), "Ready")
    if not ready or ready.get("status") == "True" or ready.get("reason") in KUBELET_UNREADY_REASONS:
        return None
    return ready.get("lastTransitionTime")
