"""pytest fixtures for the real control plane and the test node agent.

Loaded through `pytest_plugins = ["harness.fixtures"]` in tests/conftest.py. The control plane
starts once per session (seconds when the binaries are built); missing binaries are built by
tools/k8s-testbin/build.sh and any failure fails the tests: they never skip.
"""

from __future__ import annotations

import uuid

import pytest

from harness.controlplane import ControlPlane, ensure_binaries
from harness.kueue import Kueue
from harness.nodeagent import NodeAgent


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """etcd + kube-apiserver + kube-controller-manager with the TrainJob CRD installed."""
    cp = ControlPlane(ensure_binaries(), workdir=tmp_path_factory.mktemp("controlplane"))
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def node_agent(control_plane, tmp_path_factory):
    """A node that binds and runs pods as local processes (see harness.nodeagent)."""
    agent = NodeAgent(control_plane, tmp_path_factory.mktemp("node"))
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="session")
def kueue(control_plane):
    """Kueue's manager (batch/Job integration) with its CRDs and webhooks (see harness.kueue)."""
    manager = Kueue(control_plane, control_plane.bin_dir).start()
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture
def namespace(control_plane):
    """A fresh namespace (with its default ServiceAccount), deleted after the test."""
    name = control_plane.create_namespace(f"t-{uuid.uuid4().hex[:8]}")
    yield name
    try:
        control_plane.kube().delete(f"/api/v1/namespaces/{name}")
    except Exception:
        pass
