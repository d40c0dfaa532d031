"""reconcile.Reconciler with an in-memory API (the thin edge's orchestration), plus the
operator's entry point arguments."""

from __future__ import annotations

import datetime as dt

import pytest

from kontrast.operator.__main__ import kopf_args
from kontrast.operator.children.names import ANNOTATION_PHASE, ANNOTATION_RESTARTS, selector_labels
from kontrast.operator.config import OperatorConfig
from kontrast.operator.kube import ChildConflict
from kontrast.operator.reconcile import Reconciler

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


class FakeKube:
    def __init__(self, tj, fail_kind=None, failed_creates=(), fail_status=False):
        self.tj = tj
        self.objects: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple] = []
        self.fail_kind = fail_kind
        self.failed = list(failed_creates)
        self.fail_status = fail_status

    def failed_creates(self, job):
        self.calls.append(("events", job["metadata"]["name"]))
        return self.failed

    def release_job(self, ns, name, queue=None, unpark=False):
        self.calls.append(("release", name, queue))

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
        obj.setdefault("metadata", {}).setdefault("uid", f"uid-{key[1]}")
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
        if self.fail_status:
            raise RuntimeError("the API server is unavailable")
        st = self.tj.setdefault("status", {})
        for k, v in patch.items():
            if v is None:
                st.pop(k, None)
            else:
                st[k] = v


    def annotate_trainjob(self, ns, name, annotations):
        self.calls.append(("annotate", tuple(sorted(annotations))))
        self.tj["metadata"].setdefault("annotations", {}).update(annotations)


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
    assert selector_labels(tj()) == {"kontrast.dev/trainjob": "clip"}


def test_terminal_status_is_written_before_any_child_is_deleted():
    kube = FakeKube(tj())
    rec = Reconciler(kube, OperatorConfig())
    rec.reconcile("ml", "clip", NOW)
    kube.objects[("Job", "clip-0")]["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    kube.fail_status = True
    with pytest.raises(RuntimeError):
        rec.reconcile("ml", "clip", NOW)
    assert not [c for c in kube.calls if c[0] == "delete"]  # nothing deleted without the record
    assert ("Job", "clip-0") in kube.objects
    kube.fail_status = False
    kube.calls.clear()
    rec.reconcile("ml", "clip", NOW)
    kinds = [c[0] for c in kube.calls if c[0] in ("status", "delete")]
    assert kinds[0] == "status" and "delete" in kinds and kube.tj["status"]["phase"] == "Succeeded"
    kube.calls.clear()
    rec.reconcile("ml", "clip", NOW)  # children gone: Succeeded stays, nothing is created
    assert not [c for c in kube.calls if c[0] == "create"] and kube.tj["status"]["phase"] == "Succeeded"


def test_missing_base_children_are_created_again():
    kube = FakeKube(tj())
    rec = Reconciler(kube, OperatorConfig())
    rec.reconcile("ml", "clip", NOW)
    del kube.objects[("RoleBinding", "clip-trainer")]
    kube.calls.clear()
    rec.reconcile("ml", "clip", NOW, present={"u1": {"ServiceAccount", "Role", "Service", "ConfigMap"}}.get)
    assert [c for c in kube.calls if c[0] == "create"] == [("create", "RoleBinding", "clip-trainer")]
    assert ("RoleBinding", "clip-trainer") in kube.objects
    kube.calls.clear()
    rec.reconcile("ml", "clip", NOW, present={}.get)  # children not seen yet: nothing repaired
    assert not [c for c in kube.calls if c[0] == "create"]


def test_a_restart_creates_only_the_base_children_not_known_to_exist():
    kube = FakeKube(tj())
    rec = Reconciler(kube, OperatorConfig())
    rec.reconcile("ml", "clip", NOW)
    everything = {"ServiceAccount", "Role", "RoleBinding", "Service", "ConfigMap"}
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    kube.objects[("Job", "clip-0")]["status"] = failed
    kube.calls.clear()
    rec.reconcile("ml", "clip", NOW, present={"u1": everything}.get)
    assert [c for c in kube.calls if c[0] == "create"] == [("create", "Job", "clip-1")]
    assert kube.tj["status"]["restarts"] == 1
    # One the watches saw go is created with the new attempt (the repair waits for no pass).
    kube.objects[("Job", "clip-1")]["status"] = failed
    del kube.objects[("ConfigMap", "clip-trainjob")]
    kube.calls.clear()
    rec.reconcile("ml", "clip", NOW, present={"u1": everything - {"ConfigMap"}}.get)
    assert [c for c in kube.calls if c[0] == "create"] == [("create", "ConfigMap", "clip-trainjob"),
                                                           ("create", "Job", "clip-2")]


def test_pods_that_cannot_be_created_say_why_in_the_created_condition():
    quota = 'pods "clip-0-0-x" is forbidden: exceeded quota: none, requested: pods=1, used: pods=0, limited: pods=0'
    kube = FakeKube(tj(), failed_creates=[quota])
    rec = Reconciler(kube, OperatorConfig())
    rec.reconcile("ml", "clip", NOW)
    plan = rec.reconcile("ml", "clip", NOW)
    created = {c["type"]: c for c in kube.tj["status"]["conditions"]}["Created"]
    assert created["status"] == "False" and created["reason"] == "FailedCreate" and "exceeded quota" in created["message"]
    assert "exceeded quota" in kube.tj["status"]["message"]
    assert plan.requeue_after == 15.0  # no event comes when pods cannot be created: look again
    kube.failed = []
    rec.reconcile("ml", "clip", NOW)
    assert {c["type"]: c for c in kube.tj["status"]["conditions"]}["Created"]["status"] == "True"


def test_every_child_watch_is_filtered_by_the_api_server():
    import kopf

    from kontrast.operator import handlers

    settings = kopf.OperatorSettings()
    handlers.scope_watches(settings)
    scoped = {(s.group, s.version, s.any_name): v for s, v in settings.watching.label_selectors.items()}
    assert scoped == {**{key: "kontrast.dev/trainjob" for key in handlers.WATCHED_CHILDREN},
                      handlers.WORKLOADS: "kueue.x-k8s.io/job-uid"}  # only Kueue's Workloads of Jobs
    assert ("", "v1", "pods") in scoped and ("batch", "v1", "jobs") in scoped


def test_a_phase_the_operator_did_not_decide_is_put_back_and_training_goes_on():
    """Without the chart's admission policy the trainer's token can write status.phase; the
    operator decides from its own record (annotations the trainer cannot write)."""
    kube = FakeKube(tj())
    rec = Reconciler(kube, OperatorConfig())
    rec.reconcile("ml", "clip", NOW)
    assert kube.tj["metadata"]["annotations"] == {ANNOTATION_PHASE: "Pending", ANNOTATION_RESTARTS: "0"}
    kube.tj["status"].update(phase="Succeeded", restarts=99)  # forged through trainjobs/status
    kube.calls.clear()
    rec.reconcile("ml", "clip", NOW)
    assert not [c for c in kube.calls if c[0] in ("delete", "create")], kube.calls
    assert ("Job", "clip-0") in kube.objects
    assert kube.tj["status"]["phase"] == "Pending" and kube.tj["status"]["restarts"] == 0
    assert not [c for c in kube.calls if c[0] == "annotate"]  # the record did not change
