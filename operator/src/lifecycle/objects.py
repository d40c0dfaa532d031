"""What the lifecycle reads from any observed object's metadata: name, attempt, owner, deletion."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..children import names


def name_of(obj: Mapping[str, Any]) -> str:
    return obj["metadata"]["name"]


def deleting(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def attempt_of(obj: Mapping[str, Any]) -> int:
    """The attempt a worker Job or pod belongs to (-1 when it carries none)."""
    try:
        return int(((obj.get("metadata") or {}).get("labels") or {}).get(names.LABEL_ATTEMPT, -1))
    except ValueError:
        return -1


def controller_uid(obj: Mapping[str, Any]) -> Optional[str]:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def job_queue(job: Mapping[str, Any]) -> Optional[str]:
    """The Kueue LocalQueue a worker Job was handed to (its own label, not today's spec)."""
    return ((job.get("metadata") or {}).get("labels") or {}).get(names.KUEUE_QUEUE_LABEL)


def bound_queue(job: Mapping[str, Any]) -> Optional[str]:
    """The LocalQueue a Job is in, or for a parked one, the one it goes to once released."""
    label = job_queue(job)
    return _annotations(job).get(names.ANNOTATION_PARKED_FOR) if label == names.PARKING_QUEUE else label


def requested_queue(job: Mapping[str, Any]) -> Optional[str]:
    """The LocalQueue the TrainJob named when this Job was created (None for none), whatever
    label Kueue gave it since. A Job of an operator that did not record it: its label."""
    asked = _annotations(job).get(names.ANNOTATION_QUEUE)
    return job_queue(job) if asked is None else asked or None


def job_suspended(job: Optional[Mapping[str, Any]]) -> bool:
    return job is not None and bool((job.get("spec") or {}).get("suspend"))


def job_held(job: Optional[Mapping[str, Any]]) -> bool:
    """The operator holds this Job: suspended, and marked held by the operator. (A Job of an
    operator that did not mark it: held when it carries no queue label.)"""
    if not job_suspended(job):
        return False
    marked = _annotations(job).get(names.ANNOTATION_HOLD)
    return not job_queue(job) if marked is None else marked == "true"


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def restarts_spent(job: Optional[Mapping[str, Any]]) -> int:
    """The restart budget spent when a worker Job was created (its own annotation)."""
    if job is None:
        return 0
    try:
        return int(_annotations(job).get(names.ANNOTATION_RESTARTS, 0))
    except ValueError:
        return 0
