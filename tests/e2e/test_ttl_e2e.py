"""spec.scheduling.ttlSecondsAfterFinished through the operator, on the real control plane:
the finished TrainJob is deleted that long after it finished, after a TTLExpired Event; the
garbage collector takes its children; the output volume keeps the run."""

from __future__ import annotations

import datetime as dt

import pytest

from harness.kube import ApiError
from harness.waiting import wait_for

from e2e.support import trainjob

pytestmark = pytest.mark.e2e

TTL = 8


def test_a_finished_trainjob_goes_after_its_ttl_with_an_event_and_its_output_stays(tjs, tiny):
    # cleanup: Never keeps every child, so only the TTL (and then garbage collection) removes them.
    tjs.create(trainjob("ttl", tiny, epochs=1, nodes=1,
                        scheduling={"ttlSecondsAfterFinished": TTL, "cleanup": "Never"}))
    st = tjs.wait_phase("ttl", "Succeeded", timeout=300)
    finished = dt.datetime.fromisoformat(st["completionTime"].replace("Z", "+00:00"))
    assert tjs.children("ttl").get("Job"), "cleanup Never keeps the worker Job until the TTL"

    def gone():
        try:
            tjs.get("ttl")
            return False
        except ApiError as e:
            if e.status != 404:
                raise
            return dt.datetime.now(dt.timezone.utc)

    # Terminal TrainJobs are never resynced: only the operator's TTL wake-up can delete it.
    deleted = wait_for(gone, 120, "the TrainJob to be deleted by its TTL", interval=0.3)
    assert deleted - finished >= dt.timedelta(seconds=TTL - 1)   # completionTime has whole seconds
    assert deleted - finished < dt.timedelta(seconds=TTL + 30)
    expired = [e for e in tjs.events("ttl") if e["reason"] == "TTLExpired"]
    assert expired and "ttlSecondsAfterFinished" in expired[0]["message"], [e["reason"] for e in tjs.events("ttl")]
    wait_for(lambda: not tjs.children("ttl"), 120, "garbage collection of the children")
    run_dir = tjs.agent.pvc_path(tjs.ns, "runs") / "ttl"
    assert (run_dir / "model" / "open_clip_model.safetensors").is_file()
    assert (run_dir / "summary.json").is_file()

