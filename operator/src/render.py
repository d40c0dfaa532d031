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
from kontrast.api.defaults import apply_defaults

from .config import MERGED_FIELDS, POD_FIELDS, OperatorConfig

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
CACHE_VOLUME = "cache"

_DNS_LABEL_MAX = 63

#: The trainer container's securityContext: Pod Security "restricted" (the trainer needs no
#: privilege, capability or syscall beyond the runtime's default profile). Not configurable.
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}

#: The fields of a TrainJob spec that hold paths or URIs.
URI_FIELDS = ("model", "pretrained", "trainData", "evalData", "corpusData", "output")

#: Credential variables per object-store scheme: what storageSecretRef passes when it lists no
#: keys (each optional, so a Secret may hold any subset).
STORAGE_SECRET_KEYS = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
           "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"),
}


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


def _uris(spec: Mapping[str, Any]) -> list[str]:
    cache = (spec.get("data") or {}).get("cache")
    return [v for v in (*(spec.get(f) for f in URI_FIELDS), cache) if isinstance(v, str)]


def pvc_claims(spec: Mapping[str, Any]) -> list[str]:
    """Claims named by ``pvc://<claim>/<path>`` URIs in the fields that hold paths."""
    claims = {u[len("pvc://"):].split("/", 1)[0] for u in _uris(spec) if u.startswith("pvc://")}
    return sorted(c for c in claims if c)


def scheduling(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec.scheduling`` with the CRD's defaults (the API server applies the same ones)."""
    defaulted = apply_defaults({"spec": {"scheduling": dict(spec.get("scheduling") or {})}})
    return defaulted["spec"]["scheduling"]


def _layer(under: Any, over: Any, field: str) -> Any:
    """``over`` replaces ``under``, except maps and env, which merge by key (``over`` wins)."""
    if over in (None, "", [], {}):
        return under
    if field not in MERGED_FIELDS or not under:
        return copy.deepcopy(over)
    if field == "env":
        names = {e["name"] for e in over}
        return [copy.deepcopy(e) for e in under if e["name"] not in names] + copy.deepcopy(list(over))
    return {**under, **over}


def pod_settings(spec: Mapping[str, Any], config: OperatorConfig) -> dict[str, Any]:
    """The pod fields of ``scheduling`` a pod is rendered from: the chart's defaults, then the
    TrainJob's own, then what the chart enforces (see :mod:`config`). Unset fields are absent."""
    own = scheduling(spec)
    out = {}
    for field in POD_FIELDS:
        value = None
        for layer in (config.defaults, own, config.enforced):
            value = _layer(value, layer.get(field), field)
        if value not in (None, "", [], {}):
            out[field] = value
    return out


def storage_env(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One secretKeyRef per key the storage needs: the listed keys (required), or the standard
    variables of the URL schemes in use (optional). Never the whole Secret (no envFrom)."""
    ref = spec.get("storageSecretRef") or {}
    if not ref.get("name"):
        return []
    if ref.get("keys"):
        keys, optional = list(ref["keys"]), False
    else:
        schemes = {u.split("://", 1)[0] for u in _uris(spec) if "://" in u}
        keys = [k for scheme in sorted(schemes) for k in STORAGE_SECRET_KEYS.get(scheme, ())]
        optional = True
    return [{"name": k, "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": k, "optional": optional}}}
            for k in keys]


def _spread(constraints: list[dict[str, Any]], pod_labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """A constraint without labelSelector counts this attempt's pods (what spreading means here)."""
    return [c if "labelSelector" in c else {**c, "labelSelector": {"matchLabels": dict(pod_labels)}}
            for c in constraints]


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


def _env(tj: Mapping[str, Any], attempt: int, config: OperatorConfig,
         extra: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The launcher's variables, then the storage credentials, then ``scheduling.env`` (whose
    names the CRD keeps clear of the launcher's)."""
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
        *([{"name": contract.CACHE_ENV, "value": contract.CACHE_MOUNT}] if mounts_cache_volume(spec, config) else []),
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *storage_env(spec),
        *(dict(e) for e in extra),
    ]


def mounts_cache_volume(spec: Mapping[str, Any], config: OperatorConfig) -> bool:
    """The chart's cache volume serves a TrainJob that names no cache folder of its own."""
    return bool(config.cache_volume) and not (spec.get("data") or {}).get("cache")


def pod_spec(tj: Mapping[str, Any], attempt: int, config: OperatorConfig,
             settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    meta, spec = tj["metadata"], tj["spec"]
    name = meta["name"]
    sched = scheduling(spec)
    settings = pod_settings(spec, config) if settings is None else settings
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
    if mounts_cache_volume(spec, config):
        volumes.append({"name": CACHE_VOLUME, **copy.deepcopy(dict(config.cache_volume))})
        mounts.append({"name": CACHE_VOLUME, "mountPath": contract.CACHE_MOUNT})
    if config.shm_size:
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}})
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})

    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": sched.get("image") or config.trainer_image,
        "imagePullPolicy": sched.get("imagePullPolicy") or config.image_pull_policy,
        "command": ["kontrast", "launch", f"{contract.TRAINJOB_MOUNT_DIR}/{contract.TRAINJOB_FILE}"],
        "env": _env(tj, attempt, config, settings.get("env", ())),
        "ports": [{"name": "rendezvous", "containerPort": config.master_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "resources": copy.deepcopy(settings.get("resources", {})),
        "terminationMessagePath": contract.TERMINATION_LOG,
        # The trainer writes the reason of a failure to the termination log; when it could not
        # (killed, crashed in native code), the log's tail explains instead.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(name),
        "serviceAccountName": service_account_name(name),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": volumes,
    }
    for field in ("nodeSelector", "tolerations", "priorityClassName", "schedulerName", "affinity",
                  "imagePullSecrets", "terminationGracePeriodSeconds"):
        if field in settings:
            pod[field] = copy.deepcopy(settings[field])
    if "topologySpreadConstraints" in settings:
        pod["topologySpreadConstraints"] = _spread(settings["topologySpreadConstraints"], worker_labels(tj, attempt))
    if config.pod_security_context:
        pod["securityContext"] = copy.deepcopy(dict(config.pod_security_context))
    return pod


def worker_labels(tj: Mapping[str, Any], attempt: int) -> dict[str, str]:
    """The labels that make a pod one of this attempt's workers (the Service selects them)."""
    return {**_labels(tj, "worker"), LABEL_ATTEMPT: str(attempt)}


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
    settings = pod_settings(spec, config)
    # The user's and the chart's labels and annotations first: kontrast's own always win.
    pod_labels = {**settings.get("podLabels", {}), **worker_labels(tj, attempt)}
    pod_annotations = {**settings.get("podAnnotations", {}), ANNOTATION_TRAINJOB: name}
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
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": pod_spec(tj, attempt, config, settings),
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

