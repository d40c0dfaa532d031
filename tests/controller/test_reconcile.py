"""reconcile.Reconciler with an in-memory API (the thin edge's orchestration), plus the
operator's entry point arguments."""

from __future__ import annotations

import datetime as dt

import pytest

from kontrast.operator import render
from kontrast.operator.__main__ import kopf_args
from kontrast.operator.config import OperatorConfig
from kontrast.operator.kube import ChildConflict
from kontrast.operator.reconcile import Reconciler

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


class FakeKube:
    def __init__(self, tj, fail_kind=None):
        self.tj = tj
        self.objects: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple] = []
        self.fail_kind = fail_kind

    def get_trainjob(self, ns, name):
        return self.tj

    def list_jobs(self, tj):
        return [o for (k, _), o in self.objects.items() if k == "Job" and not o["metadata"].get("gone")]

    def list_pods(self, tj):
        return []

    def create(self, obj):
        key = (obj["kind"], obj["metadata"]["name"])
        self.calls.append(("create",) + key)
        if obj["kind"] == self.fail_kind:
            raise ChildConflict(f"{obj['kind']} {obj['metadata']['name']} exists and is not ours")
        if key in self.objects:
            return False
        self.objects[key] = obj
        return True

    def delete_job(self, ns, name):
        self.calls.append(("delete", "Job", name))
        return self.objects.pop(("Job", name), None) is not None

    def delete_children(self, objs):
        for o in objs:
            self.calls.append(("delete", o["kind"], o["metadata"]["name"]))
            self.objects.pop((o["kind"], o["metadata"]["name"]), None)

    def patch_trainjob_status(self, ns, name, patch):
        self.calls.append(("status", tuple(sorted(patch))))
        st = self.tj.setdefault("status", {})
        for k, v in patch.items():
            if v is None:
                st.pop(k, None)
            else:
                st[k] = v


def tj(**sched):
    return {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": "clip", "namespace": "ml", "uid": "u1", "generation": 1},
            "spec": {"nodes": 2, "trainData": "a.csv", "output": "out",
                     "scheduling": {"maxRestarts": 3, "suspend": False, "cleanup": "OnSuccess", **sched}}}


def test_create_then_idempotent():
    kube = FakeKube(tj())
    events = []
    rec = Reconciler(kube, OperatorConfig(), post_event=lambda t, *e: events.append(e))
    rec.reconcile("ml", "clip", NOW)
    assert sorted(k for k, _ in kube.objects) == sorted(["ServiceAccount", "Role", "RoleBinding", "Service",
                                                         "ConfigMap", "Job"])
    assert kube.tj["status"]["phase"] == "Pending"
    assert events == [("Normal", "Created", "created the worker Job clip-0 for 2 node(s)")]
    kube.calls.clear()
    rec.reconcile("ml", "clip", NOW)
    assert not [c for c in kube.calls if c[0] in ("create", "delete")]


def test_create_failure_is_reported_in_status_and_raised():
    kube = FakeKube(tj(), fail_kind="Service")
    events = []
    rec = Reconciler(kube, OperatorConfig(), post_event=lambda t, *e: events.append(e))
    with pytest.raises(ChildConflict):
        rec.reconcile("ml", "clip", NOW)
    created = {c["type"]: c for c in kube.tj["status"]["conditions"]}["Created"]
    assert created["status"] == "False" and created["reason"] == "CreateFailed"
    assert "not ours" in created["message"]
    assert events[-1][:2] == ("Warning", "CreateFailed")
    assert rec.metrics.reconciles["error"] == 1


def test_cleanup_deletes_children_but_never_the_trainjob():
    kube = FakeKube(tj())
    rec = Reconciler(kube, OperatorConfig())
    rec.reconcile("ml", "clip", NOW)
    job = kube.objects[("Job", "clip-0")]
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "completionTime": "2026-01-01T01:00:00Z"}
    rec.reconcile("ml", "clip", NOW)
    assert kube.tj["status"]["phase"] == "Succeeded"
    assert kube.objects == {}
    deleted = [c[1] for c in kube.calls if c[0] == "delete"]
    assert "TrainJob" not in deleted and deleted[-1] == "ServiceAccount"
    assert rec.metrics.phases()["Succeeded"] == 1


def test_kopf_args():
    assert kopf_args(OperatorConfig(), "http://0.0.0.0:8080/healthz") == [
        "run", "--standalone", "-m", "kontrast.operator.handlers", "--all-namespaces",
        "--liveness", "http://0.0.0.0:8080/healthz"]
    args = kopf_args(OperatorConfig(watch_namespaces=("a", "b")), None, ["--verbose"])
    assert args == ["run", "--standalone", "-m", "kontrast.operator.handlers", "--namespace", "a",
                    "--namespace", "b", "--verbose"]


def test_metrics_text():
    rec = Reconciler(FakeKube(tj()), OperatorConfig())
    rec.reconcile("ml", "clip", NOW)
    text = rec.metrics.render()
    assert 'kontrast_operator_reconciles_total{result="ok"} 1' in text
    assert 'kontrast_trainjobs{phase="Pending"} 1' in text
    assert "# TYPE kontrast_trainjobs gauge" in text


def test_child_labels_select_only_this_trainjob():
    assert render.selector_labels(tj()) == {"kontrast.dev/trainjob": "clip"}
