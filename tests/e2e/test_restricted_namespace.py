"""Training under the chart's guard rails: a namespace that enforces Pod Security "restricted"
(the API server's built-in PodSecurity admission checks every pod the Job controller creates)
and the chart's status policy (the trainer's token may write only the trainer's status fields,
the operator's ServiceAccount the rest). The TrainJob still trains to Succeeded, so neither
the pods nor any status write of the trainer or the operator falls foul of them. (The test
node agent runs the containers as local processes and does not apply securityContext itself:
admission is what is under test here.)"""

from __future__ import annotations

import pytest

from e2e.support import render_chart, trainjob
from harness.kube import ApiError, Kube

pytestmark = pytest.mark.e2e

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}
POLICY_PATHS = {"ValidatingAdmissionPolicy": "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies",
                "ValidatingAdmissionPolicyBinding":
                    "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings"}


@pytest.fixture
def status_policy(tjs, helm):
    """The chart's status policy, bound to this test's namespace only."""
    made = []
    for obj in render_chart(helm, "--set", f"watchNamespaces={{{tjs.ns}}}"):
        if obj["kind"] in POLICY_PATHS:
            path = POLICY_PATHS[obj["kind"]]
            tjs.kube.post(path, obj)
            made.append(f"{path}/{obj['metadata']['name']}")
    yield
    for path in reversed(made):
        tjs.kube.delete(path)


def test_trains_where_pod_security_restricted_and_the_status_policy_apply(tjs, tiny, status_policy):
    kube = tjs.kube
    kube.patch(f"/api/v1/namespaces/{tjs.ns}", {"metadata": {"labels": RESTRICTED}})
    # The admission plugin really enforces here: an ordinary pod is turned away.
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
             "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}}
    with pytest.raises(ApiError) as err:
        kube.post(f"/api/v1/namespaces/{tjs.ns}/pods", plain)
    assert err.value.status == 403 and 'violates PodSecurity "restricted:latest"' in err.value.message

    tjs.create(trainjob("restricted", tiny, epochs=2, scheduling={"cleanup": "Never"}))
    st = tjs.wait_phase("restricted", "Succeeded", 300)
    # the trainer's fields arrived (its token passed the status policy) ...
    assert st["restarts"] == 0 and st["progress"]["epochText"] == "2/2"
    assert st["checkpoints"]["latest"]["epoch"] == 2 and st["metrics"]["after"]
    # ... and the status policy was in force for that token all along
    trainer = Kube(tjs.cp.service_account_client(tjs.ns, "restricted-trainer"))
    with pytest.raises(ApiError) as err:
        trainer.patch(f"/apis/kontrast.dev/v1alpha1/namespaces/{tjs.ns}/trainjobs/restricted/status",
                      {"status": {"phase": "Failed"}})
    assert err.value.status == 403 and "status.phase is written only by the kontrast operator" in err.value.message
    pods = tjs.pods("restricted")
    assert len(pods) == 2
    for pod in pods:
        (c,) = pod["spec"]["containers"]
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert pod["spec"]["securityContext"]["runAsUser"] == 1000
        assert pod["status"]["phase"] == "Succeeded"
