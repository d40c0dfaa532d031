"""The operator at 200 TrainJobs on a real control plane, among 2,000 unrelated pods and Jobs.

    python benchmarks/operator_scale.py                  # --jobs 200 --unrelated 2000 --steady 240

Runs tests/harness's etcd + kube-apiserver + kube-controller-manager, applies the Helm chart's
RBAC, starts the operator as its own process (``python -m kontrast.operator``) under the
chart's ServiceAccount, and then:

1. creates ``--unrelated`` objects in other namespaces, half Pods (never scheduled: no node)
   and half suspended Jobs, none with kontrast labels;
2. creates ``--jobs`` TrainJobs at once (16 client threads), each held for Kueue
   (``scheduling.queueName``), so every one gets all its children, a suspended worker Job
   included, and a status, but no pods;
3. reports the time from the first create until every TrainJob has its six children and a
   ``status.phase``, the operator's peak RSS (VmHWM), and the API requests per TrainJob per
   minute in steady state, from the API server's own ``apiserver_request_total``: the counter
   delta over ``--steady`` seconds with the operator running, minus the same window measured
   before the operator started, once the controller manager had settled after the unrelated
   burst (its background), by verb and resource. Watches are one long request each and are
   not counted; the window spans at least two of the operator's resync periods (120 s).

Targets (issue #11): all reconciled in under 60 s, RSS under 200 MB, and a steady request
rate that does not grow with unrelated objects. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from e2e.support import OPERATOR_NS, api_path, ensure_namespace, render_chart  # noqa: E402
from harness.controlplane import ControlPlane, ensure_binaries  # noqa: E402
from rulecases import trainjob  # noqa: E402

BENCH_NS = "scale"
CHILD_PATHS = {
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Service": "/api/v1/namespaces/{ns}/services",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
}
_SAMPLE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$')


def request_counts(cp: ControlPlane) -> collections.Counter:
    """apiserver_request_total by (verb, group/resource[/subresource]), summed over codes."""
    ctx = ssl.create_default_context(cafile=str(cp.ca_file))
    req = urllib.request.Request(f"{cp.server}/metrics", headers={"Authorization": f"Bearer {cp.admin_token}"})
    with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
        text = r.read().decode()
    counts: collections.Counter = collections.Counter()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        resource = "/".join(p for p in (labels.get("group"), labels.get("resource"), labels.get("subresource")) if p)
        counts[(labels.get("verb", ""), resource)] += float(m["value"])
    return counts


def window(cp: ControlPlane, seconds: float) -> collections.Counter:
    before = request_counts(cp)
    time.sleep(seconds)
    after = request_counts(cp)
    after.subtract(before)
    return after


def api_rate(counts: collections.Counter, seconds: float) -> float:
    """Resource requests per second, watches (one long request each) and /metrics left out."""
    return sum(v for (verb, resource), v in counts.items() if verb != "WATCH" and resource) / seconds


def settle(cp: ControlPlane, quiet: float = 1.0, limit: float = 300.0) -> float:
    """Wait until the cluster is quiet (the controller manager done with a burst); seconds waited."""
    t = time.monotonic()
    while api_rate(window(cp, 10), 10) > quiet and time.monotonic() - t < limit:
        pass
    return time.monotonic() - t


def operator_kubeconfig(cp: ControlPlane) -> Path:
    """The chart's ServiceAccount, ClusterRole and binding; a kubeconfig acting as it."""
    ensure_namespace(cp, OPERATOR_NS)
    kube = cp.kube()
    sa = None
    for obj in render_chart(ensure_binaries() / "helm"):
        if obj["kind"] in ("ServiceAccount", "ClusterRoleBinding") or (
                obj["kind"] == "ClusterRole" and obj["metadata"]["name"].endswith("-operator")):
            kube.post(api_path(obj), obj)
            sa = obj["metadata"]["name"] if obj["kind"] == "ServiceAccount" else sa
    return cp.service_account_kubeconfig(OPERATOR_NS, sa)


def create_unrelated(cp: ControlPlane, total: int, namespaces: int = 10) -> None:
    kube = cp.kube()
    names = [cp.create_namespace(f"other-{i}") for i in range(namespaces)]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "spec": {"suspend": True, "template": {"spec": {
               "restartPolicy": "Never", "containers": [{"name": "app", "image": "example/app:1"}]}}}}

    def make(i: int) -> None:
        ns = names[i % namespaces]
        if i % 2:
            kube.post(f"/api/v1/namespaces/{ns}/pods", {**pod, "metadata": {"name": f"app-{i}", "labels": {"app": "x"}}})
        else:
            kube.post(f"/apis/batch/v1/namespaces/{ns}/jobs", {**job, "metadata": {"name": f"batch-{i}"}})
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(make, range(total)))


def start_operator(cp: ControlPlane, kubeconfig: Path, log: Path) -> subprocess.Popen:
    env = {**cp.env(), "KONTRAST_OPERATOR_KUBECONFIG": str(kubeconfig), "KONTRAST_METRICS_PORT": "0",
           "KONTRAST_LIVENESS": "", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "kontrast.operator"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


def reconciled(cp: ControlPlane, jobs: int, first_status: dict[str, float], t0: float) -> tuple[bool, dict]:
    """Whether every TrainJob has its children and a phase; notes when each got its phase."""
    kube = cp.kube()
    sel = {"labelSelector": "kontrast.dev/trainjob"}
    counts = {kind: len(kube.get(path.format(ns=BENCH_NS), **sel)["items"]) for kind, path in CHILD_PATHS.items()}
    items = kube.get(f"/apis/kontrast.dev/v1alpha1/namespaces/{BENCH_NS}/trainjobs")["items"]
    for item in items:
        if (item.get("status") or {}).get("phase"):
            first_status.setdefault(item["metadata"]["name"], time.monotonic() - t0)
    counts["with status"] = len(first_status)
    return all(v >= jobs for v in counts.values()), counts


def create_trainjobs(cp: ControlPlane, jobs: int) -> None:
    kube = cp.kube()

    def make(i: int) -> None:
        kube.post(f"/apis/kontrast.dev/v1alpha1/namespaces/{BENCH_NS}/trainjobs",
                  trainjob({"scheduling": {"queueName": "held"}}, f"tj-{i:04d}"))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(make, range(jobs)))


def per_job_minute(delta: collections.Counter, base: collections.Counter, seconds: float, jobs: int) -> dict:
    net = {k: (delta[k] - base.get(k, 0)) for k in delta if k[0] != "WATCH"}
    return {k: v * 60 / seconds / jobs for k, v in net.items() if abs(v) >= 0.5}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--unrelated", type=int, default=2000)
    ap.add_argument("--steady", type=float, default=240.0,
                    help="seconds of each steady-state window (at least two resync periods)")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kontrast-scale-"))
    cp = ControlPlane(ensure_binaries(), workdir=workdir / "cp").start()
    op = None
    try:
        kubeconfig = operator_kubeconfig(cp)
        cp.create_namespace(BENCH_NS)
        t = time.monotonic()
        create_unrelated(cp, args.unrelated)
        print(f"created {args.unrelated} unrelated pods and Jobs in {time.monotonic() - t:.1f} s")
        print(f"cluster quiet after {settle(cp):.0f} s more")
        background = window(cp, args.steady)

        op = start_operator(cp, kubeconfig, workdir / "operator.log")
        time.sleep(8)  # kopf's start-up: lists and watches begin
        idle_rss = peak_rss_mb(op.pid)
        t0 = time.monotonic()
        create_trainjobs(cp, args.jobs)
        created = time.monotonic() - t0
        counts: dict = {}
        first_status: dict[str, float] = {}
        while time.monotonic() - t0 < args.timeout:
            done, counts = reconciled(cp, args.jobs, first_status, t0)
            if done:
                break
            if op.poll() is not None:
                raise SystemExit(f"the operator exited with {op.returncode}; see {workdir / 'operator.log'}")
            time.sleep(1.0)
        else:
            raise SystemExit(f"not reconciled after {args.timeout} s: {counts}")
        elapsed = time.monotonic() - t0
        time.sleep(20)  # the controller manager's follow-up on the new Jobs
        steady = window(cp, args.steady)
        rss = peak_rss_mb(op.pid)
        times = sorted(first_status.values())

        rates = per_job_minute(steady, background, args.steady, args.jobs)
        print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs")
        print(f"{args.jobs} TrainJobs created in {created:.1f} s; all with children and status after "
              f"{elapsed:.1f} s (target < 60 s); status after median {times[len(times) // 2]:.1f} s, "
              f"90% {times[int(len(times) * 0.9)]:.1f} s")
        print(f"operator peak RSS: {rss:.0f} MB (after start-up, before the TrainJobs: {idle_rss:.0f} MB; "
              f"target < 200 MB)")
        total = sum(rates.values())
        print(f"steady state: {total:.3f} API requests per TrainJob per minute "
              f"(over {args.steady:.0f} s, minus the {api_rate(background, args.steady) * 60:.0f}/min of the "
              f"cluster before the operator started; watches not counted)")
        for (verb, resource), rate in sorted(rates.items(), key=lambda kv: -abs(kv[1])):
            print(f"  {verb:8s} {resource:40s} {rate:8.3f}")
    finally:
        if op is not None and op.poll() is None:
            os.killpg(op.pid, signal.SIGTERM)
            try:
                op.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(op.pid, signal.SIGKILL)
        cp.stop()
    return 0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
