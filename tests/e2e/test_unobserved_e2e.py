"""What the operator is never told, against the real control plane: base children that vanish
while the API server restarts (its watches list again, and a list sends no DELETED)."""

from __future__ import annotations

import pytest

from harness.kube import ApiError
from harness.waiting import wait_for
from kontrast.operator.children.names import configmap_name, role_name

from e2e.support import trainjob

pytestmark = pytest.mark.e2e


def _uid(kube, path: str):
    try:
        return kube.get(path)["metadata"]["uid"]
    except ApiError as e:
        if e.status == 404:
            return None
        raise


def test_base_children_gone_during_an_api_server_restart_are_recreated(control_plane, tjs, tiny):
    """After the restart the operator's watches get 410 Gone and list again: no DELETED for
    the ConfigMap and the Role, so only the resync's own listing of base children finds them
    missing."""
    # Never scheduled (no node matches): the children exist, no pod spends the CPU.
    tjs.create(trainjob("relisted", tiny, nodes=1, scheduling={"nodeSelector": {"pool": "nowhere"}}))
    paths = {f"/registry/configmaps/{tjs.ns}/{configmap_name('relisted')}":
             f"/api/v1/namespaces/{tjs.ns}/configmaps/{configmap_name('relisted')}",
             f"/registry/roles/{tjs.ns}/{role_name('relisted')}":
             f"/apis/rbac.authorization.k8s.io/v1/namespaces/{tjs.ns}/roles/{role_name('relisted')}"}

    def uids():
        found = {p: _uid(tjs.kube, p) for p in paths.values()}
        return all(found.values()) and found
    old = wait_for(uids, 120, "the base children")
    # Several round trips after the children's ADDED events: the operator's watches know them.
    wait_for(lambda: "unschedulable" in (tjs.status("relisted").get("message") or ""), 120,
             "the operator to report the unschedulable pod")
    with control_plane.apiserver_down():
        for key in paths:
            assert control_plane.etcd_delete(key) == 1, key
    wait_for(lambda: all(_uid(tjs.kube, p) not in (None, old[p]) for p in paths.values()), 120,
             "the ConfigMap and the Role to be created again")
