"""Structural defaulting, as kube-apiserver applies it to custom resources.

The server prunes nulls of non-nullable fields, then fills every absent property that has a
`default`, recursing into objects (also into ones it just defaulted), array items and map
values. Doing exactly the same here lets `kontrast train` and `kontrast validate
--show-defaults` see the object the cluster will store.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from .schema import openapi_schema


def apply_defaults(obj: dict[str, Any]) -> dict[str, Any]:
    """Return a defaulted deep copy of a TrainJob object."""
    result = copy.deepcopy(obj)
    _default(result, openapi_schema())
    return result


def defaulted_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A defaulted deep copy of a TrainJob spec (any spec will do: nothing is validated)."""
    return apply_defaults({"spec": dict(spec)})["spec"]


def _default(value: Any, schema: dict[str, Any]) -> None:
    if isinstance(value, dict):
        props = schema.get("properties")
        if props:
            for name in [k for k, v in value.items() if v is None]:
                if name in props and not props[name].get("nullable", False):
                    del value[name]
            for name, prop in props.items():
                if name not in value and "default" in prop:
                    value[name] = copy.deepcopy(prop["default"])
            for name, child in value.items():
                if name in props:
                    _default(child, props[name])
        elif isinstance(schema.get("additionalProperties"), dict):
            for child in value.values():
                _default(child, schema["additionalProperties"])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for child in value:
            _default(child, schema["items"])
