"""lifecycle/kueue.py: what Kueue says about a worker Job, from its Workload (pure)."""

from __future__ import annotations

from kontrast.operator.lifecycle import kueue


def job(uid="job-uid"):
    return {"metadata": {"name": "clip-0", "uid": uid}}


def workload(*conditions, owner="job-uid"):
    return {"metadata": {"name": "job-clip-0-abc", "ownerReferences": [{"kind": "Job", "name": "clip-0", "uid": owner}]},
            "status": {"conditions": [dict(zip(("type", "status", "reason", "message"), c)) for c in conditions]}}


def test_workload_of_matches_the_owning_job_by_uid():
    mine, other = workload(owner="job-uid"), workload(owner="other")
    assert kueue.workload_of(job(), [other, mine]) is mine
    assert kueue.workload_of(job(), [other]) is None


def test_queueing_reason_comes_from_the_workload():
    quota = "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default-flavor"
    pending = workload(("QuotaReserved", "False", "Pending", quota))
    assert kueue.queueing(pending, "training") == kueue.Queueing("Pending", quota)
    # Preempted: eviction wins over the (also False) quota reservation.
    preempted = workload(("QuotaReserved", "False", "Pending", quota),
                         ("Evicted", "True", "Preempted", "Preempted to accommodate a workload"))
    assert kueue.queueing(preempted, "training").reason == "Preempted"
    # No Workload yet: Kueue has not seen the Job.
    none = kueue.queueing(None, "training")
    assert none.reason == "Pending" and "training" in none.message
    # Re-admitted after an eviction: Evicted is False again.
    waiting = workload(("QuotaReserved", "True", "QuotaReserved", ""), ("Evicted", "False", "QuotaReserved", ""))
    assert kueue.queueing(waiting, "training").reason == "QuotaReserved"
