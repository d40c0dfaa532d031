"""The worker Job of one attempt (an Indexed Job of ``nodes`` pods), and all of an attempt's children. Pure."""

from __future__ import annotations

import copy
from typing import Any, Mapping

from kontrast import contract
from kontrast.api.defaults import defaulted_spec
from kontrast.api.scheduling import Scheduling

from ..config import OperatorConfig
from .base import base_children
from .names import (ANNOTATION_HOLD, ANNOTATION_PARKED_FOR, ANNOTATION_QUEUE, ANNOTATION_REASON, ANNOTATION_RESTARTS,
                    ANNOTATION_TRAINJOB, KUEUE_PRIORITY_LABEL, KUEUE_QUEUE_LABEL, LABEL_ATTEMPT, PARKING_QUEUE,
                    TRAINER_CONTAINER, job_name, metadata, worker_labels)
from .pod import pod_settings, pod_spec

#: Fail at once on the trainer's permanent exit code; ignore disruptions (see :func:`worker_job`).
POD_FAILURE_POLICY = {"rules": [
    {"action": "FailJob", "onExitCodes": {
        "containerName": TRAINER_CONTAINER, "operator": "In", "values": [contract.EXIT_PERMANENT]}},
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
]}


def _job_labels(tj: Mapping[str, Any], attempt: int, queue: str | None, hold: bool) -> dict[str, str]:
    """The attempt, Kueue's queue (the parking queue while held), and the one label a TrainJob
    passes on (priority)."""
    labels = {LABEL_ATTEMPT: str(attempt)}
    if queue:
        labels[KUEUE_QUEUE_LABEL] = PARKING_QUEUE if hold else queue
    priority = (tj["metadata"].get("labels") or {}).get(KUEUE_PRIORITY_LABEL)
    if priority:
        labels[KUEUE_PRIORITY_LABEL] = priority
    return labels


def worker_job(tj: Mapping[str, Any], attempt: int, restarts: int, config: OperatorConfig,
               reason: str = "Created", hold: bool = False,
               active_deadline_seconds: int | None = None, queue: str | None = None) -> dict[str, Any]:
    """The Indexed Job of one attempt: ``nodes`` pods that train together.

    backoffLimit 0: the operator, not the Job controller, restarts training, always the whole
    gang from the newest checkpoint. podFailurePolicy fails the Job at once on the trainer's
    permanent exit code and ignores disruptions (preemption, eviction, node drain).

    Suspended when Kueue admits it (``queue``, by default the spec's queueName), or when
    ``hold``: the operator releases it once the pods of older attempts are gone (a held Job
    bound for a queue waits in the parking queue and gets its queue's label only then, so Kueue
    cannot start it early). ``active_deadline_seconds``: what is left of the TrainJob's
    deadline, enforced by the Job controller too. The annotations record the queue the spec
    named and the hold, which Kueue never rewrites (it may label an unlabelled Job).
    """
    name = tj["metadata"]["name"]
    spec = defaulted_spec(tj["spec"])
    sched = Scheduling.from_spec(spec)
    nodes = spec["nodes"]
    settings = pod_settings(sched, config)
    queue = queue or sched.queue_name
    # The user's and the chart's labels and annotations first: kontrast's own always win.
    pod_labels = {**settings.get("podLabels", {}), **worker_labels(tj, attempt)}
    pod_annotations = {**settings.get("podAnnotations", {}), ANNOTATION_TRAINJOB: name}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(tj, job_name(name, attempt, nodes), "worker",
                             labels=_job_labels(tj, attempt, queue, hold),
                             annotations={ANNOTATION_RESTARTS: str(restarts), ANNOTATION_REASON: reason,
                                          ANNOTATION_QUEUE: sched.queue_name or "",
                                          ANNOTATION_HOLD: "true" if hold else "false",
                                          **({ANNOTATION_PARKED_FOR: queue} if hold and queue else {})}),
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 0,
            **({"activeDeadlineSeconds": active_deadline_seconds} if active_deadline_seconds else {}),
            "suspend": bool(queue) or hold,
            "podFailurePolicy": copy.deepcopy(POD_FAILURE_POLICY),
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": pod_spec(tj, spec, sched, attempt, config, settings),
            },
        },
    }


def children(tj: Mapping[str, Any], attempt: int, restarts: int, config: OperatorConfig,
             reason: str = "Created", hold: bool = False,
             active_deadline_seconds: int | None = None, queue: str | None = None) -> list[dict[str, Any]]:
    """Everything one attempt needs: the base children, then its worker Job."""
    return [*base_children(tj, config),
            worker_job(tj, attempt, restarts, config, reason, hold, active_deadline_seconds, queue)]
