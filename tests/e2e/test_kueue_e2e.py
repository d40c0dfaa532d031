"""TrainJobs queued by the real Kueue manager: quota, queueing, preemption, queue changes.

The queue objects are examples/kueue/queues.yaml and the TrainJobs take their labels and
`scheduling` from examples/kueue/trainjob.yaml, both applied as the README shows them; only the
data paths point at the tests' tiny data set.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from harness.waiting import wait_for

from e2e.support import REPO, TJ_PATH, trainjob

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


def test_deleting_a_queued_trainjob_removes_its_workload(kq, kueue, tiny):
    kq.create(queued("gone", tiny, epochs=1, scheduling={"queueName": "nowhere"}))
    wait_for(lambda: workloads(kueue, kq, "gone"), 120, "the Workload of gone")
    kq.delete("gone")
    wait_for(lambda: not kueue.workloads(kq.ns), 120, "the Workload to be deleted")
    assert not kq.kube.get(TJ_PATH.format(ns=kq.ns))["items"]
