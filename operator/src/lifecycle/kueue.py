"""What Kueue says about a worker Job, read from the Job's Workload. Pure.

Kueue (batch/job integration) admits the worker Job, never the TrainJob: it creates a
Workload owned by the Job (one pod set of `nodes` pods, each with the trainer's requests),
unsuspends the Job when the Workload is admitted and suspends it again when the Workload is
preempted or evicted. The operator only reads the Workload, to say in the TrainJob's status
why it waits; it never writes `suspend` of a Job that carries Kueue's queue label.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional

from .phases import condition, condition_true

#: On every Workload Kueue makes for a Job: the Job's uid.
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
GROUP, VERSION, PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"


@dataclasses.dataclass(frozen=True)
class Queueing:
    """Why Kueue holds a Job: the Workload's reason and message (reason Pending while no
    Workload exists yet)."""

    reason: str
    message: str


def workload_of(job: Mapping[str, Any], workloads: Iterable[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
    """The Workload Kueue made for this Job (the one the Job controls)."""
    uid = job["metadata"].get("uid")
    for wl in workloads:
        for ref in (wl.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("kind") == "Job" and ref.get("uid") == uid:
                return wl
    return None


def evicted(workload: Optional[Mapping[str, Any]]) -> bool:
    """Kueue evicted the Workload (preempted it, or another eviction): it stops the Job's pods."""
    return workload is not None and condition_true(workload.get("status"), "Evicted")


def queueing(workload: Optional[Mapping[str, Any]], queue: Optional[str]) -> Queueing:
    """Why the Job waits: eviction (Preempted, ...) first, then the quota reservation's reason."""
    where = f" (LocalQueue {queue})" if queue else ""
    if workload is None:
        return Queueing("Pending", f"waiting for Kueue to create the Workload{where}")
    status = workload.get("status")
    evicted = condition(status, "Evicted")
    if condition_true(status, "Evicted"):
        return Queueing(evicted.get("reason") or "Evicted", evicted.get("message") or "evicted by Kueue")
    reserved = condition(status, "QuotaReserved")
    if reserved and reserved.get("status") == "False":
        return Queueing(reserved.get("reason") or "Pending", reserved.get("message") or "")
    if condition_true(status, "QuotaReserved") and not condition_true(status, "Admitted"):
        return Queueing("QuotaReserved", "quota reserved; waiting for admission checks")
    return Queueing("Pending", f"waiting for Kueue to admit the Workload{where}")
