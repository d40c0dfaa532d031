"""The operator with 2,000 TrainJobs running under Kueue, among unrelated Kueue-managed Jobs.

    python benchmarks/operator_running.py                    # --jobs 2000 --unrelated 2000
    python benchmarks/operator_running.py --unrelated 0      # the same cluster without them

What operator_scale.py leaves out, measured the way a cluster runs (issue #23): every TrainJob
admitted by the real Kueue and *running* (a pod bound and Running), its trainer patching
`status.progress` every `statusIntervalSeconds` (20 s: 100 patches/s at 2,000 jobs, each a watch
event the operator receives), and `--unrelated` Jobs of other teams queued in Kueue in other
namespaces (their Workloads reach the operator's Workload watch only if it is not filtered).

On tests/harness's etcd + kube-apiserver + kube-controller-manager and Kueue (Job integration),
with the operator as its own process under the chart's ServiceAccount:

1. `--unrelated` suspended Jobs with a `kueue.x-k8s.io/queue-name` in 10 other namespaces, behind
   a ClusterQueue that admits 10 of them (their pods stay unscheduled);
2. `--jobs` TrainJobs (one pod each) through a LocalQueue whose quota fits them all; this script
   plays the kubelet for their namespace only: it binds each pod and marks it Running;
3. trainers simulated by `--trainers` processes that merge-patch each TrainJob's status at the
   real interval, with the fields the trainer's StatusReporter sends;
4. a steady window of `--steady` seconds in which, every `--change-every` seconds, one running
   TrainJob's pod ends (alternately exit 0 and exit 1). The latency of a state change is from
   that pod status patch to the TrainJob's `status.phase` becoming Succeeded (exit 0: through
   the Job controller's Complete) or Restarting/Pending with one more restart (exit 1), taken
   from a watch; the part after the Job's own condition is the operator's.

Reports the operator's CPU (its /proc utime+stime over the window) and RSS, and its API
requests by verb and resource per second, from the API server's audit log restricted to the
operator's ServiceAccount (so Kueue's, the controller manager's and the simulators' requests
are not mixed in). Targets: a state change in `status` within 5 s at p99, under 500 MB RSS,
under half a core. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import operator_scale as scale  # noqa: E402  (puts tests/ on sys.path too)

from e2e.support import OPERATOR_NS  # noqa: E402
from harness.controlplane import ControlPlane, ensure_binaries  # noqa: E402
from harness.kube import ApiError, Kube  # noqa: E402
from harness.kueue import Kueue  # noqa: E402
from rulecases import trainjob  # noqa: E402

NS = "running"
TJ_PATH = f"/apis/kontrast.dev/v1alpha1/namespaces/{NS}/trainjobs"
NODE = "bench-node"
STATUS_INTERVAL = 20.0
AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts:{OPERATOR_NS}"]
- level: None
"""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the cluster ------------------------------------------------------------------------------
def queues(kube: Kube, unrelated_namespaces: list[str]) -> None:
    """A ClusterQueue that fits every TrainJob, and one that admits 10 unrelated Jobs."""
    base = "/apis/kueue.x-k8s.io/v1beta2"
    kube.post(f"{base}/resourceflavors", {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                                          "metadata": {"name": "default-flavor"}})
    for name, cpu in (("training", "100000"), ("others", "10")):
        kube.post(f"{base}/clusterqueues", {
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": name},
            "spec": {"namespaceSelector": {}, "queueingStrategy": "BestEffortFIFO", "resourceGroups": [{
                "coveredResources": ["cpu", "memory"], "flavors": [{"name": "default-flavor", "resources": [
                    {"name": "cpu", "nominalQuota": cpu}, {"name": "memory", "nominalQuota": "100Ti"}]}]}]}})
    for ns, queue in [(NS, "training")] + [(ns, "others") for ns in unrelated_namespaces]:
        kube.post(f"{base}/namespaces/{ns}/localqueues", {
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": queue},
            "spec": {"clusterQueue": queue}})


def create_unrelated_jobs(kube: Kube, namespaces: list[str], total: int) -> None:
    def make(i: int) -> None:
        kube.post(f"/apis/batch/v1/namespaces/{namespaces[i % len(namespaces)]}/jobs", {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"batch-{i}", "labels": {"kueue.x-k8s.io/queue-name": "others"}},
            "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "app", "image": "example/app:1", "resources": {"requests": {"cpu": "1"}}}]}}}})
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(make, range(total)))


def register_node(kube: Kube) -> None:
    kube.post("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    capacity = {"cpu": "100000", "memory": "100Ti", "pods": "100000"}
    kube.patch(f"/api/v1/nodes/{NODE}/status", {"status": {
        "capacity": capacity, "allocatable": capacity,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": now(), "lastTransitionTime": now()}]}}, Kube.STRATEGIC)
    kube.patch(f"/api/v1/nodes/{NODE}", {"spec": {"taints": None}})


class Kubelet:
    """Binds the benchmark namespace's pods to one Node and marks them Running; ends one on
    request. What the operator sees of a pod is its status, so no process runs."""

    def __init__(self, kube: Kube):
        self.kube = kube
        self.pool = ThreadPoolExecutor(8)
        self.started: set[str] = set()
        self._stop = threading.Event()

    def start(self) -> "Kubelet":
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        path = f"/api/v1/namespaces/{NS}/pods"
        while not self._stop.is_set():
            try:
                listed = self.kube.get(path)
                for pod in listed["items"]:
                    self._seen(pod)
                rv = listed["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    for e in self.kube.watch(path, rv, timeout_seconds=60):
                        rv = e["object"]["metadata"].get("resourceVersion", rv)
                        if e["type"] in ("ADDED", "MODIFIED"):
                            self._seen(e["object"])
            except Exception:
                time.sleep(0.5)

    def _seen(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        if meta.get("deletionTimestamp") or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        if not spec.get("nodeName"):
            self.pool.submit(self._ignore_gone, self.kube.post, f"/api/v1/namespaces/{NS}/pods/{meta['name']}/binding", {
                "apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"], "uid": meta["uid"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}})
        elif meta["uid"] not in self.started:
            self.started.add(meta["uid"])
            self.pool.submit(self._patch, meta["name"], self._running(pod))

    def _running(self, pod: dict) -> dict:
        t = now()
        return {"phase": "Running", "startTime": t, "hostIP": "10.0.0.1", "podIP": "10.0.0.2",
                "conditions": [{"type": c, "status": "True", "lastTransitionTime": t}
                               for c in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
                "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": True,
                                       "restartCount": 0, "started": True, "state": {"running": {"startedAt": t}}}
                                      for c in pod["spec"]["containers"]]}

    def end(self, pod: dict, exit_code: int) -> None:
        t = now()
        self._patch(pod["metadata"]["name"], {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [{"type": c, "status": "False", "lastTransitionTime": t} for c in ("ContainersReady", "Ready")],
            "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": False,
                                   "restartCount": 0, "started": False, "state": {"terminated": {
                                       "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                       "startedAt": t, "finishedAt": t}}}
                                  for c in pod["spec"]["containers"]]})

    def _patch(self, name: str, status: dict) -> None:
        self._ignore_gone(self.kube.patch, f"/api/v1/namespaces/{NS}/pods/{name}/status", {"status": status},
                          Kube.STRATEGIC)

    @staticmethod
    def _ignore_gone(call, *args) -> None:
        try:
            call(*args)
        except ApiError as e:
            if e.status not in (404, 409):
                print(f"kubelet: {e}", file=sys.stderr)


# --- the trainers -----------------------------------------------------------------------------
def trainers(kubeconfig: str, names: list[str], interval: float, stop) -> None:
    """One simulator process: each of `names` merge-patches its status every `interval` seconds,
    spread evenly, with the body a training step's throttled patch has."""
    from kubernetes import config as k8s_config

    kube = Kube(k8s_config.new_client_from_config(config_file=kubeconfig))
    pool = ThreadPoolExecutor(8)
    step = collections.Counter()
    t0 = time.monotonic()

    def patch(name: str) -> None:
        step[name] += 1
        s = step[name]
        body = {"status": {"progress": {
            "epoch": 1 + s // 100, "epochs": 8, "epochText": f"{1 + s // 100}/8", "step": s, "totalSteps": 800,
            "percent": s / 8, "percentText": f"{s / 8:.0f}%", "loss": 2.0 / (1 + s / 100), "lr": 1e-5,
            "samplesPerSecond": 812.5, "updatedAt": now(), "stage": "training", "stageDone": s,
            "stageTotal": 800, "stageText": "training"}}}
        try:
            kube.patch(f"{TJ_PATH}/{name}/status", body)
        except ApiError:
            pass
    k = 0
    while not stop.is_set():
        due = t0 + k * interval / len(names)
        wait = due - time.monotonic()
        if wait > 0:
            stop.wait(wait)
        pool.submit(patch, names[k % len(names)])
        k += 1
    pool.shutdown(cancel_futures=True)


# --- observing --------------------------------------------------------------------------------
class Phases:
    """When each TrainJob's status.phase/restarts and each Job's Complete/Failed were first seen."""

    def __init__(self, kube: Kube):
        self.kube = kube
        self.phase: dict[str, tuple[str, int]] = {}
        self.seen: dict[tuple[str, str], float] = {}   # (trainjob, phase) -> monotonic time
        self.job_done: dict[str, float] = {}            # trainjob -> when its Job got Complete/Failed
        self.lock = threading.Lock()

    def start(self) -> "Phases":
        threading.Thread(target=self._watch, args=(TJ_PATH, self._trainjob), daemon=True).start()
        threading.Thread(target=self._watch, args=(f"/apis/batch/v1/namespaces/{NS}/jobs", self._job),
                         daemon=True).start()
        return self

    def _watch(self, path: str, handle) -> None:
        while True:
            try:
                listed = self.kube.get(path)
                for o in listed["items"]:
                    handle(o)
                rv = listed["metadata"]["resourceVersion"]
                while True:
                    for e in self.kube.watch(path, rv, timeout_seconds=60):
                        rv = e["object"]["metadata"].get("resourceVersion", rv)
                        if e["type"] in ("ADDED", "MODIFIED"):
                            handle(e["object"])
            except Exception:
                time.sleep(0.5)

    def _trainjob(self, tj: dict) -> None:
        st = tj.get("status") or {}
        name, phase, restarts = tj["metadata"]["name"], st.get("phase") or "", int(st.get("restarts") or 0)
        with self.lock:
            self.phase[name] = (phase, restarts)
            self.seen.setdefault((name, f"{phase}/{restarts}"), time.monotonic())

    def _job(self, job: dict) -> None:
        tj = (job["metadata"].get("labels") or {}).get("kontrast.dev/trainjob")
        if tj and any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
                      for c in (job.get("status") or {}).get("conditions") or []):
            with self.lock:
                self.job_done.setdefault(tj, time.monotonic())

    def count(self, phase: str) -> int:
        with self.lock:
            return sum(1 for p, _ in self.phase.values() if p == phase)

    def wait_for(self, name: str, test, timeout: float) -> float | None:
        """The monotonic time `test(phase, restarts)` first held for `name`, or None."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                hits = [t for (n, key), t in self.seen.items() if n == name and test(*_split(key))]
            if hits:
                return min(hits)
            time.sleep(0.05)
        return None


def _split(key: str) -> tuple[str, int]:
    phase, _, restarts = key.rpartition("/")
    return phase, int(restarts)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    text = Path(f"/proc/{pid}/status").read_text()
    get = lambda key: int(text.split(key + ":", 1)[1].split()[0]) / 1024  # noqa: E731
    return get("VmRSS"), get("VmHWM")


def audit_counts(log: Path, since: str, until: str) -> collections.Counter:
    """The operator's requests between two RFC 3339 times, by (verb, resource[/subresource])."""
    counts: collections.Counter = collections.Counter()
    with open(log) as f:
        for line in f:
            e = json.loads(line)
            # one line per request: a watch when it starts, anything else when it completes
            counted = "ResponseStarted" if e.get("verb") == "watch" else "ResponseComplete"
            if e.get("stage") != counted or not since <= e.get("requestReceivedTimestamp", "") < until:
                continue
            ref = e.get("objectRef") or {}
            resource = "/".join(p for p in (ref.get("apiGroup"), ref.get("resource"), ref.get("subresource")) if p)
            counts[(e.get("verb"), resource)] += 1
    return counts


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# --- the run ----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--unrelated", type=int, default=2000)
    ap.add_argument("--trainers", type=int, default=2, help="simulator processes")
    ap.add_argument("--steady", type=float, default=240.0, help="seconds of the measured window")
    ap.add_argument("--change-every", type=float, default=1.0, help="seconds between state changes")
    ap.add_argument("--timeout", type=float, default=1800.0, help="for every TrainJob to be Running")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kontrast-running-"))
    (workdir / "audit-policy.yaml").write_text(AUDIT_POLICY)
    audit = workdir / "audit.log"
    cp = ControlPlane(ensure_binaries(), workdir=workdir / "cp", apiserver_args=[
        f"--audit-policy-file={workdir / 'audit-policy.yaml'}", f"--audit-log-path={audit}",
        "--audit-log-format=json", "--audit-log-maxsize=0"]).start()
    kueue = op = None
    stop = multiprocessing.Event()
    sims: list[multiprocessing.Process] = []
    try:
        kube = cp.kube()
        kueue = Kueue(cp, cp.bin_dir).start()
        kubeconfig = scale.operator_kubeconfig(cp)
        cp.create_namespace(NS)
        others = [cp.create_namespace(f"other-{i}") for i in range(10)]
        queues(kube, others)
        register_node(kube)
        t = time.monotonic()
        create_unrelated_jobs(kube, others, args.unrelated)
        print(f"{args.unrelated} unrelated Kueue-managed Jobs created in {time.monotonic() - t:.0f} s; "
              f"cluster quiet after {scale.settle(cp, quiet=2.0):.0f} s more", flush=True)

        op = scale.start_operator(cp, kubeconfig, workdir / "operator.log")
        kubelet = Kubelet(kube).start()
        phases = Phases(kube).start()
        t0 = time.monotonic()

        def make(i: int) -> None:
            kube.post(TJ_PATH, trainjob({"scheduling": {"queueName": "training", "maxRestarts": 100}}, f"tj-{i:04d}"))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(make, range(args.jobs)))
        created = time.monotonic() - t0
        last = -1
        while (running := phases.count("Running")) < args.jobs:
            if op.poll() is not None:
                raise SystemExit(f"the operator exited with {op.returncode}; see {workdir / 'operator.log'}")
            if time.monotonic() - t0 > args.timeout:
                raise SystemExit(f"only {running} of {args.jobs} Running after {args.timeout:.0f} s")
            if running // 200 != last // 200:
                print(f"  {running} Running after {time.monotonic() - t0:.0f} s", flush=True)
                last = running
            time.sleep(1)
        all_running = time.monotonic() - t0
        print(f"{args.jobs} TrainJobs created in {created:.0f} s, all Running after {all_running:.0f} s", flush=True)

        names = [f"tj-{i:04d}" for i in range(args.jobs)]
        for k in range(args.trainers):
            p = multiprocessing.Process(target=trainers, args=(str(cp.kubeconfig), names[k::args.trainers],
                                                                STATUS_INTERVAL, stop), daemon=True)
            p.start()
            sims.append(p)
        time.sleep(STATUS_INTERVAL + 10)  # every trainer has patched once; the operator has caught up

        pending = random.Random(0).sample(names, len(names))
        changes: list[tuple[str, int, float]] = []
        cpu0, wall0, since = cpu_seconds(op.pid), time.monotonic(), now()
        while time.monotonic() - wall0 < args.steady and pending:
            name = pending.pop()
            pods = kube.get(f"/api/v1/namespaces/{NS}/pods", labelSelector=f"kontrast.dev/trainjob={name}")["items"]
            pod = next((p for p in pods if (p.get("status") or {}).get("phase") == "Running"), None)
            if pod is not None:
                code = len(changes) % 2
                t = time.monotonic()
                kubelet.end(pod, code)
                changes.append((name, code, t))
            time.sleep(max(0.0, wall0 + len(changes) * args.change_every - time.monotonic()))
        cpu = (cpu_seconds(op.pid) - cpu0) / (time.monotonic() - wall0)
        until, window = now(), time.monotonic() - wall0
        rss, hwm = rss_mb(op.pid)

        latencies: dict[int, list[float]] = {0: [], 1: []}
        operator_part: dict[int, list[float]] = {0: [], 1: []}
        missed = []
        for name, code, t in changes:
            test = (lambda ph, r: ph == "Succeeded") if code == 0 else (lambda ph, r: r >= 1)
            seen = phases.wait_for(name, test, timeout=max(1.0, t + 60 - time.monotonic()))
            if seen is None:
                missed.append(name)
                continue
            latencies[code].append(seen - t)
            if name in phases.job_done:
                operator_part[code].append(seen - phases.job_done[name])
        time.sleep(2)  # the audit log's last lines
        requests = audit_counts(audit, since, until)

        print(f"machine: {scale.cpu_model()}, {os.cpu_count()} CPUs; load average at the end "
              f"{os.getloadavg()[0]:.1f}; {args.unrelated} unrelated Kueue-managed Jobs")
        for code, label in ((0, "pod exit 0 -> Succeeded"), (1, "pod exit 1 -> restart counted")):
            v = latencies[code]
            if v:
                o = operator_part[code]
                print(f"state change, {label}: n={len(v)} p50 {percentile(v, .5):.2f} s, p99 {percentile(v, .99):.2f} s, "
                      f"max {max(v):.2f} s (after the Job's own condition: p50 {percentile(o, .5):.2f} s, "
                      f"p99 {percentile(o, .99):.2f} s)" if o else f"n={len(v)}")
        if missed:
            print(f"no status change within 60 s for {len(missed)}: {missed[:5]}")
        print(f"operator CPU over {window:.0f} s: {cpu:.3f} cores (target < 0.5); RSS {rss:.0f} MB, "
              f"peak {hwm:.0f} MB (target < 500 MB)")
        total = sum(requests.values())
        print(f"operator API requests: {total / window:.2f}/s over the window (watch = a watch started)")
        for (verb, resource), n in requests.most_common():
            print(f"  {verb:8s} {resource:45s} {n / window:8.3f}/s")
    finally:
        stop.set()
        for p in sims:
            p.join(10)
        if op is not None and op.poll() is None:
            os.killpg(op.pid, signal.SIGTERM)
            try:
                op.wait(20)
            except Exception:
                os.killpg(op.pid, signal.SIGKILL)
        if kueue is not None:
            kueue.stop()
        cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
