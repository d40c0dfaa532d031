"""examples/cluster-cpu.yaml, the README's first cluster TrainJob, applied as it is.

Its `kontrast.dev/generate-example-data` annotation must reach the trainer (rank 0 generates
the data set into the volume), and so must the TrainJob's uid: a TrainJob created again under
the same name with the same `output` is another run, whose trainer refuses the first one's
checkpoints instead of resuming them.
"""

from __future__ import annotations

import pytest
import yaml

from harness.waiting import wait_for

from e2e.support import REPO

pytestmark = pytest.mark.e2e

EXAMPLE = REPO / "examples" / "cluster-cpu.yaml"
NAME = "product-search-cpu"


def test_cluster_cpu_example_trains_as_it_is_and_a_new_uid_refuses_its_checkpoints(control_plane, tjs):
    control_plane.kubectl("apply", "-n", tjs.ns, "-f", str(EXAMPLE))
    uid = tjs.get(NAME)["metadata"]["uid"]
    # The ConfigMap the pods read (cleaned up after success): the uid and kontrast's annotation.
    cm = wait_for(lambda: tjs.kube.get(f"/api/v1/namespaces/{tjs.ns}/configmaps",
                                       labelSelector=f"kontrast.dev/trainjob={NAME}")["items"],
                  120, "the TrainJob's ConfigMap")[0]
    doc = yaml.safe_load(cm["data"]["trainjob.yaml"])
    assert doc["metadata"]["uid"] == uid
    assert doc["metadata"]["annotations"] == {"kontrast.dev/generate-example-data": "true"}
    first = tjs.wait_phase(NAME, "Succeeded", timeout=600)
    assert first["restarts"] == 0
    assert (tjs.agent.pvc_path(tjs.ns, "kontrast-data") / "product-search" / "data" / "train.csv").is_file()

    # The same TrainJob again: another uid, the same output with the first run's checkpoints.
    tjs.wait_gone(NAME)
    wait_for(lambda: not tjs.kube.get(f"/api/v1/namespaces/{tjs.ns}/configmaps",
                                      labelSelector=f"kontrast.dev/trainjob={NAME}")["items"],
             120, "the first run's ConfigMap to be garbage-collected")
    control_plane.kubectl("apply", "-n", tjs.ns, "-f", str(EXAMPLE))
    second = tjs.wait_phase(NAME, "Failed", timeout=300)
    assert tjs.get(NAME)["metadata"]["uid"] != uid
    assert tjs.cond(NAME, "Failed")["reason"] == "PermanentError", second
    assert uid in second["message"], second["message"]
