"""TrainJobs queued by the real Kueue manager: quota, queueing, preemption, queue changes.

The queue objects are examples/kueue/queues.yaml and the TrainJobs take their labels and
`scheduling` from examples/kueue/trainjob.yaml, both applied as the README shows them; only the
data paths point at the tests' tiny data set.
"""

from __future__ import annotations

import copy
import signal
import threading
from pathlib import Path

import pytest
import yaml

from harness.kube import ApiError
from harness.waiting import wait_for

from e2e.support import REPO, TJ_PATH, StatusRecorder, trainjob

pytestmark = pytest.mark.e2e

QUEUES = REPO / "examples" / "kueue" / "queues.yaml"
EXAMPLE = REPO / "examples" / "kueue" / "trainjob.yaml"
PRIORITY = "kueue.x-k8s.io/priority-class"


def queued(name: str, tiny: dict[str, Path], epochs: int, priority: str | None = None, **overrides) -> dict:
    """The tiny TrainJob with the Kueue example's labels, nodes and scheduling."""
    example = yaml.safe_load(EXAMPLE.read_text())
    scheduling = copy.deepcopy(example["spec"]["scheduling"])
    scheduling.update(overrides.pop("scheduling", {}))
    tj = trainjob(name, tiny, epochs=epochs, nodes=example["spec"]["nodes"], scheduling=scheduling, **overrides)
    tj["metadata"]["labels"].update(example["metadata"]["labels"])
    if priority:
        tj["metadata"]["labels"][PRIORITY] = priority
    return tj


@pytest.fixture
def kq(control_plane, kueue_operator, tjs):
    """The test namespace with the README's queue objects applied."""
    control_plane.kubectl("apply", "-n", tjs.ns, "-f", str(QUEUES))
    return tjs


def workloads(kueue, tjs, name: str) -> list[dict]:
    """The Workloads of a TrainJob's worker Jobs."""
    uids = {j["metadata"]["uid"] for j in tjs.jobs(name)}
    return [w for w in kueue.workloads(tjs.ns)
            if any(r.get("uid") in uids for r in w["metadata"].get("ownerReferences") or [])]


def queued_condition(tjs, name: str, reason: str | None = None):
    c = tjs.cond(name, "Queued")
    return c if c and c["status"] == "True" and (reason is None or c["reason"] == reason) else None


class SuspendWatch:
    """Records every `spec.suspend` value each Job of a namespace goes through (a watch, not a
    poll, so a flap that lasts one update is seen), and why the operator created each Job."""

    def __init__(self, kube, namespace: str):
        self.kube = kube
        self.path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
        self.values: dict[str, list[bool]] = {}
        self.reasons: dict[str, str] = {}
        self._stop = threading.Event()

    def __enter__(self) -> "SuspendWatch":
        rv = self.kube.get(self.path)["metadata"]["resourceVersion"]
        threading.Thread(target=self._run, args=(rv,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _run(self, rv: str) -> None:
        while not self._stop.is_set():
            try:
                for event in self.kube.watch(self.path, rv, timeout_seconds=10):
                    rv = event["object"]["metadata"].get("resourceVersion", rv)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        obj = event["object"]
                        seen = self.values.setdefault(obj["metadata"]["name"], [])
                        self.reasons[obj["metadata"]["name"]] = (obj["metadata"].get("annotations") or {}).get(
                            "kontrast.dev/start-reason", "")
                        value = bool(obj["spec"].get("suspend"))
                        if not seen or seen[-1] != value:
                            seen.append(value)
            except Exception:  # noqa: BLE001 - the watch times out; go on from rv
                pass

    def transitions(self) -> dict[str, int]:
        return {name: len(values) - 1 for name, values in self.values.items()}


def test_quota_fits_one_job_the_second_waits_queued_then_runs(kq, kueue, tiny):
    kq.create(queued("first", tiny, epochs=3))
    kq.wait_phase("first", "Running", timeout=240)
    kq.create(queued("second", tiny, epochs=2))

    # Kueue holds the second: its status says so with the Workload's reason and message.
    # (Before Kueue creates the Workload the operator says it is waiting for it; then Kueue's reason.)
    def kueue_says_no_quota():
        cond = queued_condition(kq, "second", "Pending")
        return cond if cond and "insufficient unused quota" in cond["message"] else None

    cond = wait_for(kueue_says_no_quota, 120, "second to be queued for quota")
    st = kq.status("second")
    assert st["phase"] == "Pending" and "Kueue" in st["message"]
    assert not kq.pods("second")
    (wl,) = workloads(kueue, kq, "second")
    # One pod set of `nodes` pods, each asking for the trainer's requests.
    (pod_set,) = wl["spec"]["podSets"]
    assert pod_set["count"] == 2
    assert pod_set["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "1"
    assert wl["spec"]["queueName"] == "training"

    kq.wait_phase("first", "Succeeded", timeout=300)
    st = kq.wait_phase("second", "Succeeded", timeout=300)
    assert st["restarts"] == 0
    assert kq.cond("second", "Queued")["reason"] == "Admitted"


def test_higher_priority_preempts_and_the_preempted_job_resumes(kq, kueue, tiny):
    kq.create(queued("low", tiny, epochs=20))
    with StatusRecorder(kq.kube, kq.ns, "low") as rec:
        st = wait_for(lambda: (s := kq.status("low")).get("phase") == "Running"
                      and ((s.get("checkpoints") or {}).get("latest") or {}).get("epoch", 0) >= 1 and s,
                      300, "a first checkpoint of low")
        ckpt_step = st["checkpoints"]["latest"]["step"]
        (low_job,) = kq.jobs("low")
        assert low_job["metadata"]["labels"][PRIORITY] == "batch"

        kq.create(queued("high", tiny, epochs=2, priority="urgent"))
        cond = wait_for(lambda: queued_condition(kq, "low", "Preempted"), 120, "low to be preempted")
        assert "Preempted" in cond["message"] or "preempt" in cond["message"].lower(), cond
        wait_for(lambda: not kq.pods("low"), 120, "low's pods to stop")
        st = kq.status("low")
        assert st["phase"] == "Pending" and st["restarts"] == 0
        assert kq.cond("low", "Running")["status"] == "False"

        kq.wait_phase("high", "Succeeded", timeout=300)
        # Re-admitted: the same Job runs again and rank 0 resumes from the newest checkpoint.
        wait_for(lambda: [p for p in kq.pods("low") if "resuming from" in kq.log(p)], 240,
                 "low's rank 0 to resume from its checkpoint")
        st = kq.wait_phase("low", "Succeeded", timeout=400)

    assert "Failed" not in rec.phases(), rec.phases()
    assert st["restarts"] == 0
    preempted = next(i for i, s in enumerate(rec.statuses)
                     if any(c["type"] == "Queued" and c["reason"] == "Preempted" for c in s.get("conditions") or []))
    steps = [s["progress"]["step"] for s in rec.statuses[preempted:] if (s.get("progress") or {}).get("step") is not None]
    # After the preemption the step never goes back below the checkpoint it resumed from.
    assert steps and min(steps) >= ckpt_step, (ckpt_step, steps[:10])


def test_queue_changes_never_flap_suspend(kq, kueue, tiny):
    """A queued job moved to another queue, then out of Kueue: each Job's suspend changes at
    most once (set by its creator, released once), whoever owns it."""
    with SuspendWatch(kq.kube, kq.ns) as watch:
        kq.create(queued("mover", tiny, epochs=1, scheduling={"queueName": "nowhere"}))
        wait_for(lambda: queued_condition(kq, "mover"), 120, "mover to be queued")
        wait_for(lambda: workloads(kueue, kq, "mover"), 60, "the Workload of mover")

        kq.patch_spec("mover", {"scheduling": {"queueName": "elsewhere"}})
        wait_for(lambda: [w for w in workloads(kueue, kq, "mover") if w["spec"]["queueName"] == "elsewhere"],
                 120, "the Workload to move to the queue elsewhere")
        # The status follows the new attempt's Workload one reconcile later.
        wait_for(lambda: queued_condition(kq, "mover"), 60, "mover to be queued again in elsewhere")
        assert not kq.pods("mover")

        kq.patch_spec("mover", {"scheduling": {"queueName": None}})
        st = kq.wait_phase("mover", "Succeeded", timeout=300)

    assert st["restarts"] == 0
    transitions = watch.transitions()
    assert transitions and all(n <= 1 for n in transitions.values()), watch.values
    assert any(values == [True, False] or values == [False] for values in watch.values.values()), watch.values


def test_deleting_a_queued_trainjob_removes_its_workload(kq, kueue, tiny):
    kq.create(queued("gone", tiny, epochs=1, scheduling={"queueName": "nowhere"}))
    wait_for(lambda: workloads(kueue, kq, "gone"), 120, "the Workload of gone")
    kq.delete("gone")
    wait_for(lambda: not kueue.workloads(kq.ns), 120, "the Workload to be deleted")
    assert not kq.kube.get(TJ_PATH.format(ns=kq.ns))["items"]


DEFAULT_QUEUE = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
                 "metadata": {"name": "default"}, "spec": {"clusterQueue": "training"}}


def unqueued(name: str, tiny: dict[str, Path], epochs: int) -> dict:
    """The Kueue example's TrainJob without spec.scheduling.queueName."""
    tj = queued(name, tiny, epochs=epochs)
    del tj["spec"]["scheduling"]["queueName"]
    return tj


@pytest.fixture
def kueue_manages_every_job(kueue):
    """Kueue with manageJobsWithoutQueueName: true for one test (its manager restarted)."""
    kueue.reconfigure(manage_jobs_without_queue_name=True)
    try:
        yield kueue
    finally:
        kueue.reconfigure(manage_jobs_without_queue_name=False)


def test_a_default_local_queue_queues_trainjobs_without_a_queue_name(kq, kueue, tiny):
    """Kueue labels every Job created without a queue `default` and suspends it: the operator
    takes that as the TrainJob's queue (no replacement loop), and a restart's attempt waits in
    the parking queue until the old pods are gone, then goes to `default` too."""
    kq.kube.post(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{kq.ns}/localqueues", DEFAULT_QUEUE)
    with SuspendWatch(kq.kube, kq.ns) as watch, StatusRecorder(kq.kube, kq.ns, "defaulted") as rec:
        kq.create(unqueued("defaulted", tiny, epochs=12))
        try:
            wait_for(lambda: (s := kq.status("defaulted")).get("phase") == "Running"
                     and ((s.get("checkpoints") or {}).get("latest") or {}).get("epoch", 0) >= 1,
                     300, "a first checkpoint of defaulted")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{kq.debug('defaulted')}\n{watch.reasons}") from None
        # One Job, queued in `default` by Kueue, then admitted: never replaced.
        assert watch.reasons == {"defaulted-0": "Created"}, (watch.reasons, [s.get("message") for s in rec.statuses])
        (first,) = kq.jobs("defaulted")
        assert first["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "default"
        (wl,) = workloads(kueue, kq, "defaulted")
        assert wl["spec"]["queueName"] == "default"

        victim = kq.pods("defaulted", attempt=0)[1]
        kq.agent.kill_pod(kq.ns, victim["metadata"]["name"], signal.SIGKILL)
        st = kq.wait_phase("defaulted", "Succeeded", timeout=400)

    assert st["restarts"] == 1
    assert sorted(watch.reasons.values()) == ["Created", "PodFailed"], watch.reasons
    second = watch.values["defaulted-1"]
    # Created suspended in the parking queue, admitted once in `default`: one flip, nobody fights.
    assert all(n <= 1 for n in watch.transitions().values()), watch.values
    assert second == [True, False], second


def test_kueue_managing_jobs_without_a_queue_name_holds_them_without_a_fight(kq, kueue_manages_every_job, tiny):
    """manageJobsWithoutQueueName: Kueue suspends the operator's unlabelled Job; the operator
    leaves it to Kueue (queued, never unsuspended), and naming a queue then moves it there."""
    kueue = kueue_manages_every_job
    with SuspendWatch(kq.kube, kq.ns) as watch:
        kq.create(unqueued("managed", tiny, epochs=2))
        wait_for(lambda: workloads(kueue, kq, "managed"), 120, "the Workload of managed")
        # Queued with the Workload's own reason (no LocalQueue: it cannot be admitted).
        cond = wait_for(lambda: (c := queued_condition(kq, "managed")) and c["reason"] != "Pending" and c,
                        120, "the Workload's reason in the Queued condition")
        assert kq.status("managed")["phase"] == "Pending", cond
        assert not kq.pods("managed") and len(kq.jobs("managed")) == 1

        kq.patch_spec("managed", {"scheduling": {"queueName": "training"}})
        st = kq.wait_phase("managed", "Succeeded", timeout=300)

    assert st["restarts"] == 0
    assert sorted(watch.reasons.values()) == ["Created", "QueueChanged"], watch.reasons
    assert all(n <= 1 for n in watch.transitions().values()), watch.values


VAP = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies"
VAPB = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings"


class SuspensionHeld:
    """Keeps Kueue from suspending one Job (an admission policy denies the change) until the
    block ends: the order in which Kueue's eviction and the Job's suspension are seen, forced."""

    def __init__(self, kube, namespace: str, job: str):
        self.kube, self.ns, self.job = kube, namespace, job
        self.name = f"hold-suspend-{namespace}"

    def __enter__(self) -> "SuspensionHeld":
        self.kube.post(VAP, {
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": self.name},
            "spec": {"failurePolicy": "Fail",
                     "matchConstraints": {"resourceRules": [{"apiGroups": ["batch"], "apiVersions": ["v1"],
                                                             "operations": ["UPDATE"], "resources": ["jobs"]}]},
                     "validations": [{"expression": f"!(object.metadata.name == '{self.job}' && "
                                                    "object.spec.suspend == true && oldObject.spec.suspend != true)",
                                      "message": "the test holds this Job's suspension"}]}})
        self.kube.post(VAPB, {
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": self.name},
            "spec": {"policyName": self.name, "validationActions": ["Deny"],
                     "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.ns}}}}})
        path = f"/apis/batch/v1/namespaces/{self.ns}/jobs/{self.job}"

        def enforced():
            try:
                self.kube.request("PATCH", path, {"spec": {"suspend": True}}, query={"dryRun": "All"},
                                  content_type="application/merge-patch+json")
            except ApiError as e:
                return e.status in (400, 403, 422) and "holds this Job" in str(e)
            return False
        wait_for(enforced, 30, "the suspension block to be enforced", interval=0.3)
        return self

    def __exit__(self, *exc) -> None:
        for path in (f"{VAPB}/{self.name}", f"{VAP}/{self.name}"):
            try:
                self.kube.delete(path)
            except ApiError:
                pass


def test_a_pod_failure_seen_before_the_preemptions_suspension_spends_no_budget(kq, kueue, tiny):
    """The bad order, forced: Kueue evicts low's Workload for high, but low's Job is not
    suspended yet (held by an admission policy), and a pod of low fails meanwhile (a peer
    crash) so the Job controller fails the Job. The operator, which reads the Workload before
    counting a failure, restarts low without spending its budget; it resumes after high."""
    kq.create(queued("low", tiny, epochs=20))
    wait_for(lambda: (s := kq.status("low")).get("phase") == "Running"
             and ((s.get("checkpoints") or {}).get("latest") or {}).get("epoch", 0) >= 1, 300,
             "a first checkpoint of low")
    with SuspensionHeld(kq.kube, kq.ns, "low-0"):
        kq.create(queued("high", tiny, epochs=2, priority="urgent"))
        wait_for(lambda: [w for w in workloads(kueue, kq, "low")
                          if any(c["type"] == "Evicted" and c["status"] == "True"
                                 for c in w.get("status", {}).get("conditions") or [])],
                 120, "Kueue to evict low's Workload")
        (low_job,) = kq.jobs("low")
        assert not low_job["spec"].get("suspend")  # the suspension is held
        kq.agent.kill_pod(kq.ns, kq.pods("low", attempt=0)[1]["metadata"]["name"], signal.SIGKILL)
        restarting = wait_for(lambda: (c := kq.cond("low", "Restarting")) and c["status"] == "True" and c,
                              120, "the operator to replace low's failed attempt")
    assert restarting["reason"] == "Evicted", restarting
    assert kq.status("low")["restarts"] == 0
    kq.wait_phase("high", "Succeeded", timeout=300)
    st = kq.wait_phase("low", "Succeeded", timeout=400)
    assert st["restarts"] == 0
