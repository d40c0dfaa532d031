"""The operator's lifecycle decisions under churn, against the real control plane with real
training pods: pods matched by their Job's uid, a new attempt held while older pods live,
children repaired mid-run, the periodic resync, pods that cannot be created, terminal status
written before cleanup."""

from __future__ import annotations

import threading
import time

import pytest

from harness.kube import ApiError
from harness.waiting import wait_for

from e2e.support import TJ_PATH, trainjob

pytestmark = pytest.mark.e2e


def live(pods: list[dict]) -> list[dict]:
    return [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]


class OverlapWatch:
    """Polls the pods of one TrainJob and records any moment at which pods of two different
    Jobs were alive (running or starting) at once."""

    def __init__(self, tjs, name: str):
        self.tjs, self.name = tjs, name
        self.overlaps: list[list[str]] = []
        self.owners_seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "OverlapWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                running = [p for p in self.tjs.pods(self.name) if p["status"].get("phase") == "Running"]
            except Exception:  # noqa: BLE001 - a transient API error; poll again
                time.sleep(0.2)
                continue
            owners = {p["metadata"]["ownerReferences"][0]["uid"] for p in running}
            self.owners_seen |= owners
            if len(owners) > 1:
                self.overlaps.append(sorted(p["metadata"]["name"] for p in running))
            time.sleep(0.2)


def test_deleted_job_starts_a_new_attempt_only_after_its_pods_are_gone(tjs, tiny):
    tjs.create(trainjob("orphans", tiny, epochs=60))
    tjs.wait_phase("orphans", "Running")
    with OverlapWatch(tjs, "orphans") as watch:
        # `kubectl delete job`: the Job goes at once, its pods terminate afterwards.
        tjs.kube.delete(f"/apis/batch/v1/namespaces/{tjs.ns}/jobs/orphans-0",
                        body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
        held = wait_for(lambda: [j for j in tjs.jobs("orphans") if j["metadata"]["name"] != "orphans-0"], 60,
                        "a new attempt")[0]
        assert held["metadata"]["labels"]["kontrast.dev/attempt"] == "1"  # above the old pods' attempt
        wait_for(lambda: len([p for p in tjs.pods("orphans", attempt=1) if p["status"].get("phase") == "Running"]) == 2,
                 240, "the new attempt to run")
    assert not watch.overlaps, watch.overlaps[:3]
    st = tjs.wait_phase("orphans", "Running")
    assert st["restarts"] == 0  # the old pods' ends are not failures of the new attempt
    assert tjs.cond("orphans", "Running")["status"] == "True"


def test_trainjob_replaced_under_the_same_name_waits_for_the_old_pods(tjs, tiny):
    """Argo CD's Replace=true: delete and create again at once, same name, new uid."""
    tjs.create(trainjob("replaced", tiny, epochs=60))
    tjs.wait_phase("replaced", "Running")
    old_pods = {p["metadata"]["uid"] for p in tjs.pods("replaced")}
    with OverlapWatch(tjs, "replaced") as watch:
        tjs.delete("replaced")
        wait_for(lambda: not _exists(tjs, "replaced"), 60, "the old TrainJob to go")
        tjs.create(trainjob("replaced", tiny, epochs=60))
        st = tjs.wait_phase("replaced", "Running", timeout=300)
    assert not watch.overlaps, watch.overlaps[:3]
    assert st["restarts"] == 0
    assert not old_pods & {p["metadata"]["uid"] for p in live(tjs.pods("replaced"))}


def _exists(tjs, name: str) -> bool:
    try:
        tjs.get(name)
        return True
    except ApiError as e:
        if e.status == 404:
            return False
        raise


def test_deleted_rolebinding_is_recreated_and_owned_status_is_resynced(tjs, tiny):
    tjs.create(trainjob("repair", tiny, epochs=60))
    wait_for(lambda: ((tjs.status("repair").get("progress") or {}).get("step") or 0) >= 1, 300, "progress")
    path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{tjs.ns}/rolebindings/repair-trainer"
    old_uid = tjs.kube.get(path)["metadata"]["uid"]
    tjs.kube.delete(path)
    wait_for(lambda: _uid(tjs, path) not in (None, old_uid), 60, "the RoleBinding to be created again")
    # The trainer's status reports go through again (it keeps trying with the newest state).
    step = (tjs.status("repair").get("progress") or {}).get("step") or 0
    wait_for(lambda: ((tjs.status("repair").get("progress") or {}).get("step") or 0) > step, 120,
             "progress reports after the repair")
    # A change to operator-owned status that no watch reports is corrected by the resync.
    tjs.kube.patch(f"{TJ_PATH.format(ns=tjs.ns)}/repair/status", {"status": {"message": "tampered"}})
    wait_for(lambda: tjs.status("repair").get("message") != "tampered", 60, "the resync to correct status")
    assert tjs.status("repair")["phase"] == "Running"


def _uid(tjs, path: str):
    try:
        return tjs.kube.get(path)["metadata"]["uid"]
    except ApiError as e:
        if e.status == 404:
            return None
        raise


def test_quota_blocked_pods_say_why_then_train_and_terminal_is_written_first(control_plane, tjs, tiny):
    quota_path = f"/api/v1/namespaces/{tjs.ns}/resourcequotas"
    tjs.kube.post(quota_path, {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"},
                               "spec": {"hard": {"pods": "0"}}})
    wait_for(lambda: (tjs.kube.get(f"{quota_path}/no-pods").get("status") or {}).get("hard"), 60,
             "the quota controller to count")
    tjs.create(trainjob("quota", tiny, epochs=1))
    created = wait_for(lambda: (c := tjs.cond("quota", "Created")) and c["status"] == "False" and c, 120,
                       "the Created condition to say why")
    assert created["reason"] == "FailedCreate" and "exceeded quota" in created["message"], created
    st = tjs.status("quota")
    assert st["phase"] == "Pending" and "exceeded quota" in st["message"]
    assert any(e["reason"] == "FailedCreate" for e in tjs.events("quota"))

    # Record the order of writes from watches: resourceVersions come from one etcd revision
    # counter, so they order the TrainJob's Succeeded and the Job's deletion.
    first = {}
    jobs_path, tj_path = f"/apis/batch/v1/namespaces/{tjs.ns}/jobs", TJ_PATH.format(ns=tjs.ns)
    watchers = [threading.Thread(target=_first_rv, args=(tjs.kube, tj_path, first, "succeeded",
                                                         lambda e: e["object"].get("status", {}).get("phase") == "Succeeded"),
                                 daemon=True),
                threading.Thread(target=_first_rv, args=(tjs.kube, jobs_path, first, "job_deleted",
                                                         lambda e: e["type"] == "DELETED"
                                                         or e["object"]["metadata"].get("deletionTimestamp")),
                                 daemon=True)]
    for w in watchers:
        w.start()
    tjs.kube.delete(f"{quota_path}/no-pods")
    tjs.wait_phase("quota", "Succeeded", timeout=400)
    assert tjs.cond("quota", "Created")["status"] == "True"
    for w in watchers:
        w.join(60)
    assert set(first) == {"succeeded", "job_deleted"}, first
    assert first["succeeded"] < first["job_deleted"], f"the Job was deleted before Succeeded was written: {first}"
    # Terminal stays terminal: the children are gone, resyncs come and go, nothing restarts.
    wait_for(lambda: not tjs.children("quota"), 60, "cleanup")
    time.sleep(12)
    assert not tjs.children("quota") and tjs.status("quota")["phase"] == "Succeeded"


def _first_rv(kube, path: str, out: dict, key: str, match) -> None:
    """Watch ``path`` from now; store the resourceVersion of the first event ``match`` accepts."""
    rv = kube.get(path)["metadata"]["resourceVersion"]
    deadline = time.monotonic() + 400
    while key not in out and time.monotonic() < deadline:
        for event in kube.watch(path, rv, timeout_seconds=20):
            if event["type"] == "BOOKMARK":
                continue
            rv = event["object"]["metadata"]["resourceVersion"]
            if match(event):
                out[key] = int(rv)
                return


def test_a_job_deleted_with_its_pods_while_the_operator_is_down_comes_back_as_a_new_attempt(tjs, operator, tiny):
    """Attempt numbers only grow: status.attempt remembers the newest when no Job or pod does."""
    tjs.create(trainjob("renumbered", tiny, nodes=1, epochs=60))
    tjs.wait_phase("renumbered", "Running")
    operator.stop()
    try:
        tjs.kube.delete(f"/apis/batch/v1/namespaces/{tjs.ns}/jobs/renumbered-0",
                        body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"})
        wait_for(lambda: not tjs.jobs("renumbered") and not tjs.pods("renumbered"), 120,
                 "the Job and its pods to be gone")
    finally:
        operator.start()
    (job,) = wait_for(lambda: tjs.jobs("renumbered"), 60, "the Job to be created again")
    assert job["metadata"]["name"] == "renumbered-1" and job["metadata"]["labels"]["kontrast.dev/attempt"] == "1"
    wait_for(lambda: tjs.status("renumbered").get("attempt") == 1, 30, "status.attempt 1")
