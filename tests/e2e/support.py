"""Helpers of the operator's end-to-end tests (importable as ``e2e.support``; tests/ is on
sys.path and conftest modules are not importable under importlib mode)."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

from harness.kube import ApiError
from harness.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kontrast"
OPERATOR_NS = "kontrast-system"
TJ_PATH = "/apis/kontrast.dev/v1alpha1/namespaces/{ns}/trainjobs"

#: ~0.9M parameters (mostly the tokenizer's embedding): seconds per epoch on a CPU.
TINY_MODEL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def render_chart(helm: Path, *args: str) -> list[dict]:
    out = subprocess.run([str(helm), "template", "kontrast", str(CHART), "-n", OPERATOR_NS, *args],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def api_path(obj: dict) -> str:
    group_version = obj["apiVersion"]
    kind_plural = {"ServiceAccount": "serviceaccounts", "ClusterRole": "clusterroles",
                   "ClusterRoleBinding": "clusterrolebindings", "Role": "roles", "RoleBinding": "rolebindings",
                   "Deployment": "deployments", "Service": "services", "ServiceMonitor": "servicemonitors"}
    plural = kind_plural[obj["kind"]]
    prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    ns = obj["metadata"].get("namespace")
    return f"{prefix}/namespaces/{ns}/{plural}" if ns else f"{prefix}/{plural}"


def ensure_namespace(control_plane, name: str) -> None:
    try:
        control_plane.create_namespace(name)
    except ApiError as e:
        if e.status != 409:
            raise


def _logging_state() -> tuple[int, list, bool]:
    """``kopf run --verbose`` sets the root logger to DEBUG with a stderr handler of its own and
    silences asyncio, which would leave every later test of the session formatting every
    library's debug records: what to put back (the root's level, asyncio's logger)."""
    asyncio_logger = logging.getLogger("asyncio")
    return logging.getLogger().level, list(asyncio_logger.handlers), asyncio_logger.propagate


def _restore_logging(state: tuple[int, list, bool]) -> None:
    """Put back what ``_logging_state`` saved and take kopf's handler off the root (pytest's
    capture handlers, added and removed around each test phase, stay as they are)."""
    level, asyncio_handlers, asyncio_propagate = state
    root = logging.getLogger()
    root.setLevel(level)
    for handler in [h for h in root.handlers if type(h).__module__.startswith("kopf.")]:
        root.removeHandler(handler)
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.handlers[:] = asyncio_handlers
    asyncio_logger.propagate = asyncio_propagate


class Operator:
    """The operator in this process (kopf's KopfRunner), authenticated as the chart's
    ServiceAccount. stop()/start() simulate an operator restart."""

    def __init__(self, kubeconfig: Path, metrics_port: int):
        from harness.controlplane import free_port

        self.kubeconfig = kubeconfig
        self.metrics_port = metrics_port
        self.master_port = free_port()
        self.runner = None
        self.extra_env: dict[str, str] = {}
        self.outputs: list[str] = []
        self._saved_env: dict[str, Optional[str]] = {}

    def _env(self) -> dict[str, str]:
        return {"KONTRAST_OPERATOR_KUBECONFIG": str(self.kubeconfig),
                "KONTRAST_METRICS_PORT": str(self.metrics_port),
                # A short resync and progress interval keep the tests quick; the watchdog is
                # off except in its own test (a tiny model's first step may be slow here).
                "KONTRAST_RESYNC_SECONDS": "5", "KONTRAST_STATUS_INTERVAL": "1", "KONTRAST_HANG_SECONDS": "0",
                # The pods share the host's loopback with other test sessions: a rendezvous port
                # of this session's own, not torchrun's 29500 that every session would bind.
                "KONTRAST_MASTER_PORT": str(self.master_port),
                **self.extra_env}

    def start(self) -> "Operator":
        from kopf.testing import KopfRunner

        for k, v in self._env().items():
            self._saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v
        self._logging = _logging_state()
        self.runner = KopfRunner(["run", "--standalone", "--all-namespaces", "--verbose",
                                  "-m", "kontrast.operator.handlers"], timeout=60)
        self.runner.__enter__()
        # The startup handler serves the metrics last. The watches start after it, each with
        # a list, so what a test creates or changes before they start is seen all the same.
        wait_for(self._serving, 60, "the operator to start")
        return self

    def stop(self) -> None:
        if self.runner is None:
            return
        runner, self.runner = self.runner, None
        try:
            runner.__exit__(None, None, None)
        finally:
            _restore_logging(self._logging)
            try:
                self.outputs.append(runner.output)
            except Exception:  # no result when it crashed
                pass

    def reconciles(self) -> int:
        """Reconciles since this operator process started (ok and failed), from its /metrics."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("kontrast_operator_reconciles_total{"))

    def _serving(self) -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).read()
            return True
        except OSError:
            return False

    def restore_env(self) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    @property
    def output(self) -> str:
        return "\n".join(self.outputs)


def trainjob(name: str, tiny: dict[str, Path], epochs: int = 3, nodes: int = 2, **overrides: Any) -> dict:
    """A 2-node TrainJob of the tiny model: gloo on CPU, 4 optimizer steps per epoch."""
    scheduling = overrides.pop("scheduling", {})
    spec = {
        "model": str(tiny["model"]),
        "trainData": str(tiny["train"]),
        "evalData": str(tiny["eval"]),
        "output": f"pvc://runs/{name}",
        "leftKeys": ["query"], "leftWeights": [1.0],
        "rightKeys": ["image", "title"], "rightWeights": [0.5, 0.5],
        "weightKey": "score",
        "batchSize": 8, "epochs": epochs, "warmup": 2, "lr": 1.0e-3,
        "contextLength": 8, "gradCheckpointing": False, "precision": "fp32", "workers": 0,
        "nodes": nodes, "procsPerNode": 1,
        # The operator's default trainer image; the node agent runs it from this checkout.
        "scheduling": scheduling,
    }
    spec.update(overrides)
    return {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/instance": "argocd-app"}},
            "spec": copy.deepcopy(spec)}


class TJ:
    """Helpers for one namespace's TrainJobs and their children (as the admin)."""

    def __init__(self, control_plane, node_agent, namespace: str):
        self.cp = control_plane
        self.agent = node_agent
        self.kube = control_plane.kube()
        self.ns = namespace

    def create(self, obj: dict) -> dict:
        return self.kube.post(TJ_PATH.format(ns=self.ns), obj)

    def get(self, name: str) -> dict:
        return self.kube.get(f"{TJ_PATH.format(ns=self.ns)}/{name}")

    def status(self, name: str) -> dict:
        return self.get(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict) -> dict:
        return self.kube.patch(f"{TJ_PATH.format(ns=self.ns)}/{name}", {"spec": spec})

    def delete(self, name: str) -> None:
        try:
            self.kube.delete(f"{TJ_PATH.format(ns=self.ns)}/{name}")
        except ApiError as e:
            if e.status != 404:
                raise

    def cond(self, name: str, ctype: str) -> Optional[dict]:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == ctype), None)

    def wait_phase(self, name: str, phases, timeout: float = 240) -> dict:
        phases = (phases,) if isinstance(phases, str) else tuple(phases)

        def check():
            st = self.status(name)
            if st.get("phase") == "Failed" and "Failed" not in phases:
                raise AssertionError(f"{name} failed: {st.get('message')}\n{self.debug(name)}")
            return st if st.get("phase") in phases else None
        try:
            return wait_for(check, timeout, f"{name} in {phases}", interval=0.3)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.debug(name)}") from None

    def jobs(self, name: str) -> list[dict]:
        items = self.kube.get(f"/apis/batch/v1/namespaces/{self.ns}/jobs",
                              labelSelector=f"kontrast.dev/trainjob={name}")["items"]
        return sorted(items, key=lambda j: int(j["metadata"]["labels"]["kontrast.dev/attempt"]))

    def pods(self, name: str, attempt: Optional[int] = None) -> list[dict]:
        sel = f"kontrast.dev/trainjob={name}" + (f",kontrast.dev/attempt={attempt}" if attempt is not None else "")
        items = self.kube.get(f"/api/v1/namespaces/{self.ns}/pods", labelSelector=sel)["items"]
        return sorted(items, key=lambda p: (p["metadata"]["labels"].get("kontrast.dev/attempt", ""),
                                            p["metadata"]["annotations"].get(
                                                "batch.kubernetes.io/job-completion-index", "")))

    def children(self, name: str) -> dict[str, list[str]]:
        out = {}
        sel = f"kontrast.dev/trainjob={name}"
        for kind, path in (("Job", f"/apis/batch/v1/namespaces/{self.ns}/jobs"),
                           ("Pod", f"/api/v1/namespaces/{self.ns}/pods"),
                           ("Service", f"/api/v1/namespaces/{self.ns}/services"),
                           ("ConfigMap", f"/api/v1/namespaces/{self.ns}/configmaps"),
                           ("ServiceAccount", f"/api/v1/namespaces/{self.ns}/serviceaccounts"),
                           ("Role", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{self.ns}/roles"),
                           ("RoleBinding", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{self.ns}/rolebindings")):
            names = [i["metadata"]["name"] for i in self.kube.get(path, labelSelector=sel)["items"]]
            if names:
                out[kind] = names
        return out

    def events(self, name: str) -> list[dict]:
        return self.kube.get(f"/api/v1/namespaces/{self.ns}/events",
                             fieldSelector=f"involvedObject.name={name},involvedObject.kind=TrainJob")["items"]

    def log(self, pod: dict) -> str:
        try:
            return self.agent.log(self.ns, pod["metadata"]["name"])
        except KeyError:
            return ""

    def debug(self, name: str) -> str:
        """What to print when a wait times out: status, children, the pods' log tails."""
        try:
            st = self.status(name)
        except Exception as e:  # noqa: BLE001
            st = {"error": str(e)}
        lines = [f"status: {json.dumps(st, indent=1)[:3000]}", f"children: {self.children(name)}"]
        for p in self.pods(name)[-4:]:
            lines.append(f"--- pod {p['metadata']['name']} {p['status'].get('phase')}:\n"
                         + "\n".join(self.log(p).splitlines()[-25:]))
        return "\n".join(lines)

    def wait_gone(self, name: str, timeout: float = 120) -> None:
        """Delete the TrainJob and wait until its pods are gone (they share the loopback
        network, so the next test's rendezvous port must be free)."""
        self.delete(name)
        wait_for(lambda: not self.pods(name), timeout, f"the pods of {name} to be gone")




class StatusRecorder:
    """Watches one TrainJob and records every status it goes through (a poll could miss a
    phase that lasts a second, such as Restarting)."""

    def __init__(self, kube, namespace: str, name: str):
        self.kube = kube
        self.path = TJ_PATH.format(ns=namespace)
        self.name = name
        self.statuses: list[dict] = []
        self._stop = False
        self._thread = None

    def __enter__(self) -> "StatusRecorder":
        import threading

        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True

    def _run(self) -> None:
        while not self._stop:
            try:
                listed = self.kube.get(self.path, fieldSelector=f"metadata.name={self.name}")
                for item in listed["items"]:
                    self.statuses.append(item.get("status") or {})
                rv = listed["metadata"]["resourceVersion"]
                for event in self.kube.watch(self.path, rv, timeout_seconds=10):
                    if self._stop:
                        return
                    if event["type"] in ("ADDED", "MODIFIED") and \
                            event["object"]["metadata"]["name"] == self.name:
                        self.statuses.append(event["object"].get("status") or {})
            except Exception:  # noqa: BLE001 - re-list
                time.sleep(0.2)

    def phases(self) -> list[str]:
        out: list[str] = []
        for st in self.statuses:
            p = st.get("phase")
            if p and (not out or out[-1] != p):
                out.append(p)
        return out
