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


def job_suspended(job: Optional[Mapping[str, Any]]) -> bool:
    return job is not None and bool((job.get("spec") or {}).get("suspend"))


def restarts_spent(job: Optional[Mapping[str, Any]]) -> int:
    """The restart budget spent when a worker Job was created (its own annotation)."""
    if job is None:
        return 0
    try:
        return int(((job.get("metadata") or {}).get("annotations") or {}).get(names.ANNOTATION_RESTARTS, 0))
    except ValueError:
        return 0
