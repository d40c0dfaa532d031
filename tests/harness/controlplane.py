"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

Why: operator and schema tests mean little against a mock; this runs the real binaries built
by tools/k8s-testbin/build.sh, with TLS, RBAC, ServiceAccount tokens and the controllers that
turn Jobs into pods and garbage-collect owned objects. There is no kubelet: a test node agent
(harness.nodeagent) runs the pods.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from harness.kube import ApiError, Kube

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tools" / "k8s-testbin" / "build.sh"
CRD_FILE = REPO / "crds" / "trainjob.yaml"
SERVICE_CIDR = "10.0.0.0/24"


def ensure_binaries() -> Path:
    """Return the bin dir of the test binaries, building them first if they are missing.

    KONTRAST_TESTBIN_DIR points at a ready bin dir; otherwise build.sh decides (seconds when
    warm, tens of minutes cold). A failed build raises: the k8s tests never skip.
    """
    given = os.environ.get("KONTRAST_TESTBIN_DIR")
    if given:
        bin_dir = Path(given)
    else:
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}; see its stderr")
        bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm"):
        if not os.access(bin_dir / name, os.X_OK):
            raise RuntimeError(f"missing test binary {bin_dir / name}")
    return bin_dir


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Child pre-exec: SIGKILL this process if pytest dies, so no server outlives the session."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr}")


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL what ignores it for 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager in a temporary folder.

    Use start()/stop() or a `with` block. `kubeconfig` is an admin kubeconfig (system:masters);
    service_account_kubeconfig()/service_account_client() give the credentials of a
    ServiceAccount so tests can run code under real RBAC.
    """

    def __init__(self, bin_dir: Path, workdir: Path | None = None, *, address: str = "127.0.0.1",
                 apiserver_args: list[str] = (), controllers: str = "*,-node-lifecycle-controller"):
        """`address`: where kube-apiserver listens and what it advertises (the `kubernetes`
        Service's endpoint when it is not loopback: harness.node puts it on the pod bridge).
        `apiserver_args` are appended to kube-apiserver's; `controllers` is KCM's --controllers."""
        self.bin_dir = Path(bin_dir)
        self.address = address
        self.apiserver_args = list(apiserver_args)
        self.controllers = controllers
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kontrast-cp-"))
        self.pki = self.workdir / "pki"
        self.port = free_port()
        self.server = f"https://{address}:{self.port}"
        self.ca_file = self.pki / "ca.crt"
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.admin_token = secrets.token_hex(24)
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}
        self._kube: Kube | None = None

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "ControlPlane":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, install_crds: bool = True) -> "ControlPlane":
        try:
            self._make_pki()
            self._write_kubeconfig(self.kubeconfig, self.admin_token, "default")
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            if install_crds:
                self.install_crd(CRD_FILE)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every component (controllers first, etcd last); SIGKILL what ignores SIGTERM."""
        for name in reversed(list(self.procs)):
            _terminate(self.procs[name])
        self.procs.clear()
        if self._own_workdir and not os.environ.get("KONTRAST_KEEP_CONTROLPLANE"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def apiserver_down(self):
        """Stop kube-apiserver for the block, then start it again (etcd keeps the state). Its
        new watch cache starts at etcd's current revision, so a client resuming a watch from
        an older resourceVersion gets 410 Gone and must list again: what a real API server's
        restart does to the operator's watches."""
        _terminate(self.procs["kube-apiserver"])
        try:
            yield
        finally:
            self._start_apiserver()

    def etcd_delete(self, key: str) -> int:
        """Delete ``key`` in etcd, below the API server (its v3 JSON gateway); the number deleted."""
        body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
        req = urllib.request.Request(f"{self.etcd_url}/v3/kv/deleterange", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(json.load(r).get("deleted", 0))

    # ---------------------------------------------------------------- credentials
    def _make_pki(self) -> None:
        pki = self.pki
        pki.mkdir(parents=True, exist_ok=True)
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                 "-days", "3650", "-subj", "/CN=kontrast-test-ca",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=pki)
        # The serving cert must be valid for 127.0.0.1: in-pod clients connect there.
        self.issue_serving_cert("apiserver", "kube-apiserver", [
            "IP:127.0.0.1", "IP:10.0.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"]
            + ([f"IP:{self.address}"] if self.address != "127.0.0.1" else []))
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
        (pki / "tokens.csv").write_text(f'{self.admin_token},kontrast-admin,kontrast-admin,"system:masters"\n')

    def issue_serving_cert(self, name: str, common_name: str, sans: list[str]) -> tuple[Path, Path]:
        """A TLS serving cert signed by the test CA: (pki/<name>.crt, pki/<name>.key)."""
        pki = self.pki
        (pki / f"{name}.ext").write_text(
            f"subjectAltName={','.join(sans)}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/CN={common_name}", cwd=pki)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "3650", "-out", f"{name}.crt",
                 "-extfile", f"{name}.ext", cwd=pki)
        return pki / f"{name}.crt", pki / f"{name}.key"

    def _write_kubeconfig(self, path: Path, token: str, namespace: str) -> Path:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "kontrast-test",
                          "cluster": {"server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "kontrast-test",
                          "context": {"cluster": "kontrast-test", "user": "user", "namespace": namespace}}],
            "current-context": "kontrast-test",
        }
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    # ---------------------------------------------------------------- components
    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        self._logs[name] = log
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.workdir, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 40) -> str:
        log = self._logs.get(name)
        if not log or not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def _wait(self, name: str, check, timeout: float) -> None:
        """Poll check() until it is truthy; fail with the component's log when it dies or times out."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                if check():
                    return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready after {timeout}s (last error: {last}):\n{self.log_tail(name)}")

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        self._spawn("etcd", [
            str(self.bin_dir / "etcd"), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}", f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}", "--unsafe-no-fsync=true", "--log-level=warn",
        ])

        def healthy() -> bool:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as r:
                return json.load(r).get("health") == "true"
        self._wait("etcd", healthy, 60)

    def _start_apiserver(self) -> None:
        pki = self.pki
        self._spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            f"--bind-address={self.address}", f"--advertise-address={self.address}", f"--secure-port={self.port}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={pki / 'tokens.csv'}",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--allow-privileged=true",
            # The built-in `kubernetes` Service would point at 127.0.0.1, which Endpoints reject;
            # in-pod clients get KUBERNETES_SERVICE_HOST=127.0.0.1 from the node agent instead.
            *(["--endpoint-reconciler-type=none"] if self.address == "127.0.0.1" else []),
            # Fewer background goroutines on a 2-core machine.
            "--enable-priority-and-fairness=false", "--profiling=false",
            *self.apiserver_args,
        ])
        ctx = ssl.create_default_context(cafile=str(self.ca_file))

        def ready() -> bool:
            req = urllib.request.Request(f"{self.server}/readyz",
                                         headers={"Authorization": f"Bearer {self.admin_token}"})
            with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
                return r.status == 200
        self._wait("kube-apiserver", ready, 180)

    def _start_controller_manager(self) -> None:
        pki = self.pki
        self._spawn("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # No kubelet heartbeats here: without this controller the node agent's Node would be
            # tainted unreachable and its pods evicted whenever the agent is slow.
            f"--controllers={self.controllers}",
        ])
        kube = self.kube()

        def serviceaccounts_controller_up() -> bool:
            kube.get("/api/v1/namespaces/default/serviceaccounts/default")
            kube.get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt")
            return True
        self._wait("kube-controller-manager", serviceaccounts_controller_up, 120)

    # ---------------------------------------------------------------- clients
    def api_client(self) -> k8s_client.ApiClient:
        """A new kubernetes ApiClient authenticated as the admin (system:masters)."""
        return k8s_config.new_client_from_config(config_file=str(self.kubeconfig))

    def kube(self) -> Kube:
        """The raw JSON client as the admin (harness.kube.Kube); shared, thread-safe."""
        if self._kube is None:
            self._kube = Kube(self.api_client())
        return self._kube

    def version(self) -> dict:
        return self.kube().get("/version")

    def service_account_token(self, namespace: str, name: str, expiration_seconds: int = 3600,
                              audiences: list[str] | None = None, bound_pod: dict | None = None) -> str:
        """A token for a ServiceAccount from the TokenRequest API (as a kubelet would get it)."""
        spec: dict = {"audiences": audiences or [], "expirationSeconds": expiration_seconds}
        if bound_pod is not None:
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1",
                                      "name": bound_pod["metadata"]["name"],
                                      "uid": bound_pod["metadata"]["uid"]}
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        out = self.kube().post(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", body)
        return out["status"]["token"]

    def kubeconfig_for_token(self, token: str, path: Path, namespace: str = "default") -> Path:
        return self._write_kubeconfig(Path(path), token, namespace)

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path | None = None) -> Path:
        """A kubeconfig that acts as system:serviceaccount:<namespace>:<name>."""
        token = self.service_account_token(namespace, name)
        path = Path(path or self.workdir / f"sa-{namespace}-{name}.kubeconfig")
        return self.kubeconfig_for_token(token, path, namespace)

    def service_account_client(self, namespace: str, name: str) -> k8s_client.ApiClient:
        path = self.service_account_kubeconfig(namespace, name)
        return k8s_config.new_client_from_config(config_file=str(path))

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (kubectl, helm, kopf) that should talk to this cluster."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.bin_dir / "kubectl"), *args], input=input, text=True,
                              capture_output=True, env=self.env(), timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.bin_dir / "helm"), *args], text=True, capture_output=True,
                              env=self.env(), timeout=300)
        if check and proc.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    # ---------------------------------------------------------------- objects
    def create_namespace(self, name: str, timeout: float = 60) -> str:
        """Create a namespace and wait for its `default` ServiceAccount and root CA ConfigMap,
        without which pods are rejected (ServiceAccount admission) or cannot start."""
        kube = self.kube()
        kube.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        deadline = time.monotonic() + timeout
        while True:
            try:
                kube.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")
                kube.get(f"/api/v1/namespaces/{name}/configmaps/kube-root-ca.crt")
                return name
            except ApiError as e:
                if e.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def install_crd(self, path: Path, timeout: float = 60) -> dict:
        """Create (or replace) a CustomResourceDefinition and wait until it is Established."""
        kube = self.kube()
        crd = yaml.safe_load(Path(path).read_text())
        name = crd["metadata"]["name"]
        base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        try:
            kube.post(base, crd)
        except ApiError as e:
            if e.status != 409:
                raise
            crd["metadata"]["resourceVersion"] = kube.get(f"{base}/{name}")["metadata"]["resourceVersion"]
            kube.put(f"{base}/{name}", crd)
        deadline = time.monotonic() + timeout
        while True:
            current = kube.get(f"{base}/{name}")
            conds = {c["type"]: c for c in (current.get("status") or {}).get("conditions") or []}
            if conds.get("Established", {}).get("status") == "True":
                return current
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {name} not Established: {conds}")
            time.sleep(0.2)
