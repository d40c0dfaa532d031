"""The binaries from tools/k8s-testbin report their real versions: Helm's kubeVersion checks,
kubectl's version skew and kopf's API discovery all read them."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.k8s


def test_server_reports_its_real_version(control_plane):
    version = control_plane.version()
    assert re.fullmatch(r"v1\.\d+\.\d+", version["gitVersion"]), version
    assert version["major"] == "1" and version["minor"] == version["gitVersion"].split(".")[1]


def test_kubectl_is_the_servers_release(control_plane):
    out = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert out["clientVersion"]["gitVersion"] == out["serverVersion"]["gitVersion"]


def test_helm_renders_with_the_servers_kubernetes_version(control_plane, tmp_path):
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n"
        "data: {kube: {{ .Capabilities.KubeVersion.Version | quote }}}\n")
    assert re.match(r"v3\.\d+\.\d+", control_plane.helm("version", "--short").stdout)
    rendered = control_plane.helm("template", "probe", str(chart)).stdout
    minor = control_plane.version()["minor"]
    assert re.search(rf'kube: "v1\.{minor}\.\d+"', rendered), rendered
