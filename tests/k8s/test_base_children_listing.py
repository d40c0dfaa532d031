"""The operator's listing of base children (what its resync trusts instead of the watches'
memory) against the real API server: one LIST per kind finds every TrainJob's children by their
controller, and a child deleted unseen is missing from the next listing."""

from __future__ import annotations

import copy

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
        children = base_children(tj, OperatorConfig())
        # One more ConfigMap of the same kind and owner under a name no operator renders: an
        # operator running in this test session repairs a deleted listed-trainjob at once.
        extra = copy.deepcopy(next(c for c in children if c["kind"] == "ConfigMap"))
        extra["metadata"]["name"] = "listed-extra"
        for child in [*children, extra]:
            kube.create(child)
        uid = tj["metadata"]["uid"]
        seen = kube.base_children_seen([namespace])[uid]
        assert {kind for kind, _ in seen} == set(BASE_KINDS) and ("ConfigMap", "listed-extra") in seen
        assert kube.base_children_seen()[uid] == seen  # cluster-wide, the same
        admin.delete(f"/api/v1/namespaces/{namespace}/configmaps/listed-extra")
        assert kube.base_children_seen([namespace])[uid] == seen - {("ConfigMap", "listed-extra")}
    finally:
        kube.close()
