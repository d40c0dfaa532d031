"""Fixtures of the `node` tier: a real node (harness.node), the chart installed with Helm and
the operator running as a pod from its image, and per-test namespaces that enforce Pod
Security "restricted" with the example's PersistentVolumeClaim bound to a folder on the node."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from harness.kube import ApiError
from harness.node import Node, make_workdir
from harness.waiting import wait_for
from node.support import CHART, OPERATOR_NS, split_ref


@pytest.fixture(scope="session")
def node():
    workdir = make_workdir()
    n = Node(workdir)
    n.start()
    try:
        yield n
    finally:
        n.stop()
        if not os.environ.get("KONTRAST_KEEP_NODE"):
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def operator_release(node):
    """`helm install` of charts/kontrast: the operator Deployment from the pushed image, the
    TrainJobs' trainer image from the same registry."""
    repo, tag = split_ref(node.images["operator"])
    trepo, ttag = split_ref(node.images["trainer"])
    node.helm("install", "kontrast", str(CHART), "-n", OPERATOR_NS, "--create-namespace",
              "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
              "--set", f"trainer.image.repository={trepo}", "--set", f"trainer.image.tag={ttag}",
              "--set", "trainer.statusIntervalSeconds=3", "--set", "operator.resyncSeconds=30",
              "--wait", "--timeout", "10m")
    kube = node.cp.kube()

    def available():
        dep = kube.get(f"/apis/apps/v1/namespaces/{OPERATOR_NS}/deployments",
                       labelSelector="app.kubernetes.io/instance=kontrast")["items"][0]
        return (dep.get("status") or {}).get("availableReplicas") == 1 and dep
    dep = wait_for(available, 300, "the operator Deployment to be available")
    yield dep
    node.helm("uninstall", "kontrast", "-n", OPERATOR_NS, "--wait", "--timeout", "2m", check=False)


@pytest.fixture
def restricted_ns(node, operator_release):
    """A namespace enforcing Pod Security "restricted", with the example's PVC `kontrast-data`
    bound to a hostPath PersistentVolume (a folder on the node, owned by the trainer's UID)."""
    name = f"n-{uuid.uuid4().hex[:8]}"
    kube = node.cp.kube()
    kube.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                 "pod-security.kubernetes.io/enforce-version": "latest"}}})
    wait_for(lambda: kube.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 60, "the default SA")
    folder = node.workdir / "volumes" / name
    folder.mkdir(parents=True)
    os.chown(folder, 1000, 1000)
    pv = f"{name}-data"
    kube.post("/api/v1/persistentvolumes", {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
              "spec": {"capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"],
                       "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                       "hostPath": {"path": str(folder), "type": "Directory"},
                       "claimRef": {"namespace": name, "name": "kontrast-data"}}})
    yield name, Path(folder)
    for tj in kube.get(f"/apis/kontrast.dev/v1alpha1/namespaces/{name}/trainjobs")["items"]:
        try:
            kube.delete(f"/apis/kontrast.dev/v1alpha1/namespaces/{name}/trainjobs/{tj['metadata']['name']}")
        except ApiError:
            pass
    wait_for(lambda: not kube.get(f"/api/v1/namespaces/{name}/pods")["items"], 180, "the test's pods to be gone")
    kube.delete(f"/api/v1/namespaces/{name}")
    try:
        kube.delete(f"/api/v1/persistentvolumes/{pv}")
    except ApiError:
        pass
