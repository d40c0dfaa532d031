"""Test node agent: a stand-in kubelet that runs pods as local processes. TEST CODE ONLY.

Why: there is no container runtime here, and the operator's contract is about real pods (env,
volumes, DNS names, exit codes, deletion). The agent registers one Node, binds pending pods to
it (instead of kube-scheduler), and runs each container's command+args as a process group in
its own mount and UTS namespace (`unshare`, needs root), with:

- env from value/fieldRef/configMapKeyRef/secretKeyRef/envFrom and `$(VAR)` expansion, plus
  KUBERNETES_SERVICE_HOST/PORT pointing at the API server on 127.0.0.1;
- workingDir; emptyDir, configMap, secret, downwardAPI, projected (ServiceAccount token via the
  TokenRequest API, bound to the pod), hostPath and PVC volumes as folders bind-mounted at
  their mountPath (a PVC is `pvc_paths[(namespace, claim)]`, `pvc_paths[claim]`, or a folder
  per claim under the agent's root, so it outlives pods as a real volume does);
- a per-pod /etc/hosts in which every pod's `<hostname>.<subdomain>` and every Service name
  resolves to 127.0.0.1, as cluster DNS would (all pods share the loopback network: two pods
  cannot listen on the same port, so the pods of each Job get a rendezvous port of their own
  in PET_MASTER_PORT, see `NodeAgent.rendezvous_port`);
- a per-container termination-message file, copied into the terminated state.

Images are mapped to local runtimes by `images` (longest substring match), a table tests may
extend. Pod status follows the kubelet: Pending, Running, Succeeded/Failed with exit codes and
restart counts (restartPolicy Never/OnFailure/Always). Deleting a pod SIGTERMs its processes,
SIGKILLs them after the grace period, marks the pod Failed (no DisruptionTarget condition) and
finishes the deletion. Not emulated: probes, resources and their limits, requests-based
scheduling, image pulls, `kubectl logs/exec` (read logs with `agent.log()`), and securityContext:
processes run as the agent's own user (root) whatever runAsUser/runAsNonRoot say, because the
tests' files are the agent's; the API server's PodSecurity admission checks those settings.
"""

from __future__ import annotations

import atexit
import base64
import datetime as dt
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.controlplane import free_port
from harness.kube import ApiError, Kube

log = logging.getLogger("kontrast.test.nodeagent")

VENV_BIN = str(Path(sys.executable).parent)
REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
POD_IP = "127.0.0.1"


@dataclass
class Runtime:
    """What an image would provide: PATH entries, ENTRYPOINT, ENV and WORKDIR."""

    path: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    #: Files the image ships: container path -> this checkout's file (bind-mounted).
    files: dict[str, str] = field(default_factory=dict)


# The trainer image runs `kontrast`, `torchrun` and `python` from the environment running the
# tests, i.e. from this checkout.
_PY = Runtime(path=[VENV_BIN], env={"PYTHONUNBUFFERED": "1"})
#: ... and ships the tiny model's config where trainer/Dockerfile copies it.
_TRAINER = Runtime(path=[VENV_BIN], env={"PYTHONUNBUFFERED": "1"},
                   files={"/opt/kontrast/examples/tiny-vit.json": str(REPO / "examples" / "tiny-vit.json")})
DEFAULT_IMAGES: dict[str, Runtime] = {
    "kontrast-trainer": _TRAINER,
    "kontrast/trainer": _TRAINER,
    "kontrast-operator": _PY,
    "kontrast/operator": _PY,
    "python": _PY,
    "busybox": Runtime(),
}


class NotReady(Exception):
    """The pod cannot start yet (missing ConfigMap/Secret, unknown image); retried like a kubelet."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` escapes, others stay."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


def field_value(pod: dict, path: str) -> str:
    """Resolve a downward-API fieldRef.fieldPath against a pod."""
    meta = pod["metadata"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"], "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": POD_IP, "status.podIPs": POD_IP,
        "status.hostIP": POD_IP, "status.hostIPs": POD_IP,
    }
    if path in simple:
        return simple[path]
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise NotReady("CreateContainerConfigError", f"unsupported fieldRef {path}")


def pod_hostname(pod: dict) -> str:
    return pod["spec"].get("hostname") or pod["metadata"]["name"][:63]


# ====================================================================== the agent
class NodeAgent:
    """Registers `node_name`, binds pending pods to it and runs them (see the module docstring)."""

    def __init__(self, control_plane, root: Path, node_name: str = "kontrast-node",
                 images: dict[str, Runtime] | None = None, pvc_paths: dict | None = None):
        self.cp = control_plane
        self.kube = control_plane.kube()
        self.root = Path(root)
        self.node_name = node_name
        self.images: dict[str, Runtime] = dict(DEFAULT_IMAGES if images is None else images)
        self.pvc_paths: dict = dict(pvc_paths or {})
        self.api_port = str(control_plane.port)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._pods: dict[str, dict] = {}            # uid -> latest pod object (all namespaces)
        self._services: dict[tuple, dict] = {}      # (ns, name) -> service
        self._workers: dict[str, PodWorker] = {}    # uid -> worker of a pod on this node
        self._by_name: dict[tuple, PodWorker] = {}  # (ns, name) -> newest worker with that name
        self._unschedulable: set[str] = set()
        self._lost: set[str] = set()                # uids of pods whose node "crashed" (lose_pod)
        self._created_paths: list[Path] = []
        self._threads: list[threading.Thread] = []
        self._hosts_names: tuple = ()
        self._rendezvous_ports: dict[str, str] = {}  # Job uid -> its pods' PET_MASTER_PORT

    def rendezvous_port(self, pod: dict) -> str | None:
        """The PET_MASTER_PORT of the pods of one Job (their controller), None for a pod without one.

        In a cluster each pod has its own network namespace, so every TrainJob's workers listen on
        the operator's one port. Here they share the loopback: a preempted job whose torchrun still
        held the port made the next job's agents join its store, read its keys and wait forever
        (a full suite saw it in the Kueue preemption test). So each Job gets its own, as its own pod
        IPs would."""
        owner = next((o["uid"] for o in pod["metadata"].get("ownerReferences") or [] if o.get("controller")), None)
        if owner is None:
            return None
        with self._lock:
            if owner not in self._rendezvous_ports:
                self._rendezvous_ports[owner] = str(free_port())
            return self._rendezvous_ports[owner]

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "NodeAgent":
        if os.geteuid() != 0:
            raise RuntimeError("the test node agent needs root (unshare --mount, bind mounts)")
        probe = subprocess.run(["unshare", "--mount", "--uts", "--propagation", "private", "true"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            raise RuntimeError(f"unshare --mount --uts does not work here: {probe.stderr}")
        self.root.mkdir(parents=True, exist_ok=True)
        self._register_node()
        for name, path, handler in (("pods", "/api/v1/pods", self._on_pod),
                                    ("services", "/api/v1/services", self._on_service)):
            t = threading.Thread(target=self._watch_loop, args=(path, handler), daemon=True,
                                 name=f"nodeagent-watch-{name}")
            t.start()
            self._threads.append(t)
        atexit.register(self._kill_all)
        return self

    def stop(self) -> None:
        """Kill every pod process, remove the Node and the mount targets the agent created."""
        self._stop.set()
        self._kill_all()
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.join(timeout=5)
        try:
            self.kube.delete(f"/api/v1/nodes/{self.node_name}")
        except Exception:
            pass
        for p in sorted(set(self._created_paths), key=lambda p: len(p.parts), reverse=True):
            try:
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                pass

    def _kill_all(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.stop_event.set()
            w.signal_all(signal.SIGKILL)

    # ------------------------------------------------------------ test helpers
    def worker(self, namespace: str, name: str) -> "PodWorker":
        with self._lock:
            w = self._by_name.get((namespace, name))
        if w is None:
            raise KeyError(f"pod {namespace}/{name} has not run on {self.node_name}")
        return w

    def log(self, namespace: str, name: str, container: str | None = None, previous: bool = False) -> str:
        """The output (stdout+stderr) of a container's current, or previous, run."""
        return self.worker(namespace, name).read_log(container, previous)

    def kill_pod(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a pod's processes as a crash would (SIGKILL: the container exits with 137)."""
        self.worker(namespace, name).signal_all(sig)

    def lose_pod(self, namespace: str, name: str) -> None:
        """As if the pod's node crashed: its processes die, and nothing reports for it again
        (its status stays as last written, a deletion is never finished), as with a kubelet
        that stopped. The node controller's part (marking it not Ready, evicting it) is the
        test's to play."""
        worker = self.worker(namespace, name)
        with self._lock:
            self._lost.add(worker.uid)
        worker.stop_event.set()
        worker.signal_all(signal.SIGKILL, leftovers=True)

    def pod_dir(self, namespace: str, name: str) -> Path:
        return self.worker(namespace, name).dir

    def pvc_path(self, namespace: str, claim: str) -> Path:
        """The host folder that backs a PersistentVolumeClaim on this node."""
        path = self.pvc_paths.get((namespace, claim)) or self.pvc_paths.get(claim)
        path = Path(path) if path else self.root / "pvc" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def runtime_for(self, image: str) -> Runtime:
        matches = [k for k in self.images if k in image]
        if not matches:
            raise NotReady("ErrImagePull", f"image {image!r} is not in the test node agent's image table")
        return self.images[max(matches, key=len)]

    # ------------------------------------------------------------ node
    def _register_node(self) -> None:
        version = self.cp.version()["gitVersion"]
        mem_kib = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{mem_kib}Ki", "pods": "110",
                    "ephemeral-storage": "100Gi"}
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node_name, "labels": {
                    "kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64", "kontrast.dev/test-node": "true"}},
                "spec": {}}
        try:
            self.kube.post("/api/v1/nodes", node)
        except ApiError as e:
            if e.status != 409:
                raise
        t = now()
        conditions = [
            {"type": "Ready", "status": "True", "reason": "KubeletReady",
             "message": "kontrast test node agent is ready"},
            {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
            {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure"},
            {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID"},
        ]
        for c in conditions:
            c.update(lastHeartbeatTime=t, lastTransitionTime=t)
        self.kube.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": {
            "conditions": conditions, "capacity": capacity, "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": POD_IP},
                          {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": {"machineID": "kontrast", "systemUUID": "kontrast", "bootID": "kontrast",
                         "kernelVersion": os.uname().release, "osImage": "kontrast test node",
                         "containerRuntimeVersion": "kontrast-nodeagent://0.1",
                         "kubeletVersion": version, "kubeProxyVersion": version,
                         "operatingSystem": "linux", "architecture": "amd64"},
        }}, Kube.STRATEGIC)
        # TaintNodesByCondition adds not-ready:NoSchedule on create; the node-lifecycle
        # controller that would lift it is off, so lift it here.
        self.kube.patch(f"/api/v1/nodes/{self.node_name}", {"spec": {"taints": None}})

    # ------------------------------------------------------------ watches
    def _watch_loop(self, path: str, handler) -> None:
        """List, then watch from that resourceVersion; re-list on any error (e.g. 410 Gone)."""
        while not self._stop.is_set():
            try:
                listed = self.kube.get(path)
                handler("SYNC", listed["items"])
                rv = listed["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    for event in self.kube.watch(path, rv, timeout_seconds=20):
                        if self._stop.is_set():
                            return
                        rv = event["object"]["metadata"].get("resourceVersion", rv)
                        if event["type"] != "BOOKMARK":
                            handler(event["type"], event["object"])
            except Exception as e:
                if self._stop.is_set():
                    return
                log.warning("watch %s failed (%s); re-listing", path, e)
                time.sleep(0.5)

    def _on_service(self, kind: str, obj) -> None:
        with self._lock:
            if kind == "SYNC":
                self._services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in obj}
            elif kind == "DELETED":
                self._services.pop((obj["metadata"]["namespace"], obj["metadata"]["name"]), None)
            else:
                self._services[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
        self._refresh_hosts()

    def _on_pod(self, kind: str, obj) -> None:
        if kind == "SYNC":
            listed = {p["metadata"]["uid"]: p for p in obj}
            with self._lock:
                gone = [p for uid, p in self._pods.items() if uid not in listed]
            for p in gone:
                self._on_pod("DELETED", p)
            for p in listed.values():
                self._on_pod("MODIFIED", p)
            return
        uid = obj["metadata"]["uid"]
        with self._lock:
            if uid in self._lost:
                return
            if kind == "DELETED":
                self._pods.pop(uid, None)
                worker = self._workers.get(uid)
            else:
                self._pods[uid] = obj
                worker = self._workers.get(uid)
        self._refresh_hosts()
        if kind == "DELETED":
            if worker:
                worker.gone()
            return
        node = obj["spec"].get("nodeName")
        if not node:
            self._maybe_bind(obj)
        elif node == self.node_name:
            if worker is None and not self._stop.is_set():
                worker = PodWorker(self, obj)
                with self._lock:
                    self._workers[uid] = worker
                    self._by_name[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = worker
                worker.start()
            elif worker is not None:
                worker.update(obj)

    def _forget(self, worker: "PodWorker") -> None:
        with self._lock:
            self._workers.pop(worker.uid, None)

    def _maybe_bind(self, pod: dict) -> None:
        """Bind a pending pod to this node, as kube-scheduler would (nodeSelector honoured)."""
        spec, meta = pod["spec"], pod["metadata"]
        if meta.get("deletionTimestamp") or spec.get("schedulingGates"):
            return
        if spec.get("schedulerName", "default-scheduler") != "default-scheduler":
            return
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return
        ns, name = meta["namespace"], meta["name"]
        labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "kontrast.dev/test-node": "true"}
        mismatch = {k: v for k, v in (spec.get("nodeSelector") or {}).items() if labels.get(k) != v}
        if mismatch:
            if meta["uid"] not in self._unschedulable:
                self._unschedulable.add(meta["uid"])
                self._patch_status(ns, name, {"conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "lastTransitionTime": now(),
                    "message": f"0/1 nodes are available: node selector {mismatch} does not match"}]})
            return
        binding = {"apiVersion": "v1", "kind": "Binding",
                   "metadata": {"name": name, "uid": meta["uid"]},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}}
        try:
            self.kube.post(f"/api/v1/namespaces/{ns}/pods/{name}/binding", binding)
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("binding %s/%s failed: %s", ns, name, e)

    def _patch_status(self, ns: str, name: str, status: dict) -> None:
        try:
            self.kube.patch(f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status},
                            Kube.STRATEGIC)
        except ApiError as e:
            if e.status != 404:
                raise

    # ------------------------------------------------------------ DNS stand-in
    def _refresh_hosts(self) -> None:
        """Rewrite every running pod's /etc/hosts when the set of cluster names changed."""
        with self._lock:
            pods = [p for p in self._pods.values() if not p["metadata"].get("deletionTimestamp")]
            services = list(self._services.values())
            workers = list(self._workers.values())
        names: set[tuple[str, str]] = set()  # (namespace, name relative to that namespace)
        for p in pods:
            sub = p["spec"].get("subdomain")
            if sub:
                names.add((p["metadata"]["namespace"], f"{pod_hostname(p)}.{sub}"))
        for s in services:
            names.add((s["metadata"]["namespace"], s["metadata"]["name"]))
        key = tuple(sorted(names))
        with self._lock:
            if key == self._hosts_names:
                return
            self._hosts_names = key
        for w in workers:
            w.write_hosts()

    def hosts_content(self, pod: dict, names) -> str:
        ns = pod["metadata"]["namespace"]
        host = pod_hostname(pod)
        sub = pod["spec"].get("subdomain")
        own = [f"{host}.{sub}.{ns}.svc.cluster.local", host] if sub else [host]
        lines = ["# Managed by the kontrast test node agent (stands in for cluster DNS).",
                 "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{POD_IP}\t{' '.join(own)}"]
        for name_ns, rel in names:
            fq = [f"{rel}.{name_ns}.svc.cluster.local", f"{rel}.{name_ns}.svc", f"{rel}.{name_ns}"]
            if name_ns == ns:
                fq.append(rel)
            lines.append(f"{POD_IP}\t{' '.join(fq)}")
        return "\n".join(lines) + "\n"

    def ensure_target(self, path: str, is_file: bool) -> None:
        """Create a missing bind-mount target on the host, remembering it for stop()."""
        p = Path(path)
        missing = []
        q = p
        while not os.path.lexists(q):
            missing.append(q)
            q = q.parent
        if not missing:
            return
        for d in reversed(missing[1:] if is_file else missing):
            d.mkdir(exist_ok=True)
        if is_file:
            p.touch()
        with self._lock:
            self._created_paths.extend(missing)


# ====================================================================== one pod
@dataclass
class Container:
    """One run of one container: its process and log, and what the status reports about it."""

    spec: dict
    init: bool = False
    restarts: int = 0
    proc: subprocess.Popen | None = None
    started_at: str | None = None
    last_state: dict = field(default_factory=dict)
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    done: bool = False          # terminated and will not restart
    restart_at: float = 0.0

    @property
    def name(self) -> str:
        return self.spec["name"]


class PodWorker(threading.Thread):
    """Runs one pod from bind to deletion; the only writer of that pod's status."""

    def __init__(self, agent: NodeAgent, pod: dict):
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['namespace']}-{pod['metadata']['name']}")
        self.agent = agent
        self.pod = pod
        self.uid = pod["metadata"]["uid"]
        self.ns = pod["metadata"]["namespace"]
        self.pod_name = pod["metadata"]["name"]
        self.dir = agent.root / "pods" / f"{self.ns}_{self.pod_name}_{self.uid[:8]}"
        self.deleting = threading.Event()
        self.is_gone = threading.Event()
        self.stop_event = threading.Event()
        self.init_containers = [Container(c, init=True) for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(c) for c in pod["spec"]["containers"]]
        self.mounts: list[tuple[str, str, bool]] = []   # (host source, container target, is_file)
        self.hosts_file = self.dir / "etc-hosts"
        self._proc_lock = threading.Lock()
        self._conds: dict[str, dict] = {}
        self._start_ts: str | None = None
        phase = pod.get("status", {}).get("phase")
        self.phase = phase if phase in ("Succeeded", "Failed") else "Pending"
        self.message = ""

    # --------------------------------------------------------------- signals from the agent
    def update(self, pod: dict) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def gone(self) -> None:
        self.is_gone.set()
        self.deleting.set()

    def signal_all(self, sig: int, leftovers: bool = False) -> None:
        """Signal each container's process group; with leftovers, also groups whose leader
        has exited (a container runtime tears down everything a container started)."""
        with self._proc_lock:
            procs = [c.proc for c in self.init_containers + self.containers if c.proc]
        for p in procs:
            if leftovers or p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    # --------------------------------------------------------------- main loop
    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # a bug or an API failure: report it on the pod, loudly
            log.exception("pod %s/%s: agent error", self.ns, self.pod_name)
            self.signal_all(signal.SIGKILL)
            self.phase, self.message = "Failed", f"test node agent error: {e}"
            try:
                self._report()
            except Exception:
                pass
        finally:
            self._finish_deletion()
            self.agent._forget(self)

    def _stopping(self) -> bool:
        return self.deleting.is_set() or self.stop_event.is_set()

    def _run(self) -> None:
        if self.pod.get("status", {}).get("phase") in ("Succeeded", "Failed") or self._stopping():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.write_hosts()
        self._set_cond("PodScheduled", "True")
        self._set_cond("PodReadyToStartContainers", "False")
        self._set_cond("Initialized", "False", "ContainersNotInitialized")
        self._set_cond("ContainersReady", "False", "ContainersNotReady")
        self._set_cond("Ready", "False", "ContainersNotReady")
        # Volumes: retried while a ConfigMap/Secret is missing, as a kubelet does.
        while not self._prepare_volumes():
            if self._stopping():
                return
            time.sleep(1)
        self._set_cond("PodReadyToStartContainers", "True")
        policy = self.pod["spec"].get("restartPolicy", "Always")

        for c in self.init_containers:
            while True:
                if not self._start_when_ready(c):
                    return
                code = self._wait_exit(c)
                if code is None:
                    return
                if code == 0:
                    c.done = True
                    break
                if policy == "Never":
                    self.phase = "Failed"
                    self._mark_pending_containers("PodInitializing")
                    self._report()
                    return
                self._backoff(c)
        self._set_cond("Initialized", "True")

        for c in self.containers:
            if not self._start_when_ready(c, report=False):
                return
        self.phase = "Running"
        self._report()

        while True:
            if self._stopping():
                return
            changed = False
            for c in self.containers:
                if c.done:
                    continue
                if c.proc is None:  # waiting to restart
                    if time.monotonic() >= c.restart_at:
                        if not self._start_when_ready(c, report=False):
                            return
                        changed = True
                    continue
                code = c.proc.poll()
                if code is None:
                    continue
                self._terminated(c, code)
                changed = True
                if policy == "Always" or (policy == "OnFailure" and self._exit_code(code) != 0):
                    self._backoff(c, report=False)
                else:
                    c.done = True
            if all(c.done for c in self.containers):
                codes = [c.state["terminated"]["exitCode"] for c in self.containers]
                self.phase = "Succeeded" if all(x == 0 for x in codes) else "Failed"
                self._report()
                return
            if changed:
                self._report()
            time.sleep(0.2)

    def _finish_deletion(self) -> None:
        """Wait for the pod's deletion; stop its processes within the grace period; delete it."""
        while not self.deleting.is_set() and not self.stop_event.is_set():
            self.deleting.wait(1)
        if self.stop_event.is_set():
            self.signal_all(signal.SIGKILL, leftovers=True)
            return
        running = [c for c in self.init_containers + self.containers if c.proc and c.proc.poll() is None]
        if running:
            grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
            grace = 30 if grace is None else int(grace)
            self.signal_all(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(c.proc.poll() is None for c in running):
                time.sleep(0.1)
            self.signal_all(signal.SIGKILL)
        for c in self.init_containers + self.containers:
            if c.proc is not None and "running" in c.state:  # also those that exited meanwhile
                self._terminated(c, c.proc.wait())
                c.done = True
        if running or self.phase not in ("Succeeded", "Failed"):
            # Killed or never finished: Failed unless every container exited 0; no
            # DisruptionTarget condition (that is for evictions and preemptions).
            self._mark_pending_containers("ContainerStatusUnknown")
            codes = [c.state["terminated"]["exitCode"] for c in self.containers]
            self.phase = "Succeeded" if all(x == 0 for x in codes) else "Failed"
            if not self.is_gone.is_set():
                self._report()
        self.signal_all(signal.SIGKILL, leftovers=True)  # whatever the containers left behind
        if self.is_gone.is_set():
            return
        try:
            self.agent.kube.request(
                "DELETE", f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}",
                {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                 "preconditions": {"uid": self.uid}})
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("finishing deletion of %s/%s: %s", self.ns, self.pod_name, e)

    # --------------------------------------------------------------- containers
    def _start_when_ready(self, c: Container, report: bool = True) -> bool:
        """Start a container, retrying while its image or config is not available."""
        while True:
            if self._stopping():
                return False
            try:
                self._launch(c)
                if report:
                    self._report()
                return True
            except NotReady as e:
                c.state = {"waiting": {"reason": e.reason, "message": str(e)}}
                self._report()
                time.sleep(1)

    def _wait_exit(self, c: Container) -> int | None:
        while True:
            if self._stopping():
                return None
            code = c.proc.poll()
            if code is not None:
                self._terminated(c, code)
                self._report()
                return self._exit_code(code)
            time.sleep(0.2)

    def _backoff(self, c: Container, report: bool = True) -> None:
        c.restarts += 1
        c.last_state = c.state
        c.state = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off restarting failed container {c.name}"}}
        c.proc = None
        c.restart_at = time.monotonic() + min(10.0, 2.0 ** (c.restarts - 1))
        if report:
            self._report()
            while time.monotonic() < c.restart_at and not self._stopping():
                time.sleep(0.1)

    @staticmethod
    def _exit_code(code: int) -> int:
        return 128 - code if code < 0 else code

    def _terminated(self, c: Container, code: int) -> None:
        try:  # a container ends with its main process: kill whatever it left in its group
            os.killpg(c.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = self._exit_code(code)
        msg_file = self.dir / "termination" / f"{c.name}-{c.restarts}"
        message = msg_file.read_text(errors="replace")[:4096] if msg_file.exists() else ""
        if not message and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = "\n".join(self.read_log(c.name).splitlines()[-80:])[-2048:]
        term = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                "startedAt": c.started_at, "finishedAt": now(), "containerID": self._cid(c)}
        if code > 128:
            term["signal"] = code - 128
        if message:
            term["message"] = message
        c.state = {"terminated": term}

    def _cid(self, c: Container) -> str:
        return f"kontrast-node://{self.uid}/{c.name}/{c.restarts}"

    def _mark_pending_containers(self, reason: str) -> None:
        for c in self.init_containers + self.containers:
            if "terminated" not in c.state:
                c.state = {"terminated": {"exitCode": 137, "reason": reason, "finishedAt": now(),
                                          "startedAt": c.started_at or now()}}
                c.done = True

    def _launch(self, c: Container) -> None:
        spec = c.spec
        runtime = self.agent.runtime_for(spec.get("image", ""))
        env = self._env(spec, runtime)
        argv = [expand(a, env) for a in (spec.get("command") or runtime.entrypoint) + (spec.get("args") or [])]
        if not argv:
            raise NotReady("CreateContainerError", f"container {c.name} has no command and its image no entrypoint")
        term_dir = self.dir / "termination"
        term_dir.mkdir(exist_ok=True)
        term_file = term_dir / f"{c.name}-{c.restarts}"
        term_file.write_text("")
        mounts = list(self.mounts_for(spec)) + [(src, dst, True) for dst, src in runtime.files.items()] + [
            (str(self.hosts_file), "/etc/hosts", True),
            (str(term_file), spec.get("terminationMessagePath") or "/dev/termination-log", True),
        ]
        lines = ["set -e"]
        for src, dst, is_file in mounts:
            self.agent.ensure_target(dst, is_file)
            make = f"[ -e {shlex.quote(dst)} ] || touch {shlex.quote(dst)}" if is_file else \
                f"mkdir -p {shlex.quote(dst)}"
            lines += [make, f"mount --bind {shlex.quote(src)} {shlex.quote(dst)}"]
        workdir = spec.get("workingDir") or runtime.workdir
        lines += [f"hostname {shlex.quote(pod_hostname(self.pod))}",
                  f"mkdir -p {shlex.quote(workdir)}", f"cd {shlex.quote(workdir)}", 'exec "$@"']
        script = self.dir / f"start-{c.name}.sh"
        script.write_text("\n".join(lines) + "\n")
        logf = self.dir / "logs" / f"{c.name}-{c.restarts}.log"
        with self._proc_lock, open(logf, "ab") as out:
            c.proc = subprocess.Popen(
                ["unshare", "--mount", "--uts", "--propagation", "private", "--",
                 "/bin/sh", str(script), *argv],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.dir, start_new_session=True)
        c.started_at = now()
        c.state = {"running": {"startedAt": c.started_at}}

    def read_log(self, container: str | None = None, previous: bool = False) -> str:
        c = self._container(container)
        n = c.restarts - (1 if previous else 0)
        path = self.dir / "logs" / f"{c.name}-{n}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _container(self, name: str | None) -> Container:
        for c in self.containers + self.init_containers:
            if name is None or c.name == name:
                return c
        raise KeyError(f"pod {self.ns}/{self.pod_name} has no container {name}")

    # --------------------------------------------------------------- env
    def _lookup(self, kind: str, name: str, optional: bool) -> dict | None:
        path = f"/api/v1/namespaces/{self.ns}/{kind}/{name}"
        try:
            obj = self.agent.kube.get(path)
        except ApiError as e:
            if e.status == 404 and optional:
                return None
            if e.status == 404:
                raise NotReady("CreateContainerConfigError", f"{kind[:-1]} {name!r} not found")
            raise
        if kind == "secrets":
            return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        data = dict(obj.get("data") or {})
        data.update({k: base64.b64decode(v).decode(errors="replace")
                     for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _env(self, spec: dict, runtime: Runtime) -> dict[str, str]:
        env = {"PATH": ":".join([*runtime.path, SYSTEM_PATH]), "HOME": os.environ.get("HOME", "/root"),
               "HOSTNAME": pod_hostname(self.pod)}
        env.update(runtime.env)
        port = self.agent.api_port
        env.update({"KUBERNETES_SERVICE_HOST": POD_IP, "KUBERNETES_SERVICE_PORT": port,
                    "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{POD_IP}:{port}",
                    "KUBERNETES_PORT_443_TCP": f"tcp://{POD_IP}:{port}",
                    "KUBERNETES_PORT_443_TCP_PROTO": "tcp", "KUBERNETES_PORT_443_TCP_ADDR": POD_IP,
                    "KUBERNETES_PORT_443_TCP_PORT": port})
        for src in spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                ref = src.get(key)
                if ref:
                    data = self._lookup(kind, ref["name"], ref.get("optional", False)) or {}
                    env.update({prefix + k: v for k, v in data.items()})
        for e in spec.get("env") or []:
            name = e["name"]
            if "valueFrom" not in e:
                env[name] = expand(e.get("value", ""), env)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                env[name] = field_value(self.pod, vf["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                kind, ref = ("configmaps", vf["configMapKeyRef"]) if "configMapKeyRef" in vf \
                    else ("secrets", vf["secretKeyRef"])
                optional = ref.get("optional", False)
                data = self._lookup(kind, ref["name"], optional)
                if data is None or ref["key"] not in data:
                    if optional:
                        continue
                    raise NotReady("CreateContainerConfigError",
                                   f"key {ref['key']!r} not found in {kind[:-1]} {ref['name']!r}")
                env[name] = data[ref["key"]]
            elif "resourceFieldRef" in vf:
                res = vf["resourceFieldRef"]["resource"]
                kind, rname = res.split(".", 1)
                value = ((spec.get("resources") or {}).get(kind) or {}).get(rname)
                env[name] = str(value if value is not None else 0)
            else:
                raise NotReady("CreateContainerConfigError", f"unsupported valueFrom for {name}")
        if "PET_MASTER_PORT" in env and (port := self.agent.rendezvous_port(self.pod)) is not None:
            env["PET_MASTER_PORT"] = port
        return env

    # --------------------------------------------------------------- volumes
    def _prepare_volumes(self) -> bool:
        """Materialise the pod's volumes as folders; False (after reporting why) to retry later."""
        try:
            self.volume_dirs = {v["name"]: self._volume(v) for v in self.pod["spec"].get("volumes") or []}
            return True
        except NotReady as e:
            for c in self.init_containers + self.containers:
                c.state = {"waiting": {"reason": e.reason, "message": str(e)}}
            self._report()
            return False

    def _write_items(self, target: Path, data: dict, items: list | None) -> None:
        chosen = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
        for key, rel in chosen:
            if key not in data:
                raise NotReady("CreateContainerConfigError", f"volume key {key!r} not found")
            f = target / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(data[key])

    def _volume(self, v: dict) -> Path:
        name = v["name"]
        if "persistentVolumeClaim" in v:
            return self.agent.pvc_path(self.ns, v["persistentVolumeClaim"]["claimName"])
        if "hostPath" in v:
            p = Path(v["hostPath"]["path"])
            if v["hostPath"].get("type") == "DirectoryOrCreate":
                p.mkdir(parents=True, exist_ok=True)
            return p
        target = self.dir / "volumes" / name
        target.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in v:
            return target
        if "configMap" in v or "secret" in v:
            kind, ref = ("configmaps", v["configMap"]) if "configMap" in v else ("secrets", v["secret"])
            obj_name = ref.get("name") or ref.get("secretName")
            data = self._lookup(kind, obj_name, ref.get("optional", False)) or {}
            self._write_items(target, data, ref.get("items"))
            return target
        if "downwardAPI" in v:
            self._write_downward(target, v["downwardAPI"].get("items") or [])
            return target
        if "projected" in v:
            for src in v["projected"].get("sources") or []:
                if "serviceAccountToken" in src:
                    t = src["serviceAccountToken"]
                    token = self.agent.cp.service_account_token(
                        self.ns, self.pod["spec"].get("serviceAccountName") or "default",
                        expiration_seconds=t.get("expirationSeconds", 3607),
                        audiences=[t["audience"]] if t.get("audience") else None, bound_pod=self.pod)
                    (target / t["path"]).write_text(token)
                elif "configMap" in src or "secret" in src:
                    kind, ref = ("configmaps", src["configMap"]) if "configMap" in src else ("secrets", src["secret"])
                    data = self._lookup(kind, ref["name"], ref.get("optional", False)) or {}
                    self._write_items(target, data, ref.get("items"))
                elif "downwardAPI" in src:
                    self._write_downward(target, src["downwardAPI"].get("items") or [])
                else:
                    raise NotReady("CreateContainerConfigError", f"unsupported projected source in volume {name}")
            return target
        raise NotReady("CreateContainerConfigError",
                       f"volume {name}: type {sorted(set(v) - {'name'})} not supported by the test node agent")

    def _write_downward(self, target: Path, items: list) -> None:
        for item in items:
            if "fieldRef" not in item:
                raise NotReady("CreateContainerConfigError", "only fieldRef downwardAPI items are supported")
            f = target / item["path"]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(field_value(self.pod, item["fieldRef"]["fieldPath"]))

    def mounts_for(self, spec: dict):
        """(source, target, is_file) bind mounts for a container's volumeMounts, parents first."""
        out = []
        for m in spec.get("volumeMounts") or []:
            src = self.volume_dirs.get(m["name"])
            if src is None:
                raise NotReady("CreateContainerConfigError", f"volumeMount {m['name']!r} has no volume")
            if m.get("subPath"):
                src = src / m["subPath"]
                if not src.exists():
                    src.mkdir(parents=True)
            out.append((str(src), m["mountPath"], src.is_file()))
        return sorted(out, key=lambda t: len(Path(t[1]).parts))

    # --------------------------------------------------------------- status
    def write_hosts(self) -> None:
        """Rewrite the pod's hosts file in place from the agent's current names: the bind mount
        pins the inode, so no rename. Overwrite, then truncate, so a reader never sees it empty."""
        if not self.dir.exists():
            return
        with self.agent._lock:  # one writer at a time, always with the newest names
            data = self.agent.hosts_content(self.pod, self.agent._hosts_names).encode()
            fd = os.open(self.hosts_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)

    def _set_cond(self, ctype: str, status: str, reason: str | None = None) -> None:
        old = self._conds.get(ctype)
        if old and old["status"] == status and old.get("reason") == reason:
            return
        cond = {"type": ctype, "status": status, "lastTransitionTime": now(), "lastProbeTime": None}
        if reason:
            cond["reason"] = reason
        self._conds[ctype] = cond

    def _container_status(self, c: Container) -> dict:
        out = {"name": c.name, "image": c.spec.get("image", ""),
               "imageID": f"kontrast-node://{c.spec.get('image', '')}",
               "ready": "running" in c.state, "started": "running" in c.state,
               "restartCount": c.restarts, "state": c.state, "lastState": c.last_state}
        if c.proc is not None or "terminated" in c.state:
            out["containerID"] = self._cid(c)
        return out

    def _report(self) -> None:
        """Patch the pod's status from the worker's view (conditions merge by type)."""
        if self.uid in self.agent._lost:
            return
        running = all("running" in c.state for c in self.containers)
        if self.phase == "Running" and running:
            self._set_cond("ContainersReady", "True")
            self._set_cond("Ready", "True")
        else:
            reason = "PodCompleted" if self.phase in ("Succeeded", "Failed") else "ContainersNotReady"
            self._set_cond("ContainersReady", "False", reason)
            self._set_cond("Ready", "False", reason)
        if self.phase in ("Succeeded", "Failed") and self._conds.get("PodReadyToStartContainers"):
            self._set_cond("PodReadyToStartContainers", "False")
        status = {
            "phase": self.phase, "hostIP": POD_IP, "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP, "podIPs": [{"ip": POD_IP}],
            "startTime": self.pod.get("status", {}).get("startTime") or self._start_time(),
            "conditions": list(self._conds.values()),
            "containerStatuses": [self._container_status(c) for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [self._container_status(c) for c in self.init_containers]
        if self.message:
            status["message"] = self.message
        self.agent._patch_status(self.ns, self.pod_name, status)

    def _start_time(self) -> str:
        if self._start_ts is None:
            self._start_ts = now()
        return self._start_ts
