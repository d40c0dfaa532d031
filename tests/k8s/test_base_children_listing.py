"""The operator's listing of base children (what its resync trusts instead of the watches'
memory) against the real API server: one LIST per kind finds every TrainJob's children by their
controller, and a child deleted unseen is missing from the next listing."""

from __future__ import annotations

import pytest
from rulecases import trainjob

from kontrast.operator.children.base import BASE_KINDS, base_children
from kontrast.operator.config import OperatorConfig
from kontrast.operator.kube import Kube, load_configuration

pytestmark = pytest.mark.k8s


def test_every_base_child_is_listed_by_its_trainjob_and_a_deleted_one_is_not(control_plane, namespace):
    admin = control_plane.kube()
    tj = trainjob({})
    tj["metadata"] = {"name": "listed"}
    tj = admin.post(f"/apis/kontrast.dev/v1alpha1/namespaces/{namespace}/trainjobs", tj)
    kube = Kube(load_configuration(str(control_plane.kubeconfig)))
    try:
        for child in base_children(tj, OperatorConfig()):
            kube.create(child)
        uid = tj["metadata"]["uid"]
        seen = kube.base_children_seen([namespace])[uid]
        assert {kind for kind, _ in seen} == set(BASE_KINDS)
        assert kube.base_children_seen()[uid] == seen  # cluster-wide, the same
        admin.delete(f"/api/v1/namespaces/{namespace}/configmaps/listed-trainjob")
        assert {kind for kind, _ in kube.base_children_seen([namespace])[uid]} == set(BASE_KINDS) - {"ConfigMap"}
    finally:
        kube.close()
