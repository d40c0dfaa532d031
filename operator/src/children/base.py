"""The base children of a TrainJob: everything but the worker Jobs (ServiceAccount, Role,
RoleBinding, the headless Service, the ConfigMap with the TrainJob). Pure."""

from __future__ import annotations

import copy
from typing import Any, Mapping

import yaml

from kontrast.api import API_VERSION, GROUP, KIND, PLURAL

from ..config import OperatorConfig
from .names import (CONFIG_KEY, LABEL_COMPONENT, configmap_name, metadata, role_name, selector_labels,
                    service_account_name, service_name)

#: The base children's kinds, in the order they are created (the binding after its Role).
BASE_KINDS = ("ServiceAccount", "Role", "RoleBinding", "Service", "ConfigMap")


def service_account(tj: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(tj, service_account_name(tj["metadata"]["name"]), "rbac"),
    }


def role(tj: Mapping[str, Any]) -> dict[str, Any]:
    """Only get and patch on this one TrainJob's status: what the rank-0 status reporter needs."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(tj, role_name(tj["metadata"]["name"]), "rbac"),
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
        "metadata": metadata(tj, role_name(name), "rbac"),
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
        "metadata": metadata(tj, service_name(tj["metadata"]["name"]), "network"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {**selector_labels(tj), LABEL_COMPONENT: "worker"},
            "ports": [{"name": "rendezvous", "port": config.master_port, "targetPort": config.master_port,
                       "protocol": "TCP"}],
        },
    }


#: The TrainJob annotations the trainer reads (``kontrast.dev/generate-example-data``); no other
#: annotation reaches the pods (Argo CD's and kubectl's are no business of the trainer's).
TRAINER_ANNOTATION_PREFIX = "kontrast.dev/"


def trainjob_document(tj: Mapping[str, Any]) -> str:
    """The TrainJob as the trainer reads it: apiVersion, kind, name, namespace, uid (the
    checkpoints' run identity: another TrainJob's checkpoints are refused), the ``kontrast.dev/``
    annotations, and the spec unchanged."""
    meta = tj["metadata"]
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith(TRAINER_ANNOTATION_PREFIX)}
    doc = {
        "apiVersion": tj.get("apiVersion", API_VERSION),
        "kind": tj.get("kind", KIND),
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                     **({"annotations": annotations} if annotations else {})},
        "spec": copy.deepcopy(tj["spec"]),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def configmap(tj: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(tj, configmap_name(tj["metadata"]["name"]), "config"),
        "data": {CONFIG_KEY: trainjob_document(tj)},
    }


def base_children(tj: Mapping[str, Any], config: OperatorConfig) -> list[dict[str, Any]]:
    """Everything but the worker Job, in the order of :data:`BASE_KINDS`."""
    return [service_account(tj), role(tj), role_binding(tj), service(tj, config), configmap(tj)]

