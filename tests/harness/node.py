"""A real Kubernetes node for the `node` test tier: containerd + runc, kubelet, kube-proxy,
kube-scheduler, CoreDNS and an OCI registry, against a control plane of its own.

Why: the fast tiers run pods through harness.nodeagent (processes on the host). This tier runs
what a cluster runs: images pulled from a registry through the CRI, containers under runc with
their securityContext, cgroup limits (OOM kills), pod IPs on a CNI bridge, cluster DNS,
Services through kube-proxy, `kubectl logs` through the kubelet.

Everything is built or installed by tools/k8s-node/build.sh and tools/images/build.sh. Traffic
stays on this machine: the API server, kubelet, CoreDNS and the registry listen on loopback
or on the bridge this harness creates (BRIDGE, GATEWAY in POD_CIDR); a FORWARD rule drops
anything from the bridge to any other interface. Node-tier sessions take a machine-wide lock
(one bridge, one kubelet at a time). stop() removes every pod, container, network namespace,
mount, iptables rule and the bridge it made, and restores the sysctls it changed.

Caches that outlive a session (like a real node's): the registry's storage (shared with
tools/images/build.sh) and containerd's root (pulled images and their unpacked layers).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from harness.controlplane import REPO, ControlPlane, _openssl, ensure_binaries, free_port
from harness.kube import ApiError

log = logging.getLogger("kontrast.test.node")

NODE_BUILD = REPO / "tools" / "k8s-node" / "build.sh"
IMAGES_BUILD = REPO / "tools" / "images" / "build.sh"
BRIDGE = "kontrast0"
GATEWAY = "10.244.0.1"
POD_CIDR = "10.244.0.0/24"
NODE_NAME = "kontrast-node"
CLUSTER_DOMAIN = "cluster.local"
CACHE = Path(os.environ.get("KONTRAST_NODE_CACHE", Path.home() / ".cache" / "kontrast" / "node"))
IMAGES_CACHE = Path(os.environ.get("KONTRAST_IMAGES_CACHE", Path.home() / ".cache" / "kontrast" / "images"))
LOCK = Path("/run/lock/kontrast-node.lock") if Path("/run/lock").is_dir() else Path("/tmp/kontrast-node.lock")
# The container processes' rlimits (the host's hard RLIMIT_NOFILE is 20000 on CI machines).
RLIMITS = [{"type": "RLIMIT_NOFILE", "hard": 10000, "soft": 10000},
           {"type": "RLIMIT_NPROC", "hard": 4000, "soft": 4000}]


def ensure_node_binaries() -> Path:
    """The folder of node binaries (tools/k8s-node/build.sh; seconds when warm)."""
    given = os.environ.get("KONTRAST_NODE_BIN_DIR")
    if given:
        return Path(given)
    proc = subprocess.run(["bash", str(NODE_BUILD)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{NODE_BUILD} failed with exit code {proc.returncode}; see its stderr")
    return Path(proc.stdout.strip().splitlines()[-1])


def _run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _read(path: str) -> str:
    return Path(path).read_text().strip()


def _write(path: str, value: str) -> None:
    Path(path).write_text(value)


class NodeControlPlane(ControlPlane):
    """The control plane on the pod bridge's gateway address (pods reach it through the
    `kubernetes` Service), every controller on, and a client certificate the API server shows
    the kubelet (for logs and exec)."""

    def __init__(self, bin_dir: Path, workdir: Path):
        pki = Path(workdir) / "pki"
        super().__init__(bin_dir, workdir, address=GATEWAY, controllers="*", apiserver_args=[
            f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
        ])

    def _make_pki(self) -> None:
        super()._make_pki()
        pki = self.pki
        (pki / "client.ext").write_text("basicConstraints=critical,CA:FALSE\n"
                                        "keyUsage=critical,digitalSignature,keyEncipherment\n"
                                        "extendedKeyUsage=clientAuth\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "kubelet-client.key", "-out",
                 "kubelet-client.csr", "-subj", "/O=system:masters/CN=kube-apiserver-kubelet-client", cwd=pki)
        _openssl("x509", "-req", "-in", "kubelet-client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "3650", "-out", "kubelet-client.crt", "-extfile", "client.ext", cwd=pki)

    def start_scheduler(self, node_bin: Path) -> None:
        self._spawn("kube-scheduler", [str(node_bin / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
                                       "--leader-elect=false", "--secure-port=0"])


class Node:
    """The node (and its own control plane). start() builds what is missing, then starts
    every component and waits until the Node is Ready; `images` maps trainer/operator/pause to
    the references pushed to the registry."""

    def __init__(self, workdir: Path, registry_port: int | None = None):
        self.workdir = Path(workdir)
        # A fixed address: buildah remembers which compressed blobs a registry (by address)
        # holds, and zstd output differs run to run, so a new address each session re-uploads
        # and stores the 3 GB torch layer again. Below 32768, outside Linux's ephemeral range,
        # so no client socket holds it (35000 once was).
        self.registry_port = registry_port or int(os.environ.get("KONTRAST_REGISTRY_PORT", "31500"))
        self.registry = f"127.0.0.1:{self.registry_port}"
        self.cp: NodeControlPlane | None = None
        self.bin: Path | None = None
        self.images: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self._lock_fd: int | None = None
        self._sysctls: dict[str, str] = {}
        self._chains_before: set[tuple[str, str]] = set()
        self._bridge_made = False
        self._iptables_made = False
        self.containerd_sock = self.workdir / "containerd" / "containerd.sock"
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "Node":
        self._lock()
        try:
            t = time.monotonic()
            testbin = ensure_binaries()
            self.bin = ensure_node_binaries()
            self.timings["binaries"] = time.monotonic() - t
            self._network()
            self.cp = NodeControlPlane(testbin, self.workdir / "controlplane")
            self.cp.start(install_crds=False)
            self.cp.start_scheduler(self.bin)
            self._start_registry()
            t = time.monotonic()
            self.images = self._build_images()
            self.timings["images"] = time.monotonic() - t
            self._start_containerd()
            self._start_kubelet()
            self._start_kube_proxy()
            self._start_coredns()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            if self.cp is not None and "kubelet" in self.procs:
                self._drain()
        except Exception as e:  # noqa: BLE001 - clean up the rest regardless
            log.warning("draining the node failed: %s", e)
        for name in ("coredns", "kube-proxy", "kubelet"):
            self._terminate(name)
        self._remove_containers()
        self._terminate("containerd")
        self._terminate("registry")
        if self._bridge_made and self.bin is not None:
            _run(str(self.bin / "kube-proxy"), "--cleanup", check=False)  # its iptables chains
        self._unmount_all()
        if self.cp is not None:
            self.cp.stop()
        self._network_down()
        self._unlock()

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _lock(self) -> None:
        fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + float(os.environ.get("KONTRAST_NODE_LOCK_TIMEOUT", "3600"))
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RuntimeError(f"another node-tier session holds {LOCK}")
                time.sleep(1)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---------------------------------------------------------------- processes
    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log_path = self.workdir / f"{name}.log"
        from harness.controlplane import _die_with_parent
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.workdir, start_new_session=True, env=env,
                                    preexec_fn=_die_with_parent)
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _wait(self, name: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                if check():
                    return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
            time.sleep(0.3)
        raise RuntimeError(f"{name} not ready after {timeout}s (last: {last}):\n{self.log_tail(name)}")

    def _terminate(self, name: str, timeout: float = 20) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    # ---------------------------------------------------------------- network
    def _sysctl(self, path: str, value: str) -> None:
        if path not in self._sysctls:
            self._sysctls[path] = _read(path)
        _write(path, value)

    @staticmethod
    def _kube_chains() -> set[tuple[str, str]]:
        chains = set()
        for table in ("filter", "nat", "mangle"):
            for line in _run("iptables", "-w", "-t", table, "-S", check=False).stdout.splitlines():
                if line.startswith("-N KUBE-"):
                    chains.add((table, line.split()[1]))
        return chains

    def _remove_kube_chains(self) -> None:
        """The KUBE-* chains the kubelet and kube-proxy made (`kube-proxy --cleanup` leaves the
        kubelet's), and the rules that jump to them; chains that were there before stay."""
        ours = self._kube_chains() - self._chains_before
        for table in {t for t, _ in ours}:
            names = {c for t, c in ours if t == table}
            for line in _run("iptables", "-w", "-t", table, "-S", check=False).stdout.splitlines():
                parts = line.split()
                if parts[:1] == ["-A"] and parts[1] not in names and "-j" in parts \
                        and parts[parts.index("-j") + 1] in names:
                    _run("iptables", "-w", "-t", table, "-D", *parts[1:], check=False)
            for name in names:
                _run("iptables", "-w", "-t", table, "-F", name, check=False)
            for name in names:
                _run("iptables", "-w", "-t", table, "-X", name, check=False)

    def _network(self) -> None:
        self._chains_before = self._kube_chains()
        if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            # Left over by a session that was killed (the lock says none is running now).
            _run("ip", "link", "delete", BRIDGE)
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._bridge_made = True
        _run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # Pod -> ClusterIP -> pod on the same bridge needs routing and bridged packets seen by
        # iptables (kube-proxy's DNAT).
        self._sysctl("/proc/sys/net/ipv4/ip_forward", "1")
        self._sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables", "1")
        # Pods talk to each other and to this host, never beyond: drop forwarding off the bridge.
        _run("iptables", "-w", "-N", "KONTRAST-NODE", check=False)
        _run("iptables", "-w", "-F", "KONTRAST-NODE")
        _run("iptables", "-w", "-A", "KONTRAST-NODE", "-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP")
        _run("iptables", "-w", "-A", "KONTRAST-NODE", "-o", BRIDGE, "!", "-i", BRIDGE, "-j", "DROP")
        if _run("iptables", "-w", "-C", "FORWARD", "-j", "KONTRAST-NODE", check=False).returncode != 0:
            _run("iptables", "-w", "-I", "FORWARD", "1", "-j", "KONTRAST-NODE")
        self._iptables_made = True

    def _network_down(self) -> None:
        if self._iptables_made:
            self._remove_kube_chains()
            while _run("iptables", "-w", "-D", "FORWARD", "-j", "KONTRAST-NODE", check=False).returncode == 0:
                pass
            _run("iptables", "-w", "-F", "KONTRAST-NODE", check=False)
            _run("iptables", "-w", "-X", "KONTRAST-NODE", check=False)
            self._iptables_made = False
        if self._bridge_made:
            _run("ip", "link", "delete", BRIDGE, check=False)
            self._bridge_made = False
        for path, value in self._sysctls.items():
            try:
                _write(path, value)
            except OSError as e:
                log.warning("could not restore %s: %s", path, e)
        self._sysctls.clear()

    # ---------------------------------------------------------------- registry and images
    def _start_registry(self) -> None:
        storage = IMAGES_CACHE / "registry"
        storage.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "registry.yml"
        cfg.write_text(yaml.safe_dump({
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.registry},
        }))
        self._spawn("registry", [str(self.bin / "registry"), "serve", str(cfg)])

        def up() -> bool:
            with urllib.request.urlopen(f"http://{self.registry}/v2/", timeout=2) as r:
                return r.status == 200
        self._wait("registry", up, 30)

    def _build_images(self) -> dict[str, str]:
        """tools/images/build.sh against this registry: what a user runs against theirs."""
        env = {**os.environ, "NODE_BIN": str(self.bin)}
        proc = subprocess.run(["bash", str(IMAGES_BUILD), "--registry", f"{self.registry}/kontrast",
                               "trainer", "operator", "pause"], stdout=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{IMAGES_BUILD} failed with exit code {proc.returncode}; see its stderr")
        refs = dict(line.split("=", 1) for line in proc.stdout.strip().splitlines() if "=" in line)
        assert {"trainer", "operator", "pause"} <= set(refs), refs
        return refs

    # ---------------------------------------------------------------- containerd
    def _base_spec(self) -> Path:
        """containerd's default OCI spec with explicit rlimits (runc cannot raise the
        process's RLIMIT_NOFILE above the host's hard limit)."""
        spec = json.loads(_run(str(self.bin / "ctr"), "oci", "spec").stdout)
        spec["process"]["rlimits"] = RLIMITS
        path = self.workdir / "containerd" / "base-spec.json"
        path.write_text(json.dumps(spec, indent=1))
        return path

    def _start_containerd(self) -> None:
        d = self.workdir / "containerd"
        (d / "certs.d" / self.registry).mkdir(parents=True, exist_ok=True)
        (d / "certs.d" / self.registry / "hosts.toml").write_text(
            f'server = "http://{self.registry}"\n\n[host."http://{self.registry}"]\n'
            '  capabilities = ["pull", "resolve"]\n')
        cni = self.workdir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-kontrast.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "kontrast",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "isDefaultGateway": True,
                 "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY}]],
                          "dataDir": str(cni / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=1))
        root = CACHE / "containerd"
        root.mkdir(parents=True, exist_ok=True)
        runc = os.environ.get("KONTRAST_RUNC") or shutil.which("runc") or str(self.bin / "runc")
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f'''version = 2
root = "{root}"
state = "{d / 'state'}"
[grpc]
  address = "{self.containerd_sock}"
[ttrpc]
  address = "{self.containerd_sock}.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
[{cri}]
  sandbox_image = "{self.images['pause']}"
  enable_selinux = false
  netns_mounts_under_state_dir = true
  # Root here lacks CAP_SYS_RESOURCE: no process may lower its oom_score_adj (the kubelet asks
  # -998 for sandboxes, -997 for Guaranteed pods); keep scores at or above containerd's own.
  restrict_oom_score_adj = true
  image_pull_progress_timeout = "10m"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = true
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      base_runtime_spec = "{self._base_spec()}"
      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{self.bin / 'cni'}"
    conf_dir = "{cni / 'net.d'}"
  [{cri}.registry]
    config_path = "{d / 'certs.d'}"
'''
        (d / "config.toml").write_text(config)
        self._spawn("containerd", [str(self.bin / "containerd"), "--config", str(d / "config.toml")])
        self._wait("containerd", lambda: self.ctr("version").returncode == 0, 60)

    def ctr(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return _run(str(self.bin / "ctr"), "--address", str(self.containerd_sock), "--namespace", "k8s.io", *args, check=check)

    # ---------------------------------------------------------------- kubelet
    def _start_kubelet(self) -> None:
        d = self.workdir / "kubelet"
        d.mkdir(parents=True, exist_ok=True)
        kubeconfig = self.cp.kubeconfig
        (d / "resolv.conf").write_text("")  # pods resolve cluster names only
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": GATEWAY, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.cp.ca_file)}},
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "clusterDNS": [GATEWAY], "clusterDomain": CLUSTER_DOMAIN, "resolvConf": str(d / "resolv.conf"),
            # A CUDA torch image is gigabytes: allow its first pull time.
            "runtimeRequestTimeout": "30m", "serializeImagePulls": False,
            # Other tenants of a CI machine fill its disk: evict only when nearly full.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 99, "imageGCLowThresholdPercent": 98,
            "maxPods": 30, "podPidsLimit": 4000,
            "syncFrequency": "5s", "nodeStatusUpdateFrequency": "5s", "fileCheckFrequency": "5s",
            "protectKernelDefaults": False, "makeIPTablesUtilChains": False,
            "staticPodPath": "", "tlsMinVersion": "VersionTLS12",
            "localStorageCapacityIsolation": True,
        }
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        self._spawn("kubelet", [str(self.bin / "kubelet"), f"--config={d / 'config.yaml'}",
                                f"--kubeconfig={kubeconfig}", f"--root-dir={d / 'root'}",
                                f"--hostname-override={NODE_NAME}", f"--node-ip={GATEWAY}",
                                f"--cert-dir={d / 'pki'}", "--v=1"])
        kube = self.cp.kube()

        def ready() -> bool:
            node = kube.get(f"/api/v1/nodes/{NODE_NAME}")
            conds = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
            return conds.get("Ready") == "True"
        self._wait("kubelet", ready, 180)

    def _start_kube_proxy(self) -> None:
        d = self.workdir / "kube-proxy"
        d.mkdir(parents=True, exist_ok=True)
        health = free_port()
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clientConnection": {"kubeconfig": str(self.cp.kubeconfig)},
            "hostnameOverride": NODE_NAME, "clusterCIDR": POD_CIDR,
            "bindAddress": "127.0.0.1",
            "healthzBindAddress": f"127.0.0.1:{health}", "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [f"{GATEWAY}/32"],
            # Leave the host's conntrack and route_localnet sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0},
            "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
        }
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        self._spawn("kube-proxy", [str(self.bin / "kube-proxy"), f"--config={d / 'config.yaml'}"])

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as r:
                return r.status == 200
        self._wait("kube-proxy", healthy, 60)

    def _start_coredns(self) -> None:
        d = self.workdir / "coredns"
        d.mkdir(parents=True, exist_ok=True)
        health, ready = free_port(), free_port()
        (d / "Corefile").write_text(f""".:53 {{
    bind {GATEWAY}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.cp.kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
    loadbalance
}}
""")
        self._spawn("coredns", [str(self.bin / "coredns"), "-conf", str(d / "Corefile")])

        def is_ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{ready}/ready", timeout=2) as r:
                return r.status == 200
        self._wait("coredns", is_ready, 60)

    # ---------------------------------------------------------------- teardown
    def _drain(self, timeout: float = 120) -> None:
        """Stop everything that would make pods again (the cluster ends with the session), delete
        every pod (the kubelet stops its containers and sandboxes) and wait for both."""
        kube = self.cp.kube()
        kube.patch(f"/api/v1/nodes/{NODE_NAME}", {"spec": {"unschedulable": True}})
        owners = ("/apis/apps/v1/{ns}/deployments", "/apis/apps/v1/{ns}/replicasets",
                  "/apis/apps/v1/{ns}/statefulsets", "/apis/apps/v1/{ns}/daemonsets", "/apis/batch/v1/{ns}/jobs")
        namespaces = [ns["metadata"]["name"] for ns in kube.get("/api/v1/namespaces")["items"]]
        for name in namespaces:
            for path in owners:
                try:
                    kube.delete(path.format(ns=f"namespaces/{name}"),
                                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Orphan"})
                except ApiError:
                    pass
        for name in namespaces:
            try:
                kube.delete(f"/api/v1/namespaces/{name}/pods",
                            body={"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 1})
            except ApiError:
                pass
        deadline = time.monotonic() + timeout
        pods: list = []
        while time.monotonic() < deadline:
            pods = kube.get("/api/v1/pods")["items"]
            tasks = [line for line in self.ctr("tasks", "ls", "-q").stdout.split() if line]
            if not pods and not tasks:
                return
            time.sleep(1)
        log.warning("pods or containers left after draining: %s", [p["metadata"]["name"] for p in pods])

    def _remove_containers(self) -> None:
        """Whatever the kubelet left: kill and delete every task and container (their shims exit)."""
        if "containerd" not in self.procs:
            return
        for cid in self.ctr("tasks", "ls", "-q").stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid)
            for _ in range(50):
                if self.ctr("tasks", "delete", cid).returncode == 0:
                    break
                time.sleep(0.2)
        for cid in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("containers", "delete", cid)

    def _unmount_all(self) -> None:
        """Unmount what is left under the work folder (pod volumes, netns, rootfs), deepest first."""
        prefix = str(self.workdir.resolve()) + "/"
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            _run("umount", "-l", target, check=False)

    # ---------------------------------------------------------------- helpers for tests
    def kubectl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.cp.kubectl(*args, **kw)

    def helm(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.cp.helm(*args, **kw)

    def container_id(self, pod: dict, container: str) -> str:
        for cs in pod["status"].get("containerStatuses") or []:
            if cs["name"] == container and cs.get("containerID"):
                return cs["containerID"].split("://", 1)[1]
        raise LookupError(f"no running {container} in {pod['metadata']['name']}")

    def kill_container(self, pod: dict, container: str, signal: str = "SIGKILL") -> None:
        """What an OOM kill or a crash does to a container: its processes die, the pod stays."""
        self.ctr("tasks", "kill", "--all", "-s", signal, self.container_id(pod, container), check=True)


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="kontrast-node-"))
