"""Names, labels and the metadata every child carries. Pure.

Every child has a deterministic name, kontrast labels only (the parent's labels are never
copied, so Argo CD's tracking label cannot leak onto pods) and a controller ownerReference to
the TrainJob, so deleting the TrainJob garbage-collects everything. Names are DNS labels,
shortened with a hash when they would be too long.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping

from kontrast import contract
from kontrast.api import API_VERSION, KIND

LABEL_TRAINJOB = "kontrast.dev/trainjob"
LABEL_ATTEMPT = "kontrast.dev/attempt"
LABEL_COMPONENT = "kontrast.dev/component"
ANNOTATION_TRAINJOB = "kontrast.dev/trainjob-name"  # the full name (labels are capped at 63)
#: On a worker Job: the restart budget spent when this attempt was created. The newest Job is
#: the durable record of a restart decision, so an operator restart never counts one twice.
ANNOTATION_RESTARTS = "kontrast.dev/restarts"
#: On the TrainJob: the phase the operator decided last. ``status`` can be written by the
#: trainer's token (trainjobs/status, for its progress); metadata cannot, so a phase the
#: operator did not decide is never taken as a fact (without the chart's admission policy too).
#: ANNOTATION_RESTARTS on the TrainJob is, likewise, the budget the operator counted.
ANNOTATION_PHASE = "kontrast.dev/phase"
#: On a worker Job: why this attempt was created (Created, Resumed, Recreated, QueueChanged,
#: or the restart's PodFailed, Disrupted, Evicted, Hung).
ANNOTATION_REASON = "kontrast.dev/start-reason"

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: On a worker Job: the LocalQueue spec.scheduling.queueName named when the attempt was created
#: ("" for none). Kueue may label a Job with a queue of its own (a namespace's LocalQueue named
#: `default`); this records what the operator asked for, so such a label is never taken for a
#: changed spec.
ANNOTATION_QUEUE = "kontrast.dev/queue-name"
#: On a worker Job: "true" while the operator holds the attempt (created suspended until the older
#: attempts' pods are gone), "false" otherwise. A suspended Job the operator does not hold is Kueue's.
ANNOTATION_HOLD = "kontrast.dev/hold"
#: The queue label of a held attempt bound for a Kueue queue. No LocalQueue of this name may exist,
#: so Kueue queues the attempt where it can never be admitted until the operator relabels it. (An
#: unlabelled Job is no hold where Kueue labels it with a `default` LocalQueue of the namespace.)
PARKING_QUEUE = "kontrast-held"
#: On a parked worker Job: the LocalQueue it goes to once released.
ANNOTATION_PARKED_FOR = "kontrast.dev/parked-for"
#: Kueue's WorkloadPriorityClass label: the one label a TrainJob passes to its worker Job.
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

TRAINER_CONTAINER = "trainer"
CONFIG_KEY = contract.TRAINJOB_FILE

DNS_LABEL_MAX = 63


def _hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def dns_label(base: str, suffix: str = "", limit: int = DNS_LABEL_MAX) -> str:
    """A DNS-1035 label made of ``base`` + ``suffix``, at most ``limit`` characters.

    Dots (allowed in TrainJob names) become dashes; a name that does not start with a letter
    gets a ``tj-`` prefix; a name that would be too long keeps its start plus a short hash of
    the full base, so distinct long names stay distinct and the result is deterministic.
    """
    clean = re.sub(r"[^a-z0-9-]", "-", base.lower())
    if not clean[:1].isalpha():
        clean = "tj-" + clean
    if len(clean) + len(suffix) <= limit:
        return clean + suffix
    keep = limit - len(suffix) - 7
    return clean[:keep].rstrip("-") + "-" + _hash(base) + suffix


def label_value(name: str) -> str:
    """A label value for a TrainJob name (names may be 253 long, label values 63)."""
    return name if len(name) <= DNS_LABEL_MAX else name[:56].rstrip("-.") + "-" + _hash(name)


def service_account_name(name: str) -> str:
    return dns_label(name, "-trainer")


def role_name(name: str) -> str:
    return dns_label(name, "-trainer")


def service_name(name: str) -> str:
    return dns_label(name, "-workers")


def configmap_name(name: str) -> str:
    return dns_label(name, "-trainjob")


def job_name(name: str, attempt: int, nodes: int = 1) -> str:
    """``<tj>-<attempt>``, short enough that every pod hostname ``<job>-<index>`` is a label."""
    index_len = len(str(max(nodes, 1) - 1))
    return dns_label(name, f"-{attempt}", limit=DNS_LABEL_MAX - 1 - index_len)


def master_addr(name: str, attempt: int, nodes: int) -> str:
    """The hostname of the index-0 pod: ``<job>-0.<service>`` (resolves in the namespace)."""
    return f"{job_name(name, attempt, nodes)}-0.{service_name(name)}"


def selector_labels(tj: Mapping[str, Any]) -> dict[str, str]:
    return {LABEL_TRAINJOB: label_value(tj["metadata"]["name"])}


def component_labels(tj: Mapping[str, Any], component: str) -> dict[str, str]:
    return {**selector_labels(tj), LABEL_COMPONENT: component}


def owner_reference(tj: Mapping[str, Any]) -> dict[str, Any]:
    meta = tj["metadata"]
    return {
        "apiVersion": tj.get("apiVersion", API_VERSION),
        "kind": tj.get("kind", KIND),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(tj: Mapping[str, Any], name: str, component: str, labels: Mapping[str, str] | None = None,
             annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": tj["metadata"]["namespace"],
        "labels": {**component_labels(tj, component), **(labels or {})},
        "annotations": {ANNOTATION_TRAINJOB: tj["metadata"]["name"], **(annotations or {})},
        "ownerReferences": [owner_reference(tj)],
    }


def worker_labels(tj: Mapping[str, Any], attempt: int) -> dict[str, str]:
    """The labels that make a pod one of this attempt's workers (the Service selects them)."""
    return {**component_labels(tj, "worker"), LABEL_ATTEMPT: str(attempt)}
