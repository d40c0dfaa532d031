"""Which pod holds a TrainJob worker's log (pure).

The operator labels every training pod (operator/src/children/names.py, ``worker_labels``) with
``kontrast.dev/trainjob: <name>``, ``kontrast.dev/component: worker`` and
``kontrast.dev/attempt: <n>`` (a restart or resume creates attempt n+1); the Job controller
adds the worker's index as ``batch.kubernetes.io/job-completion-index`` (label and annotation).
A TrainJob name is at most 40 characters (the CRD's rule), so the label value is the name.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

LABEL_TRAINJOB = "kontrast.dev/trainjob"
LABEL_ATTEMPT = "kontrast.dev/attempt"
LABEL_COMPONENT = "kontrast.dev/component"
ANNOTATION_TRAINJOB = "kontrast.dev/trainjob-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
TRAINER_CONTAINER = "trainer"


def worker_selector(name: str) -> str:
    """The label selector of every worker pod of a TrainJob, all attempts."""
    return f"{LABEL_TRAINJOB}={name},{LABEL_COMPONENT}=worker"


def _meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return pod.get("metadata") or {}


def _int(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def attempt_of(pod: Mapping[str, Any]) -> Optional[int]:
    return _int((_meta(pod).get("labels") or {}).get(LABEL_ATTEMPT))


def worker_index_of(pod: Mapping[str, Any]) -> Optional[int]:
    meta = _meta(pod)
    value = (meta.get("labels") or {}).get(COMPLETION_INDEX)
    if value is None:
        value = (meta.get("annotations") or {}).get(COMPLETION_INDEX)
    return _int(value)


class NoWorkerPod(LookupError):
    """No pod holds the log asked for; the message says what there is instead."""


def select_worker_pod(pods: Iterable[Mapping[str, Any]], name: str, worker: int = 0,
                      attempt: Optional[int] = None) -> Mapping[str, Any]:
    """The pod of worker ``worker`` in the newest attempt (or ``attempt``) of TrainJob ``name``.

    Pods of another TrainJob (a label value shared by a truncated name) are left out by the
    full-name annotation. When a worker's pod was replaced within an attempt (a disrupted pod
    that the Job controller recreated), the newest one is chosen.
    """
    mine = []
    for pod in pods:
        meta = _meta(pod)
        labels = meta.get("labels") or {}
        if labels.get(LABEL_TRAINJOB) != name or labels.get(LABEL_COMPONENT, "worker") != "worker":
            continue
        full = (meta.get("annotations") or {}).get(ANNOTATION_TRAINJOB)
        if full is not None and full != name:
            continue
        if attempt_of(pod) is None:
            continue
        mine.append(pod)
    if not mine:
        raise NoWorkerPod(f"TrainJob {name} has no worker pods (yet)")
    attempts = sorted({attempt_of(p) for p in mine})
    chosen = attempts[-1] if attempt is None else attempt
    if chosen not in attempts:
        raise NoWorkerPod(f"TrainJob {name} has no pods of attempt {chosen} "
                          f"(attempts: {', '.join(map(str, attempts))})")
    in_attempt = [p for p in mine if attempt_of(p) == chosen]
    candidates = [p for p in in_attempt if worker_index_of(p) == worker]
    if not candidates:
        indexes = sorted({i for i in map(worker_index_of, in_attempt) if i is not None})
        raise NoWorkerPod(f"TrainJob {name} attempt {chosen} has no worker {worker} "
                          f"(workers: {', '.join(map(str, indexes)) or 'none'})")
    return max(candidates, key=lambda p: (str(_meta(p).get("creationTimestamp") or ""),
                                          str(_meta(p).get("name") or "")))
