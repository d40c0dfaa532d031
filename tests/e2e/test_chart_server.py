"""`helm template` output is valid against the real API server (kubectl apply --dry-run=server),
including the CRD copy in the chart, in both RBAC modes."""

from __future__ import annotations

import subprocess

import pytest

from e2e.support import CHART, OPERATOR_NS, ensure_namespace

pytestmark = pytest.mark.k8s


PLATFORM = ["--set-json", 'trainer.allowedImagePrefixes=["registry.example/ml/"]',
            "--set-json", 'trainer.enforced={"tolerations": [{"key": "d", "operator": "Exists"}], '
                          '"nodeSelector": {"pool": "ml"}, "env": [{"name": "NCCL_IB_DISABLE", "value": "1"}]}']


@pytest.mark.parametrize("args", [[], ["--set", "watchNamespaces={kontrast-a,kontrast-b}"], PLATFORM],
                         ids=["cluster-wide", "namespaced", "platform-policy"])
def test_helm_template_passes_server_side_dry_run(control_plane, helm, args):
    for ns in (OPERATOR_NS, "kontrast-a", "kontrast-b"):
        ensure_namespace(control_plane, ns)
    rendered = subprocess.run([str(helm), "template", "kontrast", str(CHART), "-n", OPERATOR_NS,
                               "--include-crds", *args], capture_output=True, text=True, check=True).stdout
    # Every rendered object names its namespace; server-side apply as the CRD docs recommend.
    proc = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=rendered,
                                 check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "customresourcedefinition.apiextensions.k8s.io/trainjobs.kontrast.dev" in out
    assert "deployment.apps/kontrast-operator" in out
    namespaced = "watchNamespaces={kontrast-a,kontrast-b}" in args
    assert ("clusterrole.rbac.authorization.k8s.io/kontrast-operator" in out) == (not namespaced)
    assert "clusterrole.rbac.authorization.k8s.io/kontrast-trainjobs-edit" in out
    assert "validatingadmissionpolicy.admissionregistration.k8s.io/kontrast-trainjob-status" in out
    assert ("validatingadmissionpolicy.admissionregistration.k8s.io/kontrast-trainjob-platform" in out) == \
        (args is PLATFORM)
