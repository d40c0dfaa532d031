"""``spec.scheduling``: one typed, frozen object built from the CRD-defaulted spec. Pure Python.

The CRD (crds/trainjob.yaml) is the only place a default is written: ``Scheduling.from_spec``
applies its defaults exactly as the API server does and maps each camelCase field to the
snake_case field of the same name (``maxRestarts`` -> ``max_restarts``). The free-form pod
settings (resources, nodeSelector, tolerations, ...) stay JSON, frozen: maps become read-only
mappings and lists tuples; :func:`thaw` turns them back into the plain JSON a manifest holds.
tests/api/test_scheduling.py checks that every CRD ``spec.scheduling`` property has a field
and no field lacks a property.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .defaults import apply_defaults

JSONMap = Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class Scheduling:
    # The training pods: image and the settings the chart may default or enforce.
    image: Optional[str] = None                 #: else the operator's trainer image
    image_pull_policy: Optional[str] = None     #: Always | IfNotPresent | Never
    resources: Optional[JSONMap] = None
    node_selector: Optional[JSONMap] = None
    tolerations: Optional[tuple[JSONMap, ...]] = None
    priority_class_name: Optional[str] = None
    scheduler_name: Optional[str] = None
    affinity: Optional[JSONMap] = None
    topology_spread_constraints: Optional[tuple[JSONMap, ...]] = None
    pod_labels: Optional[JSONMap] = None
    pod_annotations: Optional[JSONMap] = None
    env: Optional[tuple[JSONMap, ...]] = None
    image_pull_secrets: Optional[tuple[JSONMap, ...]] = None
    termination_grace_period_seconds: Optional[int] = None

    # Admission and lifecycle.
    queue_name: Optional[str] = None            #: the Kueue LocalQueue (None: no Kueue)
    max_restarts: int                           #: restarts a failure may spend (disruptions spend none)
    active_deadline_seconds: Optional[int] = None
    suspend: bool
    cleanup: str                                #: Always | OnSuccess | Never
    ttl_seconds_after_finished: Optional[int] = None  #: delete the TrainJob this long after it finished

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "Scheduling":
        """``spec.scheduling`` of a TrainJob spec, with the CRD's defaults (any spec will do)."""
        defaulted = apply_defaults({"spec": {"scheduling": dict(spec.get("scheduling") or {})}})
        return cls(**{field_name(key): freeze(value) for key, value in defaulted["spec"]["scheduling"].items()})

    def cleans_up(self, succeeded: bool) -> bool:
        """Whether the children go once the job finished (``succeeded`` or not)."""
        return self.cleanup == "Always" or (self.cleanup == "OnSuccess" and succeeded)


def field_name(spec_key: str) -> str:
    """The field of a camelCase spec key: ``maxRestarts`` -> ``max_restarts``."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", spec_key).lower()


def freeze(value: Any) -> Any:
    """JSON made read-only: maps as read-only mappings, lists as tuples, all the way down."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Frozen JSON as plain dicts and lists again (what a manifest holds)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value
