"""The training pod of one attempt: its settings (three layers), volumes, container and env. Pure."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

from kontrast import contract
from kontrast.api.eval_sets import eval_set_locations
from kontrast.api.scheduling import Scheduling, field_name, thaw
from kontrast.api.tracking import MLFLOW_CREDENTIAL_KEYS, Tracking

from ..config import MERGED_FIELDS, POD_FIELDS, OperatorConfig
from .names import (COMPLETION_INDEX_ANNOTATION, CONFIG_KEY, DNS_LABEL_MAX, TRAINER_CONTAINER, configmap_name,
                    dns_label, master_addr, service_account_name, service_name, worker_labels)

CONFIG_VOLUME = "trainjob"
SHM_VOLUME = "dshm"
CACHE_VOLUME = "cache"

#: The trainer container's securityContext: Pod Security "restricted" (the trainer needs no
#: privilege, capability or syscall beyond the runtime's default profile). Not configurable.
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}

#: The fields of a TrainJob spec that hold paths or URIs (besides the eval sets' and the cache).
URI_FIELDS = ("model", "pretrained", "trainData", "output")

#: Credential variables per object-store scheme: what storageSecretRef passes when it lists no
#: keys (each optional, so a Secret may hold any subset).
STORAGE_SECRET_KEYS = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
           "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"),
}

#: Pod settings copied onto the pod spec as they are.
_POD_SPEC_FIELDS = ("nodeSelector", "tolerations", "priorityClassName", "schedulerName", "affinity",
                    "imagePullSecrets", "terminationGracePeriodSeconds")


def _uris(spec: Mapping[str, Any]) -> list[str]:
    cache = (spec.get("data") or {}).get("cache")
    fields = (*(spec.get(f) for f in URI_FIELDS), *eval_set_locations(spec), cache)
    return [v for v in fields if isinstance(v, str)]


def pvc_claims(spec: Mapping[str, Any]) -> list[str]:
    """Claims named by ``pvc://<claim>/<path>`` URIs in the fields that hold paths."""
    claims = {u[len("pvc://"):].split("/", 1)[0] for u in _uris(spec) if u.startswith("pvc://")}
    return sorted(c for c in claims if c)


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


def pod_settings(sched: Scheduling, config: OperatorConfig) -> dict[str, Any]:
    """The pod fields of ``scheduling`` a pod is rendered from: the chart's defaults, then the
    TrainJob's own, then what the chart enforces (see :mod:`config`). Unset fields are absent."""
    own = {field: thaw(getattr(sched, field_name(field))) for field in POD_FIELDS}
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


def tracking_env(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The MLflow client's credentials from spec.tracking.mlflow.credentialsSecretRef: one
    optional secretKeyRef per MLFLOW_TRACKING_* key (a token, or a user and password)."""
    mlflow = Tracking.from_spec(spec.get("tracking")).mlflow
    if mlflow is None or not mlflow.credentials_secret:
        return []
    return [{"name": k, "valueFrom": {"secretKeyRef": {"name": mlflow.credentials_secret, "key": k, "optional": True}}}
            for k in MLFLOW_CREDENTIAL_KEYS]


def _spread(constraints: list[dict[str, Any]], pod_labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """A constraint without labelSelector counts this attempt's pods (what spreading means here)."""
    return [c if "labelSelector" in c else {**c, "labelSelector": {"matchLabels": dict(pod_labels)}}
            for c in constraints]


def mounts_cache_volume(spec: Mapping[str, Any], config: OperatorConfig) -> bool:
    """The chart's cache volume serves a TrainJob that names no cache folder of its own."""
    return bool(config.cache_volume) and not (spec.get("data") or {}).get("cache")


def _env(tj: Mapping[str, Any], spec: Mapping[str, Any], attempt: int, config: OperatorConfig,
         extra: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The launcher's variables, then the storage credentials, then ``scheduling.env`` (whose
    names the CRD keeps clear of the launcher's)."""
    meta, nodes = tj["metadata"], spec["nodes"]
    return [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(spec["procsPerNode"])},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
        {"name": "PET_MASTER_ADDR", "value": master_addr(meta["name"], attempt, nodes)},
        {"name": "PET_MASTER_PORT", "value": str(config.master_port)},
        {"name": contract.JOB_NAME_ENV, "value": meta["name"]},
        {"name": contract.JOB_NAMESPACE_ENV, "value": meta["namespace"]},
        {"name": contract.JOB_UID_ENV, "value": meta.get("uid", "")},
        {"name": contract.STATUS_INTERVAL_ENV, "value": f"{config.status_interval_seconds:g}"},
        {"name": contract.TERMINATION_LOG_ENV, "value": contract.TERMINATION_LOG},
        {"name": contract.PVC_ROOT_ENV, "value": contract.PVC_ROOT_DEFAULT},
        {"name": "KONTRAST_ATTEMPT", "value": str(attempt)},
        *([{"name": contract.CACHE_ENV, "value": contract.CACHE_MOUNT}] if mounts_cache_volume(spec, config) else []),
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *storage_env(spec),
        *tracking_env(spec),
        *(dict(e) for e in extra),
    ]


def _volumes(name: str, spec: Mapping[str, Any], config: OperatorConfig) -> tuple[list[dict], list[dict]]:
    """The pod's volumes and the trainer's mounts of them: the TrainJob, the claims its URIs
    name, the data cache and /dev/shm."""
    mounts = [{"name": CONFIG_VOLUME, "mountPath": contract.TRAINJOB_MOUNT_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{
        "name": CONFIG_VOLUME,
        "configMap": {"name": configmap_name(name), "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]},
    }]
    for claim in pvc_claims(spec):
        vol = "pvc-" + dns_label(claim, "", limit=DNS_LABEL_MAX - 4)
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": vol, "mountPath": f"{contract.PVC_ROOT_DEFAULT}/{claim}"})
    if mounts_cache_volume(spec, config):
        volumes.append({"name": CACHE_VOLUME, **copy.deepcopy(dict(config.cache_volume))})
        mounts.append({"name": CACHE_VOLUME, "mountPath": contract.CACHE_MOUNT})
    if config.shm_size:
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}})
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    return volumes, mounts


def _container(env: list[dict[str, Any]], mounts: list[dict[str, Any]], sched: Scheduling,
               config: OperatorConfig, settings: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": TRAINER_CONTAINER,
        "image": sched.image or config.trainer_image,
        "imagePullPolicy": sched.image_pull_policy or config.image_pull_policy,
        "command": ["kontrast", "launch", f"{contract.TRAINJOB_MOUNT_DIR}/{contract.TRAINJOB_FILE}"],
        "env": env,
        "ports": [{"name": "rendezvous", "containerPort": config.master_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "resources": copy.deepcopy(settings.get("resources", {})),
        "terminationMessagePath": contract.TERMINATION_LOG,
        # The trainer writes the reason of a failure to the termination log; when it could not
        # (killed, crashed in native code), the log's tail explains instead.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }


def pod_spec(tj: Mapping[str, Any], spec: Mapping[str, Any], sched: Scheduling, attempt: int,
             config: OperatorConfig, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The pod of one attempt; ``spec`` is the TrainJob's spec with the CRD's defaults and
    ``settings`` its :func:`pod_settings`."""
    name = tj["metadata"]["name"]
    volumes, mounts = _volumes(name, spec, config)
    env = _env(tj, spec, attempt, config, settings.get("env", ()))
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(name),
        "serviceAccountName": service_account_name(name),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "containers": [_container(env, mounts, sched, config, settings)],
        "volumes": volumes,
    }
    for field in _POD_SPEC_FIELDS:
        if field in settings:
            pod[field] = copy.deepcopy(settings[field])
    if "topologySpreadConstraints" in settings:
        pod["topologySpreadConstraints"] = _spread(settings["topologySpreadConstraints"], worker_labels(tj, attempt))
    if config.pod_security_context:
        pod["securityContext"] = copy.deepcopy(dict(config.pod_security_context))
    return pod
