"""lifecycle/: observed children + status -> new status and actions (pure)."""

from __future__ import annotations

import datetime as dt

import pytest

from kontrast import contract
from kontrast.operator.children.names import (ANNOTATION_HOLD, ANNOTATION_PARKED_FOR, ANNOTATION_QUEUE,
                                              ANNOTATION_RESTARTS, COMPLETION_INDEX_ANNOTATION, KUEUE_QUEUE_LABEL,
                                              LABEL_ATTEMPT, PARKING_QUEUE)
from kontrast.operator.lifecycle.plan import Plan, decide
from kontrast.operator.lifecycle.pods import pod_failure

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def ts(seconds: float) -> str:
    return at(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


def tj(status=None, nodes=2, generation=1, **sched):
    return {
        "apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": "clip", "namespace": "ml", "uid": "u1", "generation": generation},
        "spec": {"nodes": nodes, "scheduling": {"maxRestarts": 3, "suspend": False, "cleanup": "OnSuccess", **sched}},
        "status": status or {},
    }


def job(attempt, restarts=0, conditions=(), deleting=False, suspend=False, start=None, completion=None, queue=None):
    j = {
        "metadata": {"name": f"clip-{attempt}", "uid": f"job-uid-{attempt}", "labels": {LABEL_ATTEMPT: str(attempt)},
                     "annotations": {ANNOTATION_RESTARTS: str(restarts)}},
        "spec": {"suspend": suspend},
        "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m}
                                  for t, r, m in conditions]},
    }
    if queue:
        j["metadata"]["labels"][KUEUE_QUEUE_LABEL] = queue
    if start:
        j["status"]["startTime"] = start
    if completion:
        j["status"]["completionTime"] = completion
    if deleting:
        j["metadata"]["deletionTimestamp"] = ts(0)
    return j


def pod(attempt, index, phase="Running", exit_code=None, message="", reason="", disrupted=None, waiting=None):
    p = {
        "metadata": {"name": f"clip-{attempt}-{index}-abcde",
                     "labels": {LABEL_ATTEMPT: str(attempt)},
                     "ownerReferences": [{"kind": "Job", "name": f"clip-{attempt}", "uid": f"job-uid-{attempt}",
                                          "controller": True}],
                     "annotations": {COMPLETION_INDEX_ANNOTATION: str(index)}},
        "status": {"phase": phase, "conditions": [], "containerStatuses": []},
    }
    if exit_code is not None:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": reason or "Error", "message": message}}}]
    if waiting:
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {
            "reason": waiting, "message": "back-off pulling image"}}}]
    if disrupted:
        p["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": disrupted,
                                          "message": "Preempted in order to admit critical pod"})
    return p


def cond(plan_or_status, ctype):
    st = plan_or_status.status if isinstance(plan_or_status, Plan) else plan_or_status
    return {c["type"]: c for c in st.get("conditions") or []}.get(ctype)


def apply(obj, plan):
    """The TrainJob after the plan's status patch (what the next reconcile reads)."""
    new = dict(obj)
    st = dict(obj.get("status") or {})
    for k, v in plan.status_patch(st).items():
        if v is None:
            st.pop(k, None)
        else:
            st[k] = v
    new["status"] = st
    return new


def running(attempt=0, restarts=0, nodes=2, t=10):
    """A TrainJob whose attempt is running, and its observed children."""
    obj = tj(nodes=nodes)
    obj = apply(obj, decide(obj, [], [], at(0)))
    jobs = [job(attempt, restarts, start=ts(1))]
    pods = [pod(attempt, i) for i in range(nodes)]
    obj = apply(obj, decide(obj, jobs, pods, at(t)))
    return obj, jobs, pods


# --- creation -----------------------------------------------------------------------------
def test_first_reconcile_creates_attempt_zero():
    plan = decide(tj(), [], [], at(0))
    assert plan.create is not None and (plan.create.attempt, plan.create.restarts, plan.create.reason) == (0, 0, "Created")
    assert plan.status["phase"] == "Pending"
    assert plan.status["observedGeneration"] == 1
    assert plan.status["restarts"] == 0
    assert cond(plan, "Created")["status"] == "True"
    assert [e.reason for e in plan.events] == ["Created"]


def test_reconcile_is_idempotent_once_created():
    obj = apply(tj(), decide(tj(), [], [], at(0)))
    plan = decide(obj, [job(0)], [], at(1))
    assert plan.create is None and plan.delete_jobs == [] and not plan.events
    obj = apply(obj, plan)
    assert decide(obj, [job(0)], [], at(2)).status_patch(obj["status"]) == {}


def test_all_pods_running_is_running_with_start_time():
    obj, jobs, pods = running()
    assert obj["status"]["phase"] == "Running"
    assert obj["status"]["startTime"] == ts(1)
    assert cond(obj["status"], "Running")["status"] == "True"
    # one pod still pending -> Pending, with the stuck reason in the message
    obj2 = apply(tj(), decide(tj(), [], [], at(0)))
    plan = decide(obj2, [job(0, start=ts(1))], [pod(0, 0), pod(0, 1, phase="Pending", waiting="ImagePullBackOff")], at(2))
    assert plan.status["phase"] == "Pending"
    assert "ImagePullBackOff" in plan.status["message"]


def test_last_transition_time_moves_only_on_flip():
    obj, jobs, pods = running(t=10)
    first = cond(obj["status"], "Running")["lastTransitionTime"]
    plan = decide(obj, jobs, pods, at(50))
    assert cond(plan, "Running")["lastTransitionTime"] == first
    assert plan.status_patch(obj["status"]) == {}


# --- success and cleanup ------------------------------------------------------------------
@pytest.mark.parametrize("policy,cleans", [("OnSuccess", True), ("Always", True), ("Never", False)])
def test_success_and_cleanup_policy(policy, cleans):
    obj, jobs, pods = running()
    obj["spec"]["scheduling"]["cleanup"] = policy
    done = [job(0, conditions=[("Complete", "", "")], start=ts(1), completion=ts(99))]
    plan = decide(obj, done, [], at(100))
    assert plan.status["phase"] == "Succeeded"
    assert plan.status["completionTime"] == ts(99)
    assert cond(plan, "Succeeded")["status"] == "True"
    assert cond(plan, "Running")["status"] == "False"
    assert plan.cleanup is cleans
    assert plan.delete_jobs == (["clip-0"] if cleans else [])
    assert "Succeeded" in [e.reason for e in plan.events]


def test_terminal_is_sticky_and_cleanup_never_resets_budget():
    obj, jobs, pods = running()
    obj["status"]["restarts"] = 2
    obj = apply(obj, decide(obj, [job(0, 2, conditions=[("Complete", "", "")])], [], at(100)))
    assert obj["status"]["phase"] == "Succeeded"
    # children gone after cleanup: nothing is recreated, restarts stay
    plan = decide(obj, [], [], at(200))
    assert plan.create is None and plan.status["phase"] == "Succeeded" and plan.status["restarts"] == 2
    assert not plan.events


def finished(ttl=None, completion=99, phase_job=("Complete", "", "")):
    """A TrainJob that finished at ``completion`` (its Jobs cleaned up), with the TTL set or not."""
    obj, jobs, pods = running()
    if ttl is not None:
        obj["spec"]["scheduling"]["ttlSecondsAfterFinished"] = ttl
    obj = apply(obj, decide(obj, [job(0, conditions=[phase_job], completion=ts(completion))], [], at(completion + 1)))
    return obj


def test_a_finished_job_without_ttl_is_kept_and_never_wakes_up():
    obj = finished()
    plan = decide(obj, [], [], at(10 ** 7))
    assert not plan.delete_trainjob and plan.requeue_after is None and not plan.events


def test_ttl_wakes_up_when_it_runs_out_then_deletes_the_trainjob_after_an_event():
    obj = finished(ttl=300, completion=99)
    assert obj["status"]["phase"] == "Succeeded"
    plan = decide(obj, [], [], at(150))
    assert not plan.delete_trainjob and plan.requeue_after == pytest.approx(249)   # 99 + 300 - 150
    plan = decide(obj, [], [], at(399))
    assert plan.delete_trainjob and plan.requeue_after is None
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "TTLExpired")]
    assert "ttlSecondsAfterFinished" in plan.events[0].message and ts(99) in plan.events[0].message
    assert plan.create is None and plan.delete_jobs == [] and plan.status_patch(obj["status"]) == {}


def test_ttl_counts_from_a_failure_too_and_zero_deletes_at_once():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"].update(maxRestarts=0, ttlSecondsAfterFinished=0)
    obj = apply(obj, decide(obj, [job(0, conditions=[("Failed", "BackoffLimitExceeded", "x")])],
                            [pod(0, 0, phase="Failed", exit_code=1)], at(50)))
    assert obj["status"]["phase"] == "Failed"
    assert decide(obj, [job(0)], [], at(50)).delete_trainjob


def test_the_platform_default_ttl_applies_unless_the_trainjob_sets_its_own():
    obj = finished(completion=99)
    assert decide(obj, [], [], at(200), default_ttl=100).delete_trainjob
    assert decide(obj, [], [], at(150), default_ttl=100).requeue_after == pytest.approx(49)
    own = finished(ttl=1000, completion=99)
    plan = decide(own, [], [], at(200), default_ttl=100)
    assert not plan.delete_trainjob and plan.requeue_after == pytest.approx(899)


def test_running_jobs_ignore_the_ttl():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"]["ttlSecondsAfterFinished"] = 0
    plan = decide(obj, jobs, pods, at(10 ** 6))
    assert plan.status["phase"] == "Running" and not plan.delete_trainjob


def test_failed_with_cleanup_onsuccess_keeps_pods_but_always_cleans():
    obj, jobs, pods = running()
    failed = [job(0, conditions=[("Failed", "PodFailurePolicy", "exit 78")])]
    bad = [pod(0, 0, "Failed", exit_code=78, message="train.csv, row 3, column 'score': not a number"), pod(0, 1, "Failed", 1)]
    plan = decide(obj, failed, bad, at(20))
    assert plan.status["phase"] == "Failed" and not plan.cleanup and plan.delete_jobs == []
    obj["spec"]["scheduling"]["cleanup"] = "Always"
    plan = decide(obj, failed, bad, at(20))
    assert plan.cleanup and plan.delete_jobs == ["clip-0"]


# --- permanent errors ---------------------------------------------------------------------
def test_permanent_exit_code_fails_at_once_with_the_trainers_message():
    obj, jobs, pods = running()
    failed = [job(0, conditions=[("Failed", "PodFailurePolicy", "Container trainer ... exit code 78")])]
    bad = [pod(0, 0, "Failed", exit_code=contract.EXIT_PERMANENT,
                message="train.csv, row 3, column 'score': not a number"),
           pod(0, 1, "Failed", exit_code=1)]
    plan = decide(obj, failed, bad, at(20))
    assert plan.status["phase"] == "Failed"
    assert plan.create is None
    assert plan.status["restarts"] == 0
    failed_cond = cond(plan, "Failed")
    assert failed_cond["reason"] == "PermanentError"
    assert "column 'score'" in failed_cond["message"]
    assert plan.status["completionTime"] == ts(20)
    assert any(e.type == "Warning" and e.reason == "Failed" and "score" in e.message for e in plan.events)


def test_oom_killed_fails_at_once_naming_the_container_and_its_limit():
    """The kernel's OOM kill would recur on every restart from the checkpoint: Failed at once,
    reason OOMKilled, the budget kept. The peer that lost its gang exits 1 first."""
    obj, jobs, pods = running()
    failed = [job(0, conditions=[("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")])]
    oom = pod(0, 1, "Failed", exit_code=137, reason="OOMKilled")
    oom["spec"] = {"containers": [{"name": "trainer", "resources": {"limits": {"memory": "200Mi"}}}]}
    plan = decide(obj, failed, [pod(0, 0, "Failed", exit_code=1), oom], at(20))
    assert plan.status["phase"] == "Failed" and plan.create is None and plan.status["restarts"] == 0
    failed_cond = cond(plan, "Failed")
    assert failed_cond["reason"] == "OOMKilled"
    assert "container trainer" in failed_cond["message"] and "memory limit 200Mi" in failed_cond["message"]
    assert "spec.scheduling.resources.limits.memory" in plan.status["message"]


def test_permanent_even_when_another_node_failed_first():
    obj, jobs, pods = running()
    failed = [job(0, conditions=[("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")])]
    bad = [pod(0, 0, "Failed", exit_code=1), pod(0, 1, "Failed", exit_code=78, message="bad column")]
    plan = decide(obj, failed, bad, at(20))
    assert plan.status["phase"] == "Failed" and cond(plan, "Failed")["message"] == "bad column"


def test_permanent_pod_before_job_failed_waits_for_the_job():
    obj, jobs, pods = running()
    plan = decide(obj, jobs, [pod(0, 0, "Failed", exit_code=78), pod(0, 1)], at(20))
    assert plan.status["phase"] == "Running" and plan.create is None


# --- restarts -----------------------------------------------------------------------------
def test_pod_failure_restarts_the_gang_and_spends_budget():
    obj, jobs, pods = running()
    failed = [job(0, conditions=[("Failed", "BackoffLimitExceeded", "")])]
    plan = decide(obj, failed, [pod(0, 0, "Failed", exit_code=137, reason="Error"), pod(0, 1, "Failed", exit_code=1)], at(30))
    assert plan.status["phase"] == "Restarting"
    assert plan.status["restarts"] == 1
    assert (plan.create.attempt, plan.create.restarts, plan.create.reason) == (1, 1, "PodFailed")
    assert plan.delete_jobs == ["clip-0"]
    rc = cond(plan, "Restarting")
    assert rc["status"] == "True" and rc["reason"] == "PodFailed"
    assert "exited with code 137" in rc["message"] and "restart 1 of 3" in rc["message"]
    assert [e.reason for e in plan.events] == ["Restarting"]
    assert cond(plan, "Running")["status"] == "False"

    # Next reconcile: new attempt exists, old one is being deleted -> nothing counted twice.
    obj = apply(obj, plan)
    jobs2 = [job(0, deleting=True, conditions=[("Failed", "", "")]), job(1, restarts=1, start=ts(31))]
    plan2 = decide(obj, jobs2, [pod(1, 0, "Pending")], at(32))
    assert plan2.create is None and plan2.status["restarts"] == 1 and plan2.status["phase"] == "Restarting"
    # All pods of the new attempt run -> Running again, Restarting False.
    obj = apply(obj, plan2)
    plan3 = decide(obj, jobs2, [pod(1, 0), pod(1, 1)], at(40))
    assert plan3.status["phase"] == "Running"
    assert cond(plan3, "Restarting")["status"] == "False"
    assert plan3.status["startTime"] == ts(1)  # the deadline spans restarts


def test_crash_between_create_and_status_patch_counts_once():
    obj, jobs, pods = running()
    # The operator created clip-1 (annotation restarts=1) and died before patching status.
    jobs2 = [job(0, conditions=[("Failed", "BackoffLimitExceeded", "")]), job(1, restarts=1)]
    plan = decide(obj, jobs2, [pod(0, 0, "Failed", 1)], at(40))
    assert plan.status["restarts"] == 1
    assert plan.create is None
    assert plan.delete_jobs == ["clip-0"]


def test_budget_spent_fails():
    obj, jobs, pods = running(attempt=3, restarts=3)
    obj["status"]["restarts"] = 3
    failed = [job(3, restarts=3, conditions=[("Failed", "BackoffLimitExceeded", "")])]
    plan = decide(obj, failed, [pod(3, 1, "Failed", exit_code=1, message="CUDA error")], at(60))
    assert plan.status["phase"] == "Failed"
    assert cond(plan, "Failed")["reason"] == "RestartLimitExceeded"
    assert "CUDA error" in cond(plan, "Failed")["message"]
    assert plan.create is None


def test_zero_budget_fails_on_first_failure():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"]["maxRestarts"] = 0
    plan = decide(obj, [job(0, conditions=[("Failed", "BackoffLimitExceeded", "")])], [pod(0, 0, "Failed", 1)], at(9))
    assert plan.status["phase"] == "Failed"


def test_disruption_restarts_without_spending_budget():
    obj, jobs, pods = running()
    plan = decide(obj, jobs, [pod(0, 0, "Running", disrupted="PreemptionByScheduler"), pod(0, 1)], at(30))
    assert plan.status["phase"] == "Restarting"
    assert plan.status["restarts"] == 0
    assert (plan.create.attempt, plan.create.reason, plan.create.restarts) == (1, "Disrupted", 0)
    assert cond(plan, "Restarting")["reason"] == "Disrupted"
    assert "does not count" in cond(plan, "Restarting")["message"]
    # peers that crashed because of the disruption do not spend it either
    failed = [job(0, conditions=[("Failed", "BackoffLimitExceeded", "")])]
    plan = decide(obj, failed, [pod(0, 0, "Failed", 137, disrupted="DeletionByTaintManager"), pod(0, 1, "Failed", 1)], at(30))
    assert plan.status["restarts"] == 0 and plan.create.reason == "Disrupted"


def test_pod_failure_parsing():
    f = pod_failure(pod(0, 1, "Failed", exit_code=78, message="bad", reason="Error"))
    assert f.permanent and f.index == 1 and f.exit_code == 78 and f.message == "bad"
    assert "node 1" in f.describe()
    assert pod_failure(pod(0, 0)) is None
    evicted = {"metadata": {"name": "p"}, "status": {"phase": "Failed", "reason": "Evicted", "message": "low memory"}}
    f = pod_failure(evicted)
    assert f.reason == "Evicted" and f.exit_code is None and not f.permanent


def test_second_restart_posts_a_second_event():
    obj, jobs, pods = running()
    plan = decide(obj, [job(0, conditions=[("Failed", "", "")])], [pod(0, 0, "Failed", 1)], at(30))
    obj = apply(obj, plan)
    plan2 = decide(obj, [job(0, deleting=True), job(1, 1, conditions=[("Failed", "", "")])],
                   [pod(1, 0, "Failed", 2)], at(40))
    assert plan2.status["restarts"] == 2 and plan2.create.attempt == 2
    assert [e.reason for e in plan2.events] == ["Restarting"]


# --- suspend / resume / queue ------------------------------------------------------------
def test_suspend_deletes_the_attempt_and_resume_starts_a_new_one():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"]["suspend"] = True
    obj["metadata"]["generation"] = 2
    plan = decide(obj, jobs, pods, at(50))
    assert plan.status["phase"] == "Suspended"
    assert plan.delete_jobs == ["clip-0"] and plan.create is None
    assert cond(plan, "Suspended")["status"] == "True"
    assert cond(plan, "Running")["status"] == "False"
    assert plan.status["observedGeneration"] == 2
    assert [e.reason for e in plan.events] == ["Suspended"]
    obj = apply(obj, plan)
    # stays suspended, pods gone
    plan = decide(obj, [job(0, deleting=True)], [], at(60))
    assert plan.status["phase"] == "Suspended" and not plan.events and plan.delete_jobs == []
    obj = apply(obj, plan)
    # resume
    obj["spec"]["scheduling"]["suspend"] = False
    obj["metadata"]["generation"] = 3
    plan = decide(obj, [], [], at(70))
    assert plan.status["phase"] == "Pending"
    assert plan.create.reason == "Resumed" and plan.create.restarts == 0
    assert cond(plan, "Suspended")["status"] == "False" and cond(plan, "Suspended")["reason"] == "Resumed"
    assert plan.status["startTime"] is None  # the deadline counts from the new start
    assert [e.reason for e in plan.events] == ["Resumed"]
    # resume while the old Job still terminates: the new attempt number is above it
    plan = decide(obj, [job(0, deleting=True)], [], at(70))
    assert plan.create.attempt == 1


def test_suspended_before_start_creates_nothing():
    plan = decide(tj(suspend=True), [], [], at(0))
    assert plan.status["phase"] == "Suspended" and plan.create is None


def test_kueue_suspended_job_is_pending():
    obj = tj(queueName="team-a")
    obj = apply(obj, decide(obj, [], [], at(0)))
    assert "Kueue" in obj["status"]["message"]
    plan = decide(obj, [job(0, suspend=True, queue="team-a")], [], at(5))
    assert plan.status["phase"] == "Pending" and plan.create is None and plan.status.get("startTime") is None


# --- deadline -----------------------------------------------------------------------------
def test_deadline_fails_and_stops_pods_even_without_cleanup():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"].update(activeDeadlineSeconds=60, cleanup="Never")
    assert decide(obj, jobs, pods, at(60)).status["phase"] == "Running"  # started at 1s
    plan = decide(obj, jobs, pods, at(61))
    assert plan.status["phase"] == "Failed"
    assert cond(plan, "Failed")["reason"] == "DeadlineExceeded"
    assert plan.delete_jobs == ["clip-0"]


def test_success_wins_over_a_passed_deadline():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"]["activeDeadlineSeconds"] = 10
    plan = decide(obj, [job(0, conditions=[("Complete", "", "")])], [], at(100))
    assert plan.status["phase"] == "Succeeded"


# --- other -------------------------------------------------------------------------------
def test_missing_job_is_recreated_without_spending_budget():
    obj, jobs, pods = running()
    plan = decide(obj, [], [], at(30))
    # attempt 0 is gone with its pods: the next is 1 (status.attempt), never 0 again
    assert plan.create.attempt == 1 and plan.create.reason == "Recreated" and plan.status["restarts"] == 0


def test_stale_attempts_are_deleted():
    obj, jobs, pods = running(attempt=2)
    plan = decide(obj, [job(1), job(2)], [pod(2, 0), pod(2, 1)], at(30))
    assert plan.delete_jobs == ["clip-1"]


def test_deleted_trainjob_does_nothing():
    obj, jobs, pods = running()
    obj["metadata"]["deletionTimestamp"] = ts(5)
    plan = decide(obj, jobs, pods, at(30))
    assert plan.create is None and plan.delete_jobs == [] and not plan.cleanup


def test_status_patch_only_owned_fields():
    obj, jobs, pods = running()
    obj["status"]["progress"] = {"step": 5}
    plan = decide(obj, [job(0, conditions=[("Complete", "", "")])], [], at(100))
    patch = plan.status_patch(obj["status"])
    assert "progress" not in patch and patch["phase"] == "Succeeded"


# --- one generation of pods at a time -----------------------------------------------------
def test_new_attempt_is_held_until_old_pods_are_gone():
    obj, jobs, pods = running()
    assert decide(tj(), [], [], at(0)).create.hold is False  # nothing older: start at once
    plan = decide(obj, [job(0, conditions=[("Failed", "", "")])], [pod(0, 0, "Failed", 1)], at(30))
    assert plan.create.hold is True and plan.delete_jobs == ["clip-0"]
    obj = apply(obj, plan)
    held = job(1, restarts=1, suspend=True)
    # old Job still terminating (deletion started at T0): wait, and wake up at the latest later
    plan = decide(obj, [job(0, deleting=True), held], [pod(0, 0, "Running")], at(31))
    assert plan.release is None and plan.create is None
    assert plan.status["phase"] == "Restarting" and "clip-0" in plan.status["message"]
    assert plan.requeue_after == pytest.approx(120 - 31)
    # old Job gone: release the held one
    plan = decide(obj, [held], [], at(35))
    assert plan.release == "clip-1"
    # a pod that never confirms its end (dead node) does not block forever
    plan = decide(obj, [job(0, deleting=True), held], [], at(125))
    assert plan.release == "clip-1"


def test_kueue_jobs_are_never_released_by_the_operator():
    obj = tj(queueName="team-a")
    obj = apply(obj, decide(obj, [], [], at(0)))
    plan = decide(obj, [job(0, suspend=True, queue="team-a")], [], at(5))
    assert plan.release is None


# --- the rules one by one -------------------------------------------------------------------
def test_each_rule_reads_only_the_snapshot():
    from kontrast.operator.lifecycle import rules
    from kontrast.operator.lifecycle.observed import observe

    obj, jobs, pods = running()
    o = observe(obj, jobs, pods, at(20))
    assert o.current is jobs[0] and len(o.pods) == 2 and o.next_attempt == 1 and o.restarts == 0
    # rules that do not apply say so; the last rule always decides
    for rule in (rules.deleted, rules.terminal, rules.suspended, rules.resumed,
                 rules.first_creation, rules.succeeded, rules.gang_restart):
        assert rule(o) is None, rule.__name__
    assert rules.progress(o).phase == "Running"
    assert rules.RULES[-1] is rules.progress and rules.RULES[0] is rules.deleted


def test_restart_rule_alone_spends_or_fails():
    from kontrast.operator.lifecycle import rules
    from kontrast.operator.lifecycle.observed import observe

    obj, jobs, pods = running()
    o = observe(obj, jobs, pods, at(20))
    d = rules.restart(o, "PodFailed", "pod x exited with code 1", spend=True)
    assert (d.phase, d.restarts, d.create.attempt) == ("Restarting", 1, 1)
    obj["spec"]["scheduling"]["maxRestarts"] = 0
    o = observe(obj, jobs, pods, at(20))
    assert rules.restart(o, "PodFailed", "x", spend=True).phase == "Failed"
    assert rules.restart(o, "Disrupted", "x", spend=False).phase == "Restarting"


# --- pods belong to their Job, by uid ---------------------------------------------------------
def foreign(pod_obj, uid="job-uid-of-a-deleted-job"):
    pod_obj["metadata"]["ownerReferences"][0]["uid"] = uid
    return pod_obj


def test_pods_of_a_deleted_job_are_not_blamed_on_the_new_attempt_and_hold_it():
    obj, jobs, pods = running()
    # `kubectl delete job clip-0`: the Job is gone, its pods still terminate (one failed).
    old = [foreign(pod(0, 0, "Running")), foreign(pod(0, 1, "Failed", exit_code=137))]
    plan = decide(obj, [], old, at(30))
    assert plan.create.attempt == 1, "the attempt number stays above the pods that outlived their Job"
    assert plan.create.hold and plan.status["restarts"] == 0 and plan.status["phase"] == "Pending"
    assert cond(plan, "Running")["status"] == "False"  # Pending with Running=True cannot happen
    obj = apply(obj, plan)
    held = job(1, suspend=True)
    plan = decide(obj, [held], old, at(31))
    assert plan.release is None and "clip-0-0-abcde" in plan.status["message"]
    assert plan.create is None and plan.status["restarts"] == 0  # the old failure is not ours
    plan = decide(obj, [held], [old[1]], at(40))  # only a Failed (finished) pod is left
    assert plan.release == "clip-1"


def test_a_same_named_trainjobs_pods_hold_the_first_attempt():
    # Argo CD Replace=true: the TrainJob was deleted and created again; its old pods still run.
    old = [foreign(pod(0, 0, "Running"), "old-trainjobs-job")]
    plan = decide(tj(), [], old, at(0))
    assert plan.create.attempt == 1 and plan.create.hold


def test_a_pod_that_never_confirms_its_end_blocks_only_so_long():
    obj, jobs, pods = running()
    old = foreign(pod(0, 0, "Running"))
    old["metadata"]["deletionTimestamp"] = ts(0)
    assert decide(obj, [job(1, suspend=True)], [old], at(60)).release is None
    assert decide(obj, [job(1, suspend=True)], [old], at(121)).release == "clip-1"


# --- conditions from one observed state -----------------------------------------------------
def test_created_suspended_then_resumed_gets_created():
    obj = apply(tj(suspend=True), decide(tj(suspend=True), [], [], at(0)))
    assert cond(obj["status"], "Created") is None
    obj["spec"]["scheduling"]["suspend"] = False
    plan = decide(obj, [], [], at(5))
    assert cond(plan, "Created")["status"] == "True"
    assert [e.reason for e in plan.events] == ["Created", "Resumed"]


def test_create_failed_is_replaced_by_a_later_success():
    from kontrast.operator.lifecycle.plan import create_failed

    obj, jobs, pods = running()
    plan = decide(obj, [job(0, conditions=[("Failed", "", "")])], [pod(0, 0, "Failed", 1)], at(30))
    failed_create = dict(obj, status={**apply(obj, plan)["status"],
                                      **create_failed(apply(obj, plan), "could not create: forbidden", at(30))})
    assert cond(failed_create["status"], "Created")["status"] == "False"
    plan = decide(failed_create, [job(0, deleting=True), job(1, 1, suspend=True)], [], at(40))
    assert cond(plan, "Created")["status"] == "True" and cond(plan, "Created")["reason"] == "ChildrenCreated"


def test_exactly_the_phase_condition_is_true():
    from kontrast.operator.lifecycle.phases import PHASE_CONDITION

    obj, jobs, pods = running()
    cases = [decide(obj, jobs, pods, at(20)),
             decide(obj, [], [], at(20)),
             decide(obj, [job(0, conditions=[("Failed", "", "")])], [pod(0, 0, "Failed", 1)], at(20)),
             decide(obj, [job(0, conditions=[("Complete", "", "")])], [], at(20))]
    for plan in cases:
        true = {c["type"] for c in plan.status["conditions"] if c["status"] == "True"} - {"Created"}
        own = PHASE_CONDITION.get(plan.status["phase"])
        assert true == ({own} if own else set()), (plan.status["phase"], true)


# --- Kueue: the Job's own label decides -----------------------------------------------------
def test_queue_added_while_held_hands_the_attempt_to_kueue():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"]["queueName"] = "team-a"
    plan = decide(obj, [job(1, 1, suspend=True)], [], at(40))  # held: no queue label of its own
    assert plan.release == "clip-1" and plan.release_queue == "team-a"


def test_queue_removed_never_unsuspends_a_job_kueue_holds():
    obj = tj()  # queueName removed from the spec ...
    obj = apply(obj, decide(obj, [], [], at(0)))
    plan = decide(obj, [job(0, suspend=True, queue="team-a")], [], at(5))  # ... but the Job is Kueue's
    assert plan.release is None and plan.status["phase"] == "Pending"


def test_kueue_requeue_starts_the_deadline_again():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"].update(activeDeadlineSeconds=60, queueName="team-a")
    plan = decide(obj, [job(0, suspend=True, queue="team-a")], [], at(50))  # preempted, re-queued
    assert plan.status["phase"] == "Pending" and plan.status["startTime"] is None
    assert plan.requeue_after is None  # no deadline wake-up while queued
    assert decide(apply(obj, plan), [job(0, suspend=True, queue="team-a")], [], at(500)).status["phase"] == "Pending"


# --- deadline by wake-up, and the Job's own deadline ------------------------------------------
def test_deadline_wakes_up_at_the_time_left_and_the_job_carries_it():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"]["activeDeadlineSeconds"] = 100
    assert decide(obj, jobs, pods, at(31)).requeue_after == pytest.approx(70)  # started at 1s
    assert decide(tj(activeDeadlineSeconds=100), [], [], at(0)).create.active_deadline_seconds == 100
    failed = [job(0, conditions=[("Failed", "BackoffLimitExceeded", "")])]
    plan = decide(obj, failed, [pod(0, 0, "Failed", 1)], at(41))  # a restart gets what is left
    assert plan.create.active_deadline_seconds == 60


def test_a_restart_that_kueue_will_admit_gets_the_whole_deadline():
    """Kueue's admission starts the count again (startTime is cleared while queued): the Job
    must not carry the 600 s left of 3600 and be failed by the Job controller after them."""
    obj, _, _ = running()
    obj["spec"]["scheduling"].update(activeDeadlineSeconds=3600, queueName="team-a")
    failed = [job(0, conditions=[("Failed", "BackoffLimitExceeded", "")], start=ts(1), queue="team-a")]
    plan = decide(obj, failed, [pod(0, 0, "Failed", 1)], at(3001))
    assert plan.create.active_deadline_seconds == 3600


def test_the_jobs_own_deadline_fails_the_trainjob_without_a_restart():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"]["activeDeadlineSeconds"] = 100
    failed = [job(0, conditions=[("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")])]
    plan = decide(obj, failed, [], at(99))
    assert plan.status["phase"] == "Failed" and cond(plan, "Failed")["reason"] == "DeadlineExceeded"
    assert plan.create is None and plan.delete_jobs == ["clip-0"]


# --- the hang watchdog ------------------------------------------------------------------------
def test_hung_running_job_restarts_spending_budget_with_an_event():
    obj, jobs, pods = running(t=10)
    obj["status"]["progress"] = {"step": 3, "updatedAt": ts(20)}
    assert decide(obj, jobs, pods, at(100), hang_after=90).status["phase"] == "Running"
    assert decide(obj, jobs, pods, at(100), hang_after=90).requeue_after == pytest.approx(10)
    plan = decide(obj, jobs, pods, at(111), hang_after=90)
    assert plan.status["phase"] == "Restarting" and plan.status["restarts"] == 1
    assert cond(plan, "Restarting")["reason"] == "Hung" and plan.create.reason == "Hung"
    assert "Hung" in [e.reason for e in plan.events]
    assert decide(obj, jobs, pods, at(10_000)).status["phase"] == "Running"  # no watchdog: never


def test_set_up_is_judged_by_its_own_progress_and_a_stuck_stage_is_named():
    """A prefetch that moves (the trainer's heartbeat moves updatedAt with each image) is no
    hang however long it takes; one that stops is, and the message says where it stopped."""
    obj, jobs, pods = running(t=10)
    for t in range(20, 500, 30):  # 480 s of set-up, an image every 30 s
        obj["status"]["progress"] = {"stage": "Prefetching", "stageText": f"Prefetching({t}/5000)",
                                     "updatedAt": ts(t)}
        assert decide(obj, jobs, pods, at(t + 29), hang_after=90).status["phase"] == "Running"
    plan = decide(obj, jobs, pods, at(470 + 91), hang_after=90)
    assert cond(plan, "Restarting")["reason"] == "Hung"
    assert "(stage Prefetching(470/5000))" in cond(plan, "Restarting")["message"]


# --- Kueue: what the Workload says, queue changes ----------------------------------------------
def workload(*conditions, attempt=0):
    return {"metadata": {"ownerReferences": [{"kind": "Job", "uid": f"job-uid-{attempt}", "controller": True}]},
            "status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conditions]}}


QUOTA = "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default-flavor"


def test_queued_condition_carries_the_workloads_reason_until_admitted():
    obj = tj(queueName="team-a")
    obj = apply(obj, decide(obj, [], [], at(0)))
    pending = workload(("QuotaReserved", "False", "Pending", QUOTA))
    plan = decide(obj, [job(0, suspend=True, queue="team-a")], [], at(5), workload=pending)
    queued = cond(plan, "Queued")
    assert (queued["status"], queued["reason"], queued["message"]) == ("True", "Pending", QUOTA)
    assert plan.status["phase"] == "Pending" and QUOTA in plan.status["message"]
    # Admitted: Kueue unsuspended the Job and its pods run.
    plan = decide(apply(obj, plan), [job(0, start=ts(6), queue="team-a")], [pod(0, 0), pod(0, 1)], at(10))
    assert plan.status["phase"] == "Running"
    assert (cond(plan, "Queued")["status"], cond(plan, "Queued")["reason"]) == ("False", "Admitted")


def test_preempted_job_is_queued_not_failed_and_spends_no_budget():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"]["queueName"] = "team-a"
    # Kueue evicted the Workload and suspended the Job; the Job controller stopped the pods.
    preempted = workload(("Evicted", "True", "Preempted", "Preempted to accommodate a workload"),
                         ("QuotaReserved", "False", "Pending", QUOTA))
    stopped = [pod(0, i, "Failed", 143) for i in range(2)]
    plan = decide(obj, [job(0, suspend=True, queue="team-a", start=ts(1))], stopped, at(30), workload=preempted)
    assert plan.status["phase"] == "Pending" and plan.status["restarts"] == 0
    assert plan.create is None and not plan.delete_jobs
    assert cond(plan, "Queued")["reason"] == "Preempted"
    assert cond(plan, "Running")["status"] == "False"
    assert cond(plan, "Failed") is None


def test_queue_changed_while_queued_replaces_the_attempt():
    obj = tj(queueName="team-a")
    obj = apply(obj, decide(obj, [], [], at(0)))
    for new_queue in ("team-b", None):
        obj["spec"]["scheduling"]["queueName"] = new_queue
        plan = decide(obj, [job(0, suspend=True, queue="team-a")], [], at(5))
        # The queued Job (and with it its Workload) goes; the next attempt starts held, without
        # Kueue's label, and is handed on once the old Job is gone: nobody flips a suspend twice.
        assert plan.delete_jobs == ["clip-0"] and plan.release is None
        assert plan.create.attempt == 1 and plan.create.hold and plan.create.reason == "QueueChanged"
        assert plan.status["restarts"] == 0
        plan = decide(obj, [job(1, suspend=True)], [], at(10))
        assert plan.release == "clip-1" and plan.release_queue == new_queue


def test_running_attempt_keeps_its_queue():
    obj, jobs, pods = running()
    obj["spec"]["scheduling"]["queueName"] = "team-b"
    plan = decide(obj, [job(0, start=ts(1), queue="team-a")], pods, at(20))
    assert plan.create is None and not plan.delete_jobs and plan.status["phase"] == "Running"


# --- Kueue labels Jobs of its own accord: a `default` LocalQueue, manageJobsWithoutQueueName ----
def kjob(attempt, asked="", label=None, hold=False, suspend=True, restarts=0, start=None, conditions=(),
         parked_for=None):
    """A worker Job as this operator creates it (the queue it asked for, the hold recorded), with
    the label Kueue left on it."""
    j = job(attempt, restarts, conditions=conditions, suspend=suspend, queue=label, start=start)
    j["metadata"]["annotations"].update({ANNOTATION_QUEUE: asked, ANNOTATION_HOLD: "true" if hold else "false"})
    if parked_for:
        j["metadata"]["annotations"][ANNOTATION_PARKED_FOR] = parked_for
    return j


def test_a_queue_kueue_defaulted_is_the_trainjobs_queue():
    """Kueue's webhook labelled the unlabelled Job `default` and suspended it: queued there, not
    a changed queueName (no replacement, however often it is reconciled)."""
    obj = apply(tj(), decide(tj(), [], [], at(0)))
    plan = decide(obj, [kjob(0, label="default")], [], at(5))
    assert plan.create is None and not plan.delete_jobs and plan.release is None
    assert plan.status["phase"] == "Pending" and "LocalQueue default" in plan.status["message"]
    assert cond(plan, "Queued")["status"] == "True"


def test_a_job_kueue_suspended_without_a_label_is_never_unsuspended():
    """manageJobsWithoutQueueName: Kueue suspends every Job; the operator's own were not held."""
    obj = apply(tj(), decide(tj(), [], [], at(0)))
    plan = decide(obj, [kjob(0)], [], at(5))
    assert plan.release is None and plan.create is None and not plan.delete_jobs
    assert cond(plan, "Queued")["status"] == "True" and "spec.scheduling.queueName" in plan.status["message"]


def test_a_restart_parks_the_attempt_then_hands_it_to_the_defaulted_queue():
    obj, _, _ = running()
    failed = [pod(0, 0, "Failed", 1), pod(0, 1)]
    current = kjob(0, label="default", suspend=False, start=ts(1),
                   conditions=[("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")])
    plan = decide(obj, [current], failed, at(30))
    assert plan.create.hold and plan.create.queue == "default"  # rendered in the parking queue
    obj = apply(obj, plan)
    held = kjob(1, label=PARKING_QUEUE, hold=True, restarts=1, parked_for="default")
    plan = decide(obj, [held], [], at(40))
    assert plan.release == "clip-1" and plan.release_queue == "default" and not plan.release_unpark


def test_a_parked_attempt_whose_queue_went_is_unparked_and_started():
    obj, _, _ = running()
    plan = decide(obj, [kjob(1, asked="team-a", label=PARKING_QUEUE, hold=True, parked_for="team-a")], [], at(40))
    assert plan.release == "clip-1" and plan.release_queue is None and plan.release_unpark


def test_queue_named_after_kueue_defaulted_it_there_is_no_change():
    obj = apply(tj(), decide(tj(), [], [], at(0)))
    obj["spec"]["scheduling"]["queueName"] = "default"
    plan = decide(obj, [kjob(0, label="default")], [], at(5))
    assert plan.create is None and not plan.delete_jobs


# --- a Kueue eviction observed in the wrong order is never charged --------------------------------
PREEMPTED = ("Evicted", "True", "Preempted", "Preempted to accommodate a workload")
BACKOFF = ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")


def test_pods_failed_by_a_kueue_eviction_before_the_suspension_is_seen_spend_no_budget():
    """The bad order, forced: the Job as read is not (yet) suspended but failed, its pods ended
    Failed without DisruptionTarget (the Job controller stopped them for Kueue), and the
    Workload, read after them, says Kueue evicted it."""
    obj, _, _ = running()
    obj["spec"]["scheduling"]["queueName"] = "team-a"
    failed_job = job(0, conditions=[BACKOFF], start=ts(1), queue="team-a")
    stopped = [pod(0, i, "Failed", 143) for i in range(2)]
    plan = decide(obj, [failed_job], stopped, at(30), workload=workload(PREEMPTED))
    assert plan.status["restarts"] == 0 and plan.create.reason == "Evicted"
    assert "Preempted" in cond(plan, "Restarting")["message"]


def test_a_job_kueue_suspended_and_the_job_controller_failed_restarts_without_budget():
    """Suspended by Kueue and failed meanwhile: Kueue never re-admits a finished Job, so the
    attempt is replaced (before: left queued for ever), and it is not the job's fault."""
    obj, _, _ = running()
    obj["spec"]["scheduling"]["queueName"] = "team-a"
    failed_job = job(0, conditions=[BACKOFF], suspend=True, queue="team-a")
    plan = decide(obj, [failed_job], [pod(0, i, "Failed", 143) for i in range(2)], at(30),
                  workload=workload(PREEMPTED))
    assert plan.create is not None and plan.status["restarts"] == 0


def test_pods_failed_before_the_suspension_is_seen_without_a_job_failure_wait():
    """Not failed, not (yet) seen suspended, Workload evicted: nothing counts, nothing restarts."""
    obj, _, _ = running()
    obj["spec"]["scheduling"]["queueName"] = "team-a"
    plan = decide(obj, [job(0, start=ts(1), queue="team-a")], [pod(0, i, "Failed", 143) for i in range(2)],
                  at(30), workload=workload(PREEMPTED))
    assert plan.create is None and plan.status["restarts"] == 0 and not plan.delete_jobs


def test_a_failed_job_in_a_queue_that_kueue_did_not_evict_spends_the_budget():
    obj, _, _ = running()
    obj["spec"]["scheduling"]["queueName"] = "team-a"
    failed_job = job(0, conditions=[BACKOFF], start=ts(1), queue="team-a")
    admitted = workload(("Admitted", "True", "Admitted", ""))
    plan = decide(obj, [failed_job], [pod(0, 0, "Failed", 1), pod(0, 1)], at(30), workload=admitted)
    assert plan.status["restarts"] == 1 and plan.create.reason == "PodFailed"


def test_the_workload_is_read_when_a_queued_attempts_pods_fail():
    """observe() asks the cluster for the Workload once pods of an attempt in a Kueue queue fail
    (after the pods were listed, so it is never older than they are), not while they run."""
    from kontrast.operator.lifecycle.observed import observe

    class Reads:
        asked = 0

        def failed_creates(self, job):
            return []

        def workload(self, job):
            Reads.asked += 1
            return workload(PREEMPTED)

    obj, _, _ = running()
    obj["spec"]["scheduling"]["queueName"] = "team-a"
    current = job(0, start=ts(1), queue="team-a")
    assert observe(obj, [current], [pod(0, i) for i in range(2)], at(30), read=Reads()).workload is None
    o = observe(obj, [current], [pod(0, 0, "Failed", 143), pod(0, 1)], at(30), read=Reads())
    assert Reads.asked == 1 and o.workload is not None


def test_attempt_numbers_only_grow_when_a_job_and_its_pods_were_deleted_by_hand():
    obj, jobs, pods = running(attempt=3)
    obj = apply(obj, decide(obj, jobs, pods, at(20)))
    plan = decide(tj(), [], [], at(0))
    assert plan.status["attempt"] == 0  # the first creation records its attempt
    plan = decide(obj, [], [], at(30))  # clip-3 and its pods are gone
    assert plan.create.attempt == 4 and plan.status["attempt"] == 4


# --- a crashed node is not the job's failure ---------------------------------------------------
def unready(attempt, index, since):
    p = pod(attempt, index)
    p["status"]["conditions"].append({"type": "Ready", "status": "False", "lastTransitionTime": ts(since)})
    return p


def test_peers_failing_while_a_pod_on_a_lost_node_still_runs_wait_for_its_eviction():
    obj, _, _ = running(nodes=3)
    failed_job = [job(0, conditions=[BACKOFF], start=ts(1))]
    pods = [pod(0, 0, "Failed", 1), pod(0, 1, "Failed", 1), unready(0, 2, since=20)]
    plan = decide(obj, failed_job, pods, at(100))
    assert plan.create is None and plan.status["restarts"] == 0 and not plan.delete_jobs
    assert plan.requeue_after == pytest.approx(280) and "not Ready" in plan.status["message"]
    # The taint manager evicts it: a disruption, no budget spent.
    evicted = dict(pods[2], status={**pods[2]["status"], "phase": "Failed", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager", "message": "node lost"}]})
    plan = decide(obj, failed_job, [*pods[:2], evicted], at(330))
    assert plan.create is not None and plan.status["restarts"] == 0
    # Never evicted (no taint manager): after the wait the failure counts.
    plan = decide(obj, failed_job, pods, at(20 + 361))
    assert plan.create is not None and plan.status["restarts"] == 1
