"""Helpers of the `node` tier (importable as ``node.support``)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from harness.kube import ApiError
from harness.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kontrast"
EXAMPLE = REPO / "examples" / "cluster-cpu.yaml"
OPERATOR_NS = "kontrast-system"
TJ_PATH = "/apis/kontrast.dev/v1alpha1/namespaces/{ns}/trainjobs"
#: What the trainer prints per progress report (kontrast.trainer.report), one line each.
PROGRESS_LINE = re.compile(r"epoch \d+/\d+ \[[^\]]*\] step \d+/\d+")


def split_ref(ref: str) -> tuple[str, str]:
    """registry:port/path/name:tag -> (registry:port/path/name, tag)."""
    repo, _, tag = ref.rpartition(":")
    assert "/" not in tag, ref
    return repo, tag


def example_docs() -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    tj = next(d for d in docs if d["kind"] == "TrainJob")
    return pvc, tj


def example_trainjob(name: str, epochs: int = 8, **spec: Any) -> dict:
    """examples/cluster-cpu.yaml's TrainJob as two worker pods of one process each (DDP over
    gloo between the pods), two DataLoader workers each (/dev/shm), a checkpoint per epoch and
    requests that fit a 2-core node."""
    _, tj = example_docs()
    tj = copy.deepcopy(tj)
    tj["metadata"]["name"] = name
    s = tj["spec"]
    s["output"] = f"pvc://kontrast-data/product-search/runs/{name}"
    s.update(epochs=epochs, nodes=2, procsPerNode=1, workers=2, saveFrequency=1)
    s["scheduling"]["resources"] = {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}}
    for key, value in spec.items():
        if key == "scheduling":
            s["scheduling"].update(value)
        else:
            s[key] = value
    return tj


class Cluster:
    """TrainJob helpers for one namespace of the node tier (as the admin)."""

    def __init__(self, node, namespace: str):
        self.node = node
        self.kube = node.cp.kube()
        self.ns = namespace

    def apply_example_pvc(self) -> None:
        pvc, _ = example_docs()
        pvc = copy.deepcopy(pvc)
        pvc["spec"]["storageClassName"] = ""
        self.kube.post(f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims", pvc)

    def generate_example_data(self, folder: Path) -> None:
        """The example data set in the volume (examples/generate_data.py, as a user would run it
        against the volume), owned by the trainer's UID."""
        import os

        from kontrast.trainer.data.example_data import generate

        data = generate(folder / "product-search" / "data")
        for root, dirs, files in os.walk(folder):
            for n in dirs + files:
                os.chown(os.path.join(root, n), 1000, 1000)
        assert (data / "train.csv").is_file()

    def create(self, tj: dict) -> dict:
        return self.kube.post(TJ_PATH.format(ns=self.ns), tj)

    def status(self, name: str) -> dict:
        return self.kube.get(f"{TJ_PATH.format(ns=self.ns)}/{name}").get("status") or {}

    def cond(self, name: str, ctype: str) -> Optional[dict]:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == ctype), None)

    def pods(self, name: str, attempt: Optional[int] = None) -> list[dict]:
        sel = f"kontrast.dev/trainjob={name}" + (f",kontrast.dev/attempt={attempt}" if attempt is not None else "")
        items = self.kube.get(f"/api/v1/namespaces/{self.ns}/pods", labelSelector=sel)["items"]
        return sorted(items, key=lambda p: (int(p["metadata"]["labels"].get("kontrast.dev/attempt", "0")),
                                            p["metadata"]["annotations"].get(
                                                "batch.kubernetes.io/job-completion-index", "")))

    def logs(self, pod: str, previous: bool = False) -> str:
        args = ["logs", "-n", self.ns, pod, "-c", "trainer"] + (["--previous"] if previous else [])
        return self.node.kubectl(*args, check=False).stdout

    def kontrast(self, *args: str) -> subprocess.CompletedProcess:
        """The kontrast CLI as a user runs it against this cluster (its kubeconfig)."""
        env = {**os.environ, "KUBECONFIG": str(self.node.cp.kubeconfig)}
        return subprocess.run([sys.executable, "-m", "kontrast.cli", *args, "-n", self.ns], capture_output=True,
                              text=True, env=env, timeout=120)

    def exec(self, pod: str, *cmd: str) -> str:
        return self.node.kubectl("exec", "-n", self.ns, pod, "-c", "trainer", "--", *cmd).stdout

    def debug(self, name: str) -> str:
        out = [f"status: {yaml.safe_dump(self.status(name))}"]
        for p in self.pods(name):
            out.append(f"pod {p['metadata']['name']}: {p['status'].get('phase')} "
                       f"{p['status'].get('containerStatuses')}")
            out.append(self.logs(p["metadata"]["name"])[-3000:])
        out.append(self.node.kubectl("get", "events", "-n", self.ns, check=False).stdout[-3000:])
        return "\n".join(out)

    def _wait(self, name: str, ready, timeout: float, what: str):
        """wait_for(ready(status)), but stop at once (with the cluster's story) when the
        TrainJob fails, unless failing is what ready() waits for."""
        def check():
            st = self.status(name)
            got = ready(st)
            if got:
                return ("ok", got)
            return st.get("phase") == "Failed" and ("failed", st)
        try:
            kind, got = wait_for(check, timeout, what, interval=1)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.debug(name)}") from None
        if kind == "failed":
            raise AssertionError(f"{name} failed while waiting for {what}: {got.get('message')}\n{self.debug(name)}")
        return got

    def wait_phase(self, name: str, phases, timeout: float = 600) -> dict:
        phases = (phases,) if isinstance(phases, str) else tuple(phases)
        return self._wait(name, lambda st: st.get("phase") in phases and st, timeout, f"{name} in {phases}")

    def wait_running_pods(self, name: str, n: int, timeout: float = 600) -> list[dict]:
        def ready(_):
            running = [p for p in self.pods(name) if p["status"].get("phase") == "Running"]
            return len(running) == n and running
        return self._wait(name, ready, timeout, f"{n} running pods of {name}")

    def wait_checkpoint(self, name: str, epoch: int, timeout: float = 600) -> dict:
        def ready(st):
            latest = (st.get("checkpoints") or {}).get("latest") or {}
            return st.get("phase") == "Running" and latest.get("epoch", 0) >= epoch and st
        return self._wait(name, ready, timeout, f"{name}: a checkpoint of epoch {epoch}")

    def delete(self, name: str) -> None:
        try:
            self.kube.delete(f"{TJ_PATH.format(ns=self.ns)}/{name}")
        except ApiError as e:
            if e.status != 404:
                raise
