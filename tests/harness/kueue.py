"""Kueue's real manager against the test control plane.

Why: whether the operator and Kueue agree about a Job's `suspend` can only be shown by the
real Kueue admitting, queueing and preempting. tools/k8s-testbin/build.sh builds the manager
(sigs.k8s.io/kueue/cmd/kueue) and caches, beside it, that release's CRDs and webhook
configurations (`<bin>/kueue-config/{crds/,webhooks.yaml}`).

What it takes to run here, where nothing can reach a Service's ClusterIP:

- Kueue's own certificate management is off; its webhook server listens on 127.0.0.1 with a
  serving cert from the test CA, and the webhook configurations and the CRDs' conversion
  webhooks call it through `url:` client configs (Kueue's manifests use `service:`).
- Only the webhooks the manager serves are registered: batch/Job and Kueue's own kinds. A
  registered path it does not serve would fail every request for that kind.
- With certificate management off, the manager reads its metrics certificate from the fixed
  path /etc/kueue/metrics/certs; it runs in a private mount namespace in which the test's
  cert folder is bind-mounted there.
- The visibility API server (VisibilityOnDemand) is switched off: it is an aggregated API
  that needs an APIService; the tests read Workloads instead.
- It runs with the admin kubeconfig (not its chart's RBAC) and without leader election.
"""

from __future__ import annotations

import base64
import os
import shutil
import urllib.request
from pathlib import Path

import yaml

from harness.controlplane import ControlPlane, free_port
from harness.kube import ApiError

METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")  # fixed in cmd/kueue/main.go
GROUP = "kueue.x-k8s.io"
#: The CRDs whose conversion webhook Kueue's kustomization enables (config/components/crd).
CONVERTED = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
WEBHOOK_NAMES = {"MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
                 "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration"}
WEBHOOK_PATHS = {"MutatingWebhookConfiguration": "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                 "ValidatingWebhookConfiguration": "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"}


def served(webhook: dict) -> bool:
    """Whether the manager serves this webhook with only the batch/Job integration on."""
    path = webhook["clientConfig"]["service"]["path"]
    return path.endswith("-batch-v1-job") or "-kueue-x-k8s-io-" in path


class Kueue:
    """The Kueue manager process; start()/stop() or a `with` block."""

    def __init__(self, control_plane: ControlPlane, bin_dir: Path):
        self.cp = control_plane
        self.binary = Path(bin_dir) / "kueue"
        self.config_dir = Path(bin_dir) / "kueue-config"
        self.dir = control_plane.workdir / "kueue"
        self.webhook_port = free_port()
        self.health_port = free_port()
        self._created_dirs: list[Path] = []
        #: Kueue's manageJobsWithoutQueueName: suspend and queue every Job, labelled or not.
        self.manage_jobs_without_queue_name = False

    def __enter__(self) -> "Kueue":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.webhook_port}"

    def start(self) -> "Kueue":
        if not os.access(self.binary, os.X_OK) or not (self.config_dir / "webhooks.yaml").is_file():
            raise RuntimeError(f"Kueue is not built: {self.binary} or {self.config_dir}/webhooks.yaml is missing; "
                               "run tools/k8s-testbin/build.sh")
        self._write_certs()
        self._install_crds()
        self.cp.create_namespace("kueue-system")
        self._spawn()
        self._register_webhooks()
        return self

    def stop(self) -> None:
        """Unregister the webhooks (a dead webhook would block every Job), stop the manager."""
        kube = self.cp.kube()
        for kind, name in WEBHOOK_NAMES.items():
            try:
                kube.delete(f"{WEBHOOK_PATHS[kind]}/{name}")
            except Exception:  # noqa: BLE001 - the control plane may be gone already
                pass
        proc = self.cp.procs.pop("kueue", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                proc.kill()
        for d in reversed(self._created_dirs):
            try:
                d.rmdir()
            except OSError:
                pass

    def reconfigure(self, *, manage_jobs_without_queue_name: bool) -> None:
        """Restart the manager with another configuration (the webhooks stay registered: the
        new process serves them on the same port once it is ready)."""
        proc = self.cp.procs.pop("kueue", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                proc.kill()
                proc.wait(timeout=10)
        self.manage_jobs_without_queue_name = manage_jobs_without_queue_name
        self._spawn()

    def log_tail(self, lines: int = 60) -> str:
        return self.cp.log_tail("kueue", lines)

    # ------------------------------------------------------------------ set-up steps
    def _write_certs(self) -> None:
        crt, key = self.cp.issue_serving_cert("kueue-webhook", "kueue-webhook", ["IP:127.0.0.1", "DNS:localhost"])
        self.cert_dir = self.dir / "certs"
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(crt, self.cert_dir / "tls.crt")
        shutil.copy(key, self.cert_dir / "tls.key")
        self.ca_bundle = base64.b64encode(self.cp.ca_file.read_bytes()).decode()

    def _install_crds(self) -> None:
        for path in sorted((self.config_dir / "crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            if crd["spec"]["names"]["plural"] in CONVERTED:
                crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                    "conversionReviewVersions": ["v1"],
                    "clientConfig": {"url": f"{self.url}/convert", "caBundle": self.ca_bundle}}}
            self._install_crd(crd)

    def _install_crd(self, crd: dict) -> None:
        tmp = self.dir / "crd.yaml"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(yaml.safe_dump(crd))
        self.cp.install_crd(tmp)

    def _config(self) -> dict:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": self.webhook_port, "certDir": str(self.cert_dir)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]},
            "manageJobsWithoutQueueName": self.manage_jobs_without_queue_name,
        }

    def _spawn(self) -> None:
        config = self.dir / "config.yaml"
        config.write_text(yaml.safe_dump(self._config()))
        self._mkdirs(METRICS_CERT_DIR)
        # Bind-mount the cert folder at the fixed metrics path, in a mount namespace of its own.
        script = 'mount --bind "$0" "$1" && shift && exec "$@"'
        self.cp._spawn("kueue", [
            "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            str(self.cert_dir), str(METRICS_CERT_DIR),
            str(self.binary), f"--config={config}", f"--kubeconfig={self.cp.kubeconfig}",
            "--feature-gates=VisibilityOnDemand=false", "--zap-log-level=2",
        ])

        def ready() -> bool:
            # readyz includes the webhook server's own TLS check.
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as r:
                return r.status == 200
        self.cp._wait("kueue", ready, 300)

    def _mkdirs(self, path: Path) -> None:
        """mkdir -p, remembering what it created so stop() removes it again."""
        missing = [p for p in [path, *path.parents] if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            self._created_dirs.append(p)

    def _register_webhooks(self) -> None:
        kube = self.cp.kube()
        for doc in yaml.safe_load_all((self.config_dir / "webhooks.yaml").read_text()):
            if not doc:
                continue
            kind = doc["kind"]
            webhooks = [w for w in doc["webhooks"] if served(w)]
            for w in webhooks:
                path = w["clientConfig"]["service"]["path"]
                w["clientConfig"] = {"url": f"{self.url}{path}", "caBundle": self.ca_bundle}
            body = {"apiVersion": doc["apiVersion"], "kind": kind,
                    "metadata": {"name": WEBHOOK_NAMES[kind]}, "webhooks": webhooks}
            try:
                kube.post(WEBHOOK_PATHS[kind], body)
            except ApiError as e:
                if e.status != 409:
                    raise
                body["metadata"]["resourceVersion"] = kube.get(
                    f"{WEBHOOK_PATHS[kind]}/{WEBHOOK_NAMES[kind]}")["metadata"]["resourceVersion"]
                kube.put(f"{WEBHOOK_PATHS[kind]}/{WEBHOOK_NAMES[kind]}", body)

    # ------------------------------------------------------------------ reading Kueue's view
    def workloads(self, namespace: str) -> list[dict]:
        return self.cp.kube().get(f"/apis/{GROUP}/v1beta2/namespaces/{namespace}/workloads")["items"]
