"""The operator's own settings: what the Helm chart's values become.

Read once from environment variables (the chart sets them on the Deployment), so rendering
stays a pure function of (TrainJob, OperatorConfig).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from kontrast import __version__, contract

DEFAULT_TRAINER_IMAGE = f"ghcr.io/kontrast/trainer:{__version__}"

#: Environment variables the Helm chart sets on the operator Deployment.
ENV_TRAINER_IMAGE = "KONTRAST_TRAINER_IMAGE"
ENV_TRAINER_PULL_POLICY = "KONTRAST_TRAINER_IMAGE_PULL_POLICY"
ENV_DEFAULTS = "KONTRAST_POD_DEFAULTS"  # JSON object, see PodDefaults
ENV_WATCH_NAMESPACES = "KONTRAST_WATCH_NAMESPACES"  # comma-separated; empty = all namespaces
ENV_RESYNC = "KONTRAST_RESYNC_SECONDS"  # every TrainJob not finished is reconciled this often
ENV_HANG = "KONTRAST_HANG_SECONDS"  # restart a Running job whose progress is older (0: never)
ENV_STATUS_INTERVAL = contract.STATUS_INTERVAL_ENV  # the trainer's progress patch interval
ENV_METRICS_PORT = "KONTRAST_METRICS_PORT"  # 0 disables the /metrics endpoint
ENV_KUBECONFIG = "KONTRAST_OPERATOR_KUBECONFIG"  # else KUBECONFIG, else in-cluster


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Settings that shape every rendered training pod, plus the operator's own knobs."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    #: Used when a TrainJob's scheduling does not set them.
    default_resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    default_node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    default_tolerations: tuple[Mapping[str, Any], ...] = ()
    default_priority_class: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    pod_security_context: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Size of the in-memory /dev/shm for data-loader workers and NCCL; empty disables it.
    shm_size: str = "2Gi"
    #: torchrun rendezvous port on the index-0 pod.
    master_port: int = 29500
    #: Every TrainJob not finished is reconciled at least this often (seconds), so a change
    #: whose event was lost (an API outage, retries given up) is still seen.
    resync_seconds: float = 120.0
    #: The hang watchdog: restart a Running job whose progress is older than this (0: off).
    hang_seconds: float = 1800.0
    #: Seconds between the trainer's progress patches (passed to the pods).
    status_interval_seconds: float = 20.0
    metrics_port: int = 8081
    watch_namespaces: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OperatorConfig":
        env = os.environ if env is None else env
        defaults = json.loads(env.get(ENV_DEFAULTS) or "{}")
        if not isinstance(defaults, dict):
            raise ValueError(f"{ENV_DEFAULTS} must be a JSON object")
        namespaces = tuple(n.strip() for n in env.get(ENV_WATCH_NAMESPACES, "").split(",") if n.strip())
        return cls(
            trainer_image=env.get(ENV_TRAINER_IMAGE) or DEFAULT_TRAINER_IMAGE,
            image_pull_policy=env.get(ENV_TRAINER_PULL_POLICY) or "IfNotPresent",
            default_resources=defaults.get("resources") or {},
            default_node_selector=defaults.get("nodeSelector") or {},
            default_tolerations=tuple(defaults.get("tolerations") or ()),
            default_priority_class=defaults.get("priorityClassName") or None,
            image_pull_secrets=tuple(defaults.get("imagePullSecrets") or ()),
            pod_security_context=defaults.get("podSecurityContext") or {},
            shm_size=str(defaults.get("shmSize", "2Gi") or ""),
            resync_seconds=float(env.get(ENV_RESYNC) or cls.resync_seconds),
            hang_seconds=float(env.get(ENV_HANG) or cls.hang_seconds),
            status_interval_seconds=float(env.get(ENV_STATUS_INTERVAL) or cls.status_interval_seconds),
            metrics_port=int(env.get(ENV_METRICS_PORT) or 8081),
            watch_namespaces=namespaces,
        )

    def hang_after(self) -> float | None:
        return self.hang_seconds or None
