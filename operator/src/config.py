"""The operator's own settings: what the Helm chart's values become.

Read once from environment variables (the chart sets them on the Deployment), so rendering
stays a pure function of (TrainJob, OperatorConfig).

Pod settings come in three layers, each named like the TrainJob's ``spec.scheduling`` field it
fills (see :data:`POD_FIELDS`): the chart's ``trainer.defaults``, then the TrainJob's own
``spec.scheduling``, then the chart's ``trainer.enforced`` (platform policy a TrainJob cannot
override). Maps and ``env`` merge by key, the later layer winning; any other field is replaced
whole by the later layer that sets it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

from kontrast import __version__, contract

from .policy import Policy

DEFAULT_TRAINER_IMAGE = f"ghcr.io/kontrast/trainer:{__version__}"

#: The numeric user and group the trainer image runs as (trainer/Dockerfile: USER 1000).
TRAINER_UID = 1000

#: Environment variables the Helm chart sets on the operator Deployment.
ENV_TRAINER_IMAGE = "KONTRAST_TRAINER_IMAGE"
ENV_TRAINER_PULL_POLICY = "KONTRAST_TRAINER_IMAGE_PULL_POLICY"
ENV_DEFAULTS = "KONTRAST_POD_DEFAULTS"  # JSON object: POD_FIELDS plus shmSize, cacheVolume, podSecurityContext
ENV_ENFORCED = "KONTRAST_POD_ENFORCED"  # JSON object: POD_FIELDS a TrainJob cannot override
ENV_POLICY = "KONTRAST_POLICY"  # JSON object: the allow-lists of policy.Policy
ENV_WATCH_NAMESPACES = "KONTRAST_WATCH_NAMESPACES"  # comma-separated; empty = all namespaces
ENV_RESYNC = "KONTRAST_RESYNC_SECONDS"  # every TrainJob not finished is reconciled this often
ENV_RECONCILE_WORKERS = "KONTRAST_RECONCILE_WORKERS"  # reconciles at once (API-bound threads)
ENV_HANG = "KONTRAST_HANG_SECONDS"  # restart a Running job whose progress is older (0: never)
ENV_STATUS_INTERVAL = contract.STATUS_INTERVAL_ENV  # the trainer's progress patch interval
ENV_METRICS_PORT = "KONTRAST_METRICS_PORT"  # 0 disables the /metrics endpoint
#: torchrun's rendezvous port in the pods (29500; the e2e tests, whose pods share the host's
#: loopback with other test sessions, pick a free one).
ENV_MASTER_PORT = "KONTRAST_MASTER_PORT"
ENV_KUBECONFIG = "KONTRAST_OPERATOR_KUBECONFIG"  # else KUBECONFIG, else in-cluster
ENV_TTL = "KONTRAST_TTL_SECONDS_AFTER_FINISHED"  # the platform's default; empty: keep finished TrainJobs

#: ``spec.scheduling`` fields that shape the training pods and may have chart defaults.
POD_FIELDS = ("resources", "nodeSelector", "tolerations", "priorityClassName", "schedulerName", "affinity",
              "topologySpreadConstraints", "podLabels", "podAnnotations", "env", "imagePullSecrets",
              "terminationGracePeriodSeconds")
#: Of those, the ones that merge by key across layers (``env`` by name).
MERGED_FIELDS = ("nodeSelector", "podLabels", "podAnnotations", "env")

#: Pod settings the operator uses when the chart sets none (values.yaml shows the same ones;
#: a test keeps them equal). The grace period leaves the trainer time for its SIGTERM checkpoint.
BUILTIN_DEFAULTS: Mapping[str, Any] = {"terminationGracePeriodSeconds": 120}
BUILTIN_POD_SECURITY_CONTEXT: Mapping[str, Any] = {
    "runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID, "fsGroup": TRAINER_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
BUILTIN_SHM_SIZE = "2Gi"
#: The node-local data cache of each pod (checked tables, fetched images): a volume source.
BUILTIN_CACHE_VOLUME: Mapping[str, Any] = {"emptyDir": {}}


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Settings that shape every rendered training pod, plus the operator's own knobs."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    #: POD_FIELDS used when a TrainJob's scheduling does not set them (or merged under its own).
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(BUILTIN_DEFAULTS))
    #: POD_FIELDS forced by the platform team, over whatever the TrainJob says.
    enforced: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pod_security_context: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(BUILTIN_POD_SECURITY_CONTEXT))
    #: Size of the in-memory /dev/shm for data-loader workers and NCCL; empty disables it.
    shm_size: str = BUILTIN_SHM_SIZE
    #: Volume source mounted at contract.CACHE_MOUNT for the data cache (when a TrainJob sets no
    #: spec.data.cache); empty: no volume, the trainer's home folder.
    cache_volume: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(BUILTIN_CACHE_VOLUME))
    #: torchrun rendezvous port on the index-0 pod.
    master_port: int = 29500
    #: Every TrainJob not finished is reconciled at least this often (seconds), so a change
    #: whose event was lost (an API outage, retries given up) is still seen.
    resync_seconds: float = 120.0
    #: Reconciles at once (threads waiting on the API server); a quarter of them serve resyncs.
    reconcile_workers: int = 16
    #: The hang watchdog: restart a Running job whose progress is older than this (0: off).
    hang_seconds: float = 1800.0
    #: Seconds between the trainer's progress patches (passed to the pods).
    status_interval_seconds: float = 20.0
    metrics_port: int = 8081
    watch_namespaces: tuple[str, ...] = ()
    #: Delete finished TrainJobs that set no spec.scheduling.ttlSecondsAfterFinished this long
    #: after they finished (None: keep them).
    ttl_seconds_after_finished: Optional[float] = None
    #: What a TrainJob may pass to its pods beyond the CRD's own limits (see :mod:`.policy`).
    policy: Policy = Policy()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OperatorConfig":
        env = os.environ if env is None else env
        defaults = _json_object(env, ENV_DEFAULTS)
        shm_size = str(defaults.pop("shmSize", BUILTIN_SHM_SIZE) or "")
        security = defaults.pop("podSecurityContext", None)
        cache_volume = defaults.pop("cacheVolume", BUILTIN_CACHE_VOLUME) or {}
        if not isinstance(cache_volume, dict) or len(cache_volume) > 1:
            raise ValueError(f"{ENV_DEFAULTS}: cacheVolume must be one volume source, e.g. {{emptyDir: {{}}}}, "
                             f"got {cache_volume!r} (in Helm values, `emptyDir: null` drops the default)")
        namespaces = tuple(n.strip() for n in env.get(ENV_WATCH_NAMESPACES, "").split(",") if n.strip())
        return cls(
            trainer_image=env.get(ENV_TRAINER_IMAGE) or DEFAULT_TRAINER_IMAGE,
            image_pull_policy=env.get(ENV_TRAINER_PULL_POLICY) or "IfNotPresent",
            defaults={**BUILTIN_DEFAULTS, **pod_fields(defaults, ENV_DEFAULTS)},
            enforced=pod_fields(_json_object(env, ENV_ENFORCED), ENV_ENFORCED),
            pod_security_context=BUILTIN_POD_SECURITY_CONTEXT if security is None else security,
            shm_size=shm_size,
            cache_volume=cache_volume,
            resync_seconds=float(env.get(ENV_RESYNC) or cls.resync_seconds),
            reconcile_workers=max(1, int(env.get(ENV_RECONCILE_WORKERS) or cls.reconcile_workers)),
            hang_seconds=float(env.get(ENV_HANG) or cls.hang_seconds),
            status_interval_seconds=float(env.get(ENV_STATUS_INTERVAL) or cls.status_interval_seconds),
            metrics_port=int(env.get(ENV_METRICS_PORT) or 8081),
            master_port=int(env.get(ENV_MASTER_PORT) or cls.master_port),
            watch_namespaces=namespaces,
            ttl_seconds_after_finished=_seconds(env, ENV_TTL),
            policy=Policy.from_values(_json_object(env, ENV_POLICY), ENV_POLICY),
        )

    def hang_after(self) -> float | None:
        return self.hang_seconds or None


def _seconds(env: Mapping[str, str], name: str) -> Optional[float]:
    """A non-negative number of seconds, or None when unset or empty."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {raw!r}")
    return value


def _json_object(env: Mapping[str, str], name: str) -> dict[str, Any]:
    value = json.loads(env.get(name) or "{}")
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")
    return value


def pod_fields(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The set (non-empty) POD_FIELDS of a chart value, with imagePullSecrets as objects.

    An unknown key is an error naming it: a typo in the chart must not silently do nothing.
    """
    unknown = sorted(set(values) - set(POD_FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown pod setting(s) {', '.join(unknown)}; known: {', '.join(POD_FIELDS)}")
    out = {k: v for k, v in values.items() if v not in (None, "", [], {})}
    if "imagePullSecrets" in out:  # the chart also takes plain names
        out["imagePullSecrets"] = [s if isinstance(s, dict) else {"name": s} for s in out["imagePullSecrets"]]
    return out
