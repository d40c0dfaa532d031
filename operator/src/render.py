"""TrainJob -> child manifests. Pure: no API calls, no clock, no randomness.

Every child has a deterministic name, kontrast labels only (the parent's labels are never
copied, so Argo CD's tracking label cannot leak onto pods) and a controller ownerReference to
the TrainJob, so deleting the TrainJob garbage-collects everything.

Children of a TrainJob ``tj`` (names shortened with a hash when a name would be too long):

=================  ====================  =====================================================
kind               name                  purpose
=================  ====================  =====================================================
ServiceAccount     ``tj-trainer``        identity of the training pods
Role/RoleBinding   ``tj-trainer``        get + patch on ``trainjobs/status`` of this job only
Service            ``tj-workers``        headless; stable DNS ``<job>-<index>.tj-workers``
ConfigMap          ``tj-trainjob``       the TrainJob manifest, spec unchanged
Job (batch/v1)     ``tj-<attempt>``      Indexed, ``nodes`` pods; a new attempt per restart
=================  ====================  =====================================================
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any, Iterable, Mapping

import yaml

from kontrast import contract
from kontrast.api import API_VERSION, GROUP, KIND, PLURAL

from .config import OperatorConfig

# --- labels and annotations (the only ones children carry) ----------------------------------
LABEL_TRAINJOB = "kontrast.dev/trainjob"
LABEL_ATTEMPT = "kontrast.dev/attempt"
LABEL_COMPONENT = "kontrast.dev/component"
ANNOTATION_TRAINJOB = "kontrast.dev/trainjob-name"  # the full name (labels are capped at 63)
#: On a worker Job: the restart budget spent when this attempt was created. The newest Job is
#: the durable record of a restart decision, so an operator restart never counts one twice.
ANNOTATION_RESTARTS = "kontrast.dev/restarts"
#: On a worker Job: why this attempt was created (Created, Restarted, Disrupted, Resumed, ...).
ANNOTATION_REASON = "kontrast.dev/start-reason"

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: Kueue's WorkloadPriorityClass label: the one label a TrainJob passes to its worker Job.
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

TRAINER_CONTAINER = "trainer"
CONFIG_KEY = contract.TRAINJOB_FILE
CONFIG_VOLUME = "trainjob"
SHM_VOLUME = "dshm"

_DNS_LABEL_MAX = 63


# --- names --------------------------------------------------------------------------------
def _hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def dns_label(base: str, suffix: str = "", limit: int = _DNS_LABEL_MAX) -> str:
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
    return name if len(name) <= _DNS_LABEL_MAX else name[:56].rstrip("-.") + "-" + _hash(name)


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
    return dns_label(name, f"-{attempt}", limit=_DNS_LABEL_MAX - 1 - index_len)


def master_addr(name: str, attempt: int, nodes: int) -> str:
    """The hostname of the index-0 pod: ``<job>-0.<service>`` (resolves in the namespace)."""
    return f"{job_name(name, attempt, nodes)}-0.{service_name(name)}"


# --- helpers ------------------------------------------------------------------------------
def selector_labels(tj: Mapping[str, Any]) -> dict[str, str]:
    return {LABEL_TRAINJOB: label_value(tj["metadata"]["name"])}


def _labels(tj: Mapping[str, Any], component: str, **extra: str) -> dict[str, str]:
    return {**selector_labels(tj), LABEL_COMPONENT: component, **extra}


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


def _metadata(tj: Mapping[str, Any], name: str, component: str, labels: Mapping[str, str] | None = None,
              annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": tj["metadata"]["namespace"],
        "labels": {**_labels(tj, component), **(labels or {})},
        "annotations": {ANNOTATION_TRAINJOB: tj["metadata"]["name"], **(annotations or {})},
        "ownerReferences": [owner_reference(tj)],
    }


def pvc_claims(spec: Mapping[str, Any]) -> list[str]:
    """Claims named by ``pvc://<claim>/<path>`` URIs in the fields that hold paths."""
    claims = set()
    for field in ("model", "pretrained", "trainData", "evalData", "output"):
        value = spec.get(field)
        if isinstance(value, str) and value.startswith("pvc://"):
            claim = value[len("pvc://"):].split("/", 1)[0]
            if claim:
                claims.add(claim)
    return sorted(claims)


def scheduling(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec.scheduling`` with the CRD's defaults (the API server applies them too)."""
    s = dict(spec.get("scheduling") or {})
    s.setdefault("maxRestarts", 3)
    s.setdefault("suspend", False)
    s.setdefault("cleanup", "OnSuccess")
    return s


# --- children -----------------------------------------------------------------------------
def service_account(tj: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(tj, service_account_name(tj["metadata"]["name"]), "rbac"),
    }


def role(tj: Mapping[str, Any]) -> dict[str, Any]:
    """Only get and patch on this one TrainJob's status: what the rank-0 status reporter needs."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(tj, role_name(tj["metadata"]["name"]), "rbac"),
        "rules": [{
            "apiGroups": [GROUP],
            "resources": [f"{PLURAL}/status"],
            "resourceNames": [tj["metadata"]["name"]],
            "verbs": ["get", "patch"],
        }],
    }


def role_binding(tj: Mapping[str, Any]) -> dict[str, Any]:
    name = tj["metadata"]["name"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(tj, role_name(name), "rbac"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name(name)},
        "subjects": [{
            "kind": "ServiceAccount",
            "name": service_account_name(name),
            "namespace": tj["metadata"]["namespace"],
        }],
    }


def service(tj: Mapping[str, Any], config: OperatorConfig) -> dict[str, Any]:
    """Headless, and publishing not-ready pods: rendezvous happens before any pod is Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(tj, service_name(tj["metadata"]["name"]), "network"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {**selector_labels(tj), LABEL_COMPONENT: "worker"},
            "ports": [{"name": "rendezvous", "port": config.master_port, "targetPort": config.master_port,
                       "protocol": "TCP"}],
        },
    }


def trainjob_document(tj: Mapping[str, Any]) -> str:
    """The TrainJob as the trainer reads it: apiVersion, kind, name, namespace, spec unchanged."""
    doc = {
        "apiVersion": tj.get("apiVersion", API_VERSION),
        "kind": tj.get("kind", KIND),
        "metadata": {"name": tj["metadata"]["name"], "namespace": tj["metadata"]["namespace"]},
        "spec": copy.deepcopy(tj["spec"]),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def configmap(tj: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(tj, configmap_name(tj["metadata"]["name"]), "config"),
        "data": {CONFIG_KEY: trainjob_document(tj)},
    }


def _env(tj: Mapping[str, Any], attempt: int, config: OperatorConfig) -> list[dict[str, Any]]:
    meta, spec = tj["metadata"], tj["spec"]
    nodes = int(spec.get("nodes", 1))
    return [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(int(spec.get("procsPerNode", 1)))},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
        {"name": "PET_MASTER_ADDR", "value": master_addr(meta["name"], attempt, nodes)},
        {"name": "PET_MASTER_PORT", "value": str(config.master_port)},
        {"name": contract.JOB_NAME_ENV, "value": meta["name"]},
        {"name": contract.JOB_NAMESPACE_ENV, "value": meta["namespace"]},
        {"name": contract.STATUS_INTERVAL_ENV, "value": f"{config.status_interval_seconds:g}"},
        {"name": contract.TERMINATION_LOG_ENV, "value": contract.TERMINATION_LOG},
        {"name": contract.PVC_ROOT_ENV, "value": contract.PVC_ROOT_DEFAULT},
        {"name": "KONTRAST_ATTEMPT", "value": str(attempt)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def pod_spec(tj: Mapping[str, Any], attempt: int, config: OperatorConfig) -> dict[str, Any]:
    meta, spec = tj["metadata"], tj["spec"]
    name = meta["name"]
    sched = scheduling(spec)
    claims = pvc_claims(spec)

    mounts = [{"name": CONFIG_VOLUME, "mountPath": contract.TRAINJOB_MOUNT_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{
        "name": CONFIG_VOLUME,
        "configMap": {"name": configmap_name(name), "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]},
    }]
    for claim in claims:
        vol = dns_label(claim, "", limit=_DNS_LABEL_MAX - 4)
        vol = "pvc-" + vol
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": vol, "mountPath": f"{contract.PVC_ROOT_DEFAULT}/{claim}"})
    if config.shm_size:
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}})
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})

    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": sched.get("image") or config.trainer_image,
        "imagePullPolicy": sched.get("imagePullPolicy") or config.image_pull_policy,
        "command": ["kontrast", "launch", f"{contract.TRAINJOB_MOUNT_DIR}/{contract.TRAINJOB_FILE}"],
        "env": _env(tj, attempt, config),
        "ports": [{"name": "rendezvous", "containerPort": config.master_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "resources": copy.deepcopy(sched.get("resources") or dict(config.default_resources)),
        "terminationMessagePath": contract.TERMINATION_LOG,
        # The trainer writes the reason of a failure to the termination log; when it could not
        # (killed, crashed in native code), the log's tail explains instead.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    secret = (spec.get("storageSecretRef") or {}).get("name")
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]

    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(name),
        "serviceAccountName": service_account_name(name),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": volumes,
    }
    node_selector = sched.get("nodeSelector") or dict(config.default_node_selector)
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    tolerations = sched.get("tolerations") or list(config.default_tolerations)
    if tolerations:
        pod["tolerations"] = copy.deepcopy(tolerations)
    priority = sched.get("priorityClassName") or config.default_priority_class
    if priority:
        pod["priorityClassName"] = priority
    if config.pod_security_context:
        pod["securityContext"] = copy.deepcopy(dict(config.pod_security_context))
    if config.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in config.image_pull_secrets]
    return pod


def worker_job(tj: Mapping[str, Any], attempt: int, restarts: int, config: OperatorConfig,
               reason: str = "Created", hold: bool = False,
               active_deadline_seconds: int | None = None) -> dict[str, Any]:
    """The Indexed Job of one attempt: ``nodes`` pods that train together.

    backoffLimit 0: the operator, not the Job controller, restarts training, always the whole
    gang from the newest checkpoint. podFailurePolicy fails the Job at once on the trainer's
    permanent exit code and ignores disruptions (preemption, eviction, node drain).

    Suspended when Kueue admits it (queueName), or when ``hold``: the operator releases it once
    the pods of older attempts are gone (a held Job gets Kueue's label only then, so Kueue
    cannot start it early). ``active_deadline_seconds``: what is left of the TrainJob's
    deadline, enforced by the Job controller too.
    """
    meta, spec = tj["metadata"], tj["spec"]
    name = meta["name"]
    nodes = int(spec.get("nodes", 1))
    sched = scheduling(spec)
    queue = sched.get("queueName")
    job_labels = {LABEL_ATTEMPT: str(attempt)}
    if queue and not hold:
        job_labels[KUEUE_QUEUE_LABEL] = queue
    priority = (meta.get("labels") or {}).get(KUEUE_PRIORITY_LABEL)
    if priority:
        job_labels[KUEUE_PRIORITY_LABEL] = priority
    pod_labels = {**_labels(tj, "worker"), LABEL_ATTEMPT: str(attempt)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(tj, job_name(name, attempt, nodes), "worker", labels=job_labels,
                              annotations={ANNOTATION_RESTARTS: str(restarts), ANNOTATION_REASON: reason}),
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 0,
            **({"activeDeadlineSeconds": active_deadline_seconds} if active_deadline_seconds else {}),
            "suspend": bool(queue) or hold,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {
                    "containerName": TRAINER_CONTAINER, "operator": "In", "values": [contract.EXIT_PERMANENT]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {ANNOTATION_TRAINJOB: name},
                },
                "spec": pod_spec(tj, attempt, config),
            },
        },
    }


def base_children(tj: Mapping[str, Any], config: OperatorConfig) -> list[dict[str, Any]]:
    """Everything but the worker Job, in creation order (the binding after its Role)."""
    return [service_account(tj), role(tj), role_binding(tj), service(tj, config), configmap(tj)]


def children(tj: Mapping[str, Any], attempt: int, restarts: int, config: OperatorConfig,
             reason: str = "Created", hold: bool = False,
             active_deadline_seconds: int | None = None) -> list[dict[str, Any]]:
    return [*base_children(tj, config),
            worker_job(tj, attempt, restarts, config, reason, hold, active_deadline_seconds)]


def kinds(objs: Iterable[Mapping[str, Any]]) -> list[str]:
    return [o["kind"] for o in objs]
