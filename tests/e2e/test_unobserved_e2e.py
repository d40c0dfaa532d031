"""What the operator is never told, against the real control plane: base children that vanish
while the API server restarts (its watches list again, and a list sends no DELETED), and a
node that stops reporting while its pod's peers fail (its pod stays Running until evicted)."""

from __future__ import annotations

import datetime as dt

import pytest

from harness.kube import ApiError, Kube
from harness.waiting import wait_for
from kontrast.operator.children.names import ANNOTATION_REASON, configmap_name, role_name

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


def _snapshot(tjs, name: str) -> str:
    st = tjs.status(name)
    jobs = [(j["metadata"]["name"], [c["type"] for c in (j.get("status") or {}).get("conditions") or []],
             (j.get("status") or {}).get("terminating")) for j in tjs.jobs(name)]
    pods = [(p["metadata"]["name"], p["status"].get("phase"), bool(p["metadata"].get("deletionTimestamp")),
             [(c["type"], c["status"], c.get("reason")) for c in p["status"].get("conditions") or []])
            for p in tjs.pods(name)]
    return f"status {st.get('phase')} restarts={st.get('restarts')} {st.get('message')!r}\njobs {jobs}\npods {pods}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_node_that_stops_reporting_is_not_charged_to_the_restart_budget(tjs, node_agent, operator, tiny):
    """The node of worker 1 crashes: its pod stays Running (no kubelet reports) and the node
    controller marks it not Ready; its peer fails. The Job controller (backoffLimit 0) deletes
    the lost pod, a deletion no kubelet finishes, and holds the Job's Failed condition until
    that pod ends, so no failure is counted. The taint manager's eviction (DisruptionTarget)
    then restarts the gang without spending the budget.

    Kubernetes 1.34 never shows a Failed Job beside a Running, undeleted pod, so the rules'
    wait for a not-Ready pod (``rules._node_loss_wait``) is not what keeps the budget here:
    this test passes without it."""
    tjs.create(trainjob("nodeloss", tiny, epochs=60, scheduling={"maxRestarts": 1}))
    tjs.wait_phase("nodeloss", "Running")
    peer, lost = (p["metadata"]["name"] for p in tjs.pods("nodeloss", attempt=0))
    pods = f"/api/v1/namespaces/{tjs.ns}/pods"
    try:
        node_agent.lose_pod(tjs.ns, lost)
        # The node controller's part (off in the harness): Ready False, the kubelet's reason kept.
        tjs.kube.patch(f"{pods}/{lost}/status", {"status": {"conditions": [
            {"type": "Ready", "status": "False", "lastTransitionTime": _now()}]}}, Kube.STRATEGIC)
        node_agent.kill_pod(tjs.ns, peer)
        try:
            wait_for(lambda: _failing_job_seen(tjs, "nodeloss", lost), 120,
                     "the Job controller to delete the lost pod and the operator to see it")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_snapshot(tjs, 'nodeloss')}") from None
        assert [j["metadata"]["name"] for j in tjs.jobs("nodeloss")] == ["nodeloss-0"], _snapshot(tjs, "nodeloss")
        assert tjs.status("nodeloss").get("restarts", 0) == 0, _snapshot(tjs, "nodeloss")

        # The taint manager evicts it: DisruptionTarget (the pod's deletion is already asked).
        tjs.kube.patch(f"{pods}/{lost}/status", {"status": {"conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
             "message": "Taint manager: deleting due to NoExecute taint", "lastTransitionTime": _now()}]}},
            Kube.STRATEGIC)
        new = wait_for(lambda: tjs.jobs("nodeloss")[1:], 120, "a new attempt")[0]
        assert new["metadata"]["annotations"][ANNOTATION_REASON] == "Disrupted", new["metadata"]
        assert new["spec"]["suspend"], "held while the lost pod has not ended"
        assert tjs.status("nodeloss").get("restarts", 0) == 0, _snapshot(tjs, "nodeloss")
    finally:  # no kubelet confirms the lost pod's end: remove it as `kubectl delete --force` would
        tjs.kube.delete(f"{pods}/{lost}", body={"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})
    wait_for(lambda: not tjs.jobs("nodeloss")[-1]["spec"]["suspend"], 60, "the new attempt to be released")
    assert tjs.status("nodeloss").get("restarts", 0) == 0


def _failing_job_seen(tjs, name: str, lost: str) -> bool:
    """The Job failing (FailureTarget), the lost pod deleted, and the operator's status since."""
    (job,) = tjs.jobs(name)
    conditions = {c["type"] for c in (job.get("status") or {}).get("conditions") or []}
    deleting = any(p["metadata"]["name"] == lost and p["metadata"].get("deletionTimestamp") for p in tjs.pods(name))
    return "FailureTarget" in conditions and deleting and tjs.status(name).get("message") == "0 of 2 node(s) running"
