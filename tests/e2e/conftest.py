"""Fixtures for the operator's end-to-end tests: the real control plane, the test node agent,
the operator run in-process with kopf's KopfRunner under the Helm chart's RBAC (never as
cluster admin), a tiny model and a tiny data set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from e2e.support import OPERATOR_NS, TINY_MODEL, TJ, TJ_PATH, Operator, api_path, ensure_namespace, render_chart
from harness.controlplane import free_port
from harness.kube import ApiError
from harness.waiting import wait_for


@pytest.fixture(scope="session")
def helm():
    from harness.controlplane import ensure_binaries

    return ensure_binaries() / "helm"


@pytest.fixture(scope="session")
def operator_rbac(control_plane, helm):
    """The chart's ServiceAccount, ClusterRole and binding, applied as the chart renders them.
    Returns a kubeconfig that acts as that ServiceAccount."""
    ensure_namespace(control_plane, OPERATOR_NS)
    kube = control_plane.kube()
    docs = render_chart(helm)
    sa_name = None
    for obj in docs:
        if obj["kind"] not in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding"):
            continue
        try:
            kube.post(api_path(obj), obj)
        except ApiError as e:
            if e.status != 409:
                raise
        if obj["kind"] == "ServiceAccount":
            sa_name = obj["metadata"]["name"]
    assert sa_name
    return control_plane.service_account_kubeconfig(OPERATOR_NS, sa_name)


@pytest.fixture(scope="package")
def operator(control_plane, node_agent, operator_rbac):
    """Ends with the e2e package: the operator watches every namespace, and the k8s tier's tests
    that play its part themselves (tests/k8s) must not meet it."""
    op = Operator(operator_rbac, free_port()).start()
    try:
        yield op
    finally:
        op.stop()
        op.restore_env()


@pytest.fixture(scope="package")
def kueue_operator(operator, kueue):
    """The operator, (re)started after Kueue's CRDs exist so that it watches Workloads."""
    operator.stop()
    operator.start()
    return operator


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny model config and small train/eval CSVs (from the example data generator)."""
    from kontrast.trainer.data.example_data import generate

    root = tmp_path_factory.mktemp("tiny")
    example = generate(root / "example")
    (root / "tiny-vit.json").write_text(json.dumps(TINY_MODEL))
    files = {"model": root / "tiny-vit.json"}
    for name, n in (("train", 64), ("eval", 40)):
        with open(example / f"{name}.csv", newline="") as f:
            rows = list(csv.reader(f))
        body = [[q, str(example / img), title, score] for q, img, title, score in rows[1:n + 1]]
        path = root / f"{name}.csv"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([rows[0], *body])
        files[name] = path
    bad = root / "bad-train.csv"
    rows = list(csv.reader(open(files["train"], newline="")))
    rows[5][3] = "very relevant"  # the weight column must be a number
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    files["bad"] = bad
    return files


@pytest.fixture
def tjs(control_plane, node_agent, namespace, operator):
    helper = TJ(control_plane, node_agent, namespace)
    yield helper
    # Stop every training pod of this test before the next test starts.
    for obj in helper.kube.get(TJ_PATH.format(ns=namespace))["items"]:
        helper.delete(obj["metadata"]["name"])
    wait_for(lambda: not helper.kube.get(f"/api/v1/namespaces/{namespace}/pods",
                                         labelSelector="kontrast.dev/trainjob")["items"],
             120, "training pods to be gone")
