"""`python -m kontrast.operator` (the Deployment's command) as a real process: namespaced mode,
the chart's ServiceAccount, kopf's liveness endpoint, the metrics endpoint, and a TrainJob
reconciled into its children."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from e2e.support import TJ_PATH, trainjob
from harness.controlplane import free_port
from harness.waiting import wait_for

pytestmark = pytest.mark.k8s


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as r:
        return r.status == 200


def test_operator_process_serves_one_namespace(control_plane, operator_rbac, namespace, tiny, tmp_path):
    health, metrics = free_port(), free_port()
    env = {**os.environ, "KONTRAST_OPERATOR_KUBECONFIG": str(operator_rbac),
           "KONTRAST_WATCH_NAMESPACES": namespace,
           "KONTRAST_LIVENESS": f"http://127.0.0.1:{health}/healthz",
           "KONTRAST_METRICS_PORT": str(metrics)}
    log = open(tmp_path / "operator.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kontrast.operator", "--verbose"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{health}/healthz"), 60, "the liveness endpoint")
        # Kueue-queued: the children appear, no pods run.
        control_plane.kube().post(TJ_PATH.format(ns=namespace),
                                  trainjob("queued", tiny, scheduling={"queueName": "team-a"}))
        job = wait_for(lambda: control_plane.kube().get(f"/apis/batch/v1/namespaces/{namespace}/jobs/queued-0"),
                       60, "the worker Job")
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        st = wait_for(lambda: control_plane.kube().get(f"{TJ_PATH.format(ns=namespace)}/queued").get("status"),
                      60, "status")
        assert st["phase"] == "Pending" and "Kueue" in st["message"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=3).read().decode()
        assert 'kontrast_trainjobs{phase="Pending"} 1' in text
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    output = (tmp_path / "operator.log").read_text()
    assert "Traceback" not in output, output[-3000:]
