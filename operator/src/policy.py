"""What the platform lets a TrainJob author pass to the training pods, checked. Pure.

The CRD rejects, for everyone, the env names the launcher, the trainer's interpreter, the
dynamic loader and the trainer's API access depend on. What is left depends on the cluster, so
the chart's allow-lists (:class:`Policy`) limit it further:

- ``trainer.allowedEnvValueFrom``: the sources a ``spec.scheduling.env[].valueFrom`` may name,
  each a kind (``fieldRef``, ``resourceFieldRef``, ``configMapKeyRef``, ``secretKeyRef``: any
  object of it) or ``<kind>:<name>`` (that ConfigMap or Secret only). ``spec.storageSecretRef``
  passes keys of a Secret too, so its Secret must be allowed as ``secretKeyRef``.
- ``trainer.allowedPodAnnotationPrefixes``: the prefixes a ``spec.scheduling.podAnnotations``
  key must start with (AppArmor's ``container.apparmor.security.beta.kubernetes.io/`` would
  otherwise turn the profile off).

Unset (None), a list allows anything, as before; an empty list allows nothing. Only the
TrainJob's own settings are checked: the chart's defaults and enforced settings are the
platform's. A TrainJob that breaks the policy fails (reason PolicyViolation) with one message
per field, before anything runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional

VALUE_FROM_KINDS = ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef")


@dataclasses.dataclass(frozen=True)
class Policy:
    """The chart's allow-lists (None: no limit)."""

    env_value_from: Optional[tuple[str, ...]] = None
    pod_annotation_prefixes: Optional[tuple[str, ...]] = None

    @classmethod
    def from_values(cls, values: Mapping[str, Any], source: str) -> "Policy":
        """From the chart's JSON (``allowedEnvValueFrom``, ``allowedPodAnnotationPrefixes``)."""
        unknown = sorted(set(values) - {"allowedEnvValueFrom", "allowedPodAnnotationPrefixes"})
        if unknown:
            raise ValueError(f"{source}: unknown policy setting(s) {', '.join(unknown)}")
        sources = _tuple(values.get("allowedEnvValueFrom"))
        for entry in sources or ():
            if entry.split(":", 1)[0] not in VALUE_FROM_KINDS:
                raise ValueError(f"{source}: allowedEnvValueFrom entry {entry!r} is not one of "
                                 f"{', '.join(VALUE_FROM_KINDS)}, optionally followed by :<name>")
        return cls(env_value_from=sources, pod_annotation_prefixes=_tuple(values.get("allowedPodAnnotationPrefixes")))

    def allows_source(self, kind: str, name: Optional[str]) -> bool:
        if self.env_value_from is None:
            return True
        return kind in self.env_value_from or (name is not None and f"{kind}:{name}" in self.env_value_from)


def _tuple(value: Optional[Iterable[str]]) -> Optional[tuple[str, ...]]:
    return None if value is None else tuple(str(v) for v in value)


def violations(spec: Mapping[str, Any], policy: Policy) -> list[str]:
    """What in ``spec`` the policy does not allow, one message per field (empty: all allowed)."""
    sched = spec.get("scheduling") or {}
    out = []
    for i, env in enumerate(sched.get("env") or []):
        for kind, ref in (env.get("valueFrom") or {}).items():
            name = ref.get("name") if isinstance(ref, Mapping) else None
            if not policy.allows_source(kind, name):
                what = f"{kind} {name!r}" if name else kind
                out.append(f"spec.scheduling.env[{i}].valueFrom.{kind}: {what} is not allowed here "
                           f"(the platform allows {_allowed(policy.env_value_from)})")
    secret = (spec.get("storageSecretRef") or {}).get("name")
    if secret and not policy.allows_source("secretKeyRef", secret):
        out.append(f"spec.storageSecretRef.name: Secret {secret!r} is not allowed here "
                   f"(the platform allows {_allowed(policy.env_value_from)})")
    prefixes = policy.pod_annotation_prefixes
    for key in sorted((sched.get("podAnnotations") or {}) if prefixes is not None else ()):
        if not any(key.startswith(p) for p in prefixes):
            out.append(f"spec.scheduling.podAnnotations[{key}]: this annotation is not allowed here "
                       f"(allowed prefixes: {_allowed(prefixes)})")
    return out


def _allowed(entries: Optional[tuple[str, ...]]) -> str:
    return ", ".join(entries) if entries else "none"
