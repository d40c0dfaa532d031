"""`kontrast submit`, `kontrast watch`, `kontrast logs` and kontrast.client against the real
kube-apiserver. No operator runs here: the tests play its part (and the trainer's) by patching
the TrainJob's status subresource, and read what the command prints and how it exits. The
commands run as subprocesses with the control plane's kubeconfig and stdout a pipe (no
terminal: plain lines)."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from harness.waiting import wait_for
from rulecases import trainjob

from kontrast.client import ApiRejected, Client, TrainJobDeleted, TrainJobInvalid, WaitTimeout
from kontrast.client import api as client_api

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "cluster-cpu.yaml"


def tj_path(ns: str, name: str | None = None, status: bool = False) -> str:
    base = f"/apis/kontrast.dev/v1alpha1/namespaces/{ns}/trainjobs"
    return base + (f"/{name}" if name else "") + ("/status" if status else "")


def env(control_plane) -> dict:
    e = control_plane.env()
    e["PYTHONUNBUFFERED"] = "1"
    return e


def kontrast(control_plane, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kontrast.cli", *args], capture_output=True, text=True,
                          env=env(control_plane), timeout=timeout)


class Running:
    """A `kontrast` command in the background whose stdout lines a test waits for."""

    def __init__(self, control_plane, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "kontrast.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env(control_plane))
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def expect(self, predicate, timeout: float = 60) -> str:
        """Wait for the next stdout line that satisfies `predicate` (a str: its start)."""
        check = (lambda s: s.startswith(predicate)) if isinstance(predicate, str) else predicate
        while True:
            try:
                line = self._q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line matching {predicate!r} within {timeout}s; got {self.lines}") from None
            if line is None:
                raise AssertionError(f"the command ended before {predicate!r}: {self.lines} "
                                     f"stderr: {self.proc.stderr.read()}")
            self.lines.append(line)
            if check(line):
                return line

    def finish(self, timeout: float = 60) -> tuple[int, list[str], str]:
        rc = self.proc.wait(timeout=timeout)
        while (line := self._q.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return rc, self.lines, self.proc.stderr.read()


def patch_status(kube, ns: str, name: str, status: dict) -> None:
    kube.patch(tj_path(ns, name, status=True), {"status": status})


def create(control_plane, ns: str, name: str) -> dict:
    return control_plane.kube().post(tj_path(ns), trainjob({}, name=name))


def example_file(tmp_path: Path, mutate=None) -> Path:
    docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
    if mutate:
        mutate(docs[1])
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    return f


# --- submit ---------------------------------------------------------------------------------
def test_submit_creates_the_trainjob_and_the_files_other_objects(control_plane, namespace):
    proc = kontrast(control_plane, "submit", str(EXAMPLE), "-n", namespace)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"trainjob.kontrast.dev/product-search-cpu created in namespace {namespace}\n"
    kube = control_plane.kube()
    stored = kube.get(tj_path(namespace, "product-search-cpu"))
    assert stored["spec"]["procsPerNode"] == 2 and stored["spec"]["scheduling"]["cleanup"] == "OnSuccess"
    assert kube.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/kontrast-data")
    # a second submit keeps the existing volume but the TrainJob's name is taken: the server says so
    again = kontrast(control_plane, "submit", str(EXAMPLE), "-n", namespace)
    assert again.returncode == 4
    assert 'trainjobs.kontrast.dev "product-search-cpu" already exists' in again.stderr


def test_submit_of_an_invalid_file_sends_nothing(control_plane, namespace, tmp_path):
    def bad(tj):
        tj["spec"]["leftWeights"] = [1.0, 2.0]  # one weight per left key (a CEL rule)
    proc = kontrast(control_plane, "submit", str(example_file(tmp_path, bad)), "-n", namespace)
    assert proc.returncode == 3, proc.stderr
    assert "spec.leftWeights: leftWeights must have exactly one weight per entry of leftKeys" in proc.stderr
    kube = control_plane.kube()
    assert kube.get(tj_path(namespace))["items"] == []
    assert kube.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims")["items"] == []


def test_submit_prints_the_servers_own_rejection(control_plane, namespace, tmp_path):
    """Labels are the API server's to check (kontrast validate leaves metadata to it): a file
    valid locally that the server refuses, with its message and the field."""
    def bad_label(tj):
        tj["metadata"]["labels"] = {"team name": "search"}
    f = example_file(tmp_path, bad_label)
    assert kontrast(control_plane, "validate", str(f)).returncode == 0
    proc = kontrast(control_plane, "submit", str(f), "-n", namespace)
    assert proc.returncode == 4, proc.stderr
    assert 'TrainJob.kontrast.dev "product-search-cpu" is invalid: metadata.labels: Invalid value: "team name"' \
        in proc.stderr
    assert proc.stdout == ""
    kube = control_plane.kube()
    assert kube.get(tj_path(namespace))["items"] == []
    # the server judged the TrainJob before the file's volume was created
    assert kube.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims")["items"] == []


def test_submit_to_a_missing_namespace(control_plane, tmp_path):
    proc = kontrast(control_plane, "submit", str(EXAMPLE), "-n", "no-such-namespace")
    assert proc.returncode == 4
    assert 'namespaces "no-such-namespace" not found' in proc.stderr
    assert "PersistentVolumeClaim" not in proc.stderr  # the TrainJob's dry run failed first


# --- watch ----------------------------------------------------------------------------------
RUNNING = {"type": "Running", "status": "True", "reason": "Started", "message": "1 of 1 pods running"}
CREATED = {"type": "Created", "status": "True", "reason": "Created", "message": "attempt 1 created"}
PROGRESS = {"epoch": 1, "epochs": 2, "epochText": "1/2", "step": 3, "totalSteps": 8, "percent": 37.5,
            "loss": 2.0794, "samplesPerSecond": 32.0, "updatedAt": "2026-01-01T00:00:10Z"}


def test_submit_watch_follows_to_succeeded(control_plane, namespace, tmp_path):
    kube = control_plane.kube()
    watch = Running(control_plane, "submit", "--watch", str(EXAMPLE), "-n", namespace)
    name = "product-search-cpu"
    watch.expect("trainjob.kontrast.dev/product-search-cpu created")
    watch.expect(f"TrainJob {namespace}/{name}")
    patch_status(kube, namespace, name, {"phase": "Pending", "conditions": [CREATED]})
    watch.expect("condition Created=True")
    patch_status(kube, namespace, name, {"phase": "Running", "conditions": [CREATED, RUNNING],
                                          "resolved": {"globalBatchSize": 8}, "progress": PROGRESS})
    watch.expect("epoch 1/2")
    patch_status(kube, namespace, name, {"progress": PROGRESS | {"step": 6, "percent": 75.0, "epoch": 2,
                                                                 "loss": 1.5}})
    watch.expect("epoch 2/2")
    patch_status(kube, namespace, name, {"metrics": {
        "history": [{"epoch": 0, "phase": "before", "metrics": {"ndcg@10": 0.25, "mrr@10": 0.2}},
                    {"epoch": 1, "phase": "epoch", "metrics": {"ndcg@10": 0.5, "mrr@10": 0.4}}],
        "latest": {"ndcg@10": 0.5, "mrr@10": 0.4}, "epoch": 1}})
    watch.expect("metrics epoch 1")
    patch_status(kube, namespace, name, {
        "phase": "Succeeded", "message": "Training completed",
        "conditions": [CREATED, RUNNING | {"status": "False", "reason": "Completed"},
                       {"type": "Succeeded", "status": "True", "reason": "Completed",
                        "message": "all nodes finished training"}],
        "progress": PROGRESS | {"step": 8, "percent": 100.0, "epoch": 2, "loss": 1.25},
        "outputs": {"report": "pvc://kontrast-data/product-search/runs/cpu/report.html",
                    "model": "pvc://kontrast-data/product-search/runs/cpu/model"}})
    rc, lines, err = watch.finish()
    assert rc == 0, err
    assert lines == [
        f"trainjob.kontrast.dev/{name} created in namespace {namespace}",
        f"TrainJob {namespace}/{name}",
        "phase Pending",
        "condition Created=True (Created): attempt 1 created",
        "phase Running",
        "condition Running=True (Started): 1 of 1 pods running",
        # 5 steps left at 32 samples/s of 8-row steps
        "epoch 1/2 [########------------]  38% step 3/8 | loss 2.0794 | 32.0 samples/s | ETA 00:01",
        "epoch 2/2 [###############-----]  75% step 6/8 | loss 1.5000 | 32.0 samples/s | ETA 00:00",
        "metrics before training: ndcg@10 0.2500 | mrr@10 0.2000",
        "metrics epoch 1: ndcg@10 0.5000 | mrr@10 0.4000",
        "phase Succeeded",
        "condition Running=False (Completed): 1 of 1 pods running",
        "condition Succeeded=True (Completed): all nodes finished training",
        "epoch 2/2 [####################] 100% step 8/8 | loss 1.2500 | 32.0 samples/s | ETA 00:00",
        "output report: pvc://kontrast-data/product-search/runs/cpu/report.html",
        "output model: pvc://kontrast-data/product-search/runs/cpu/model",
        "Succeeded: Training completed",
    ]
    assert "\r" not in "".join(lines)


def test_watch_of_a_failed_job_says_why_and_exits_1(control_plane, namespace):
    kube = control_plane.kube()
    create(control_plane, namespace, "fails")
    patch_status(kube, namespace, "fails", {"phase": "Running", "conditions": [RUNNING], "progress": PROGRESS})
    watch = Running(control_plane, "watch", "fails", "-n", namespace)
    watch.expect("epoch 1/2")
    failed = {"type": "Failed", "status": "True", "reason": "RestartLimitExceeded",
              "message": "pod fails-4-0 exited with code 1; 3 restarts spent of scheduling.maxRestarts 3"}
    patch_status(kube, namespace, "fails", {"phase": "Failed", "message": failed["message"],
                                            "conditions": [RUNNING | {"status": "False", "reason": "Failed"}, failed]})
    rc, lines, err = watch.finish()
    assert rc == 1
    assert lines[-2:] == ["condition Running=False (Failed): 1 of 1 pods running",
                          "condition Failed=True (RestartLimitExceeded): " + failed["message"]]
    assert err == f"Failed (RestartLimitExceeded): {failed['message']}\n"


def test_watch_of_a_finished_job_returns_at_once(control_plane, namespace):
    create(control_plane, namespace, "done")
    patch_status(control_plane.kube(), namespace, "done", {"phase": "Succeeded", "message": "Training completed"})
    proc = kontrast(control_plane, "watch", "done", "-n", namespace)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "Succeeded: Training completed"


def test_watch_on_a_terminal_redraws_the_progress_line(control_plane, namespace):
    """stdout a pseudo-terminal: the progress line is redrawn in place (carriage return and
    erase-line), the other lines are whole."""
    import os
    import pty

    create(control_plane, namespace, "tty")
    patch_status(control_plane.kube(), namespace, "tty", {
        "phase": "Succeeded", "message": "Training completed", "conditions": [RUNNING],
        "progress": PROGRESS | {"step": 8, "percent": 100.0}})
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "kontrast.cli", "watch", "tty", "-n", namespace],
                            stdout=follower, stderr=subprocess.PIPE, env=env(control_plane))
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the command ended and closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(60) == 0, proc.stderr.read()
    text = out.decode().replace("\r\n", "\n")  # the terminal's own newline translation
    assert "\r\x1b[Kepoch 1/2 [####################] 100% step 8/8" in text
    assert "\nSucceeded: Training completed\n" in text


def test_watch_exit_codes_not_found_deleted_timeout(control_plane, namespace):
    proc = kontrast(control_plane, "watch", "nothing", "-n", namespace)
    assert proc.returncode == 4
    assert 'trainjobs.kontrast.dev "nothing" not found' in proc.stderr

    create(control_plane, namespace, "slow")
    proc = kontrast(control_plane, "watch", "slow", "-n", namespace, "--timeout", "1")
    assert proc.returncode == 6
    assert "still without a phase after 1s" in proc.stderr

    watch = Running(control_plane, "watch", "slow", "-n", namespace)
    watch.expect(f"TrainJob {namespace}/slow")
    control_plane.kube().delete(tj_path(namespace, "slow"))
    rc, _, err = watch.finish()
    assert rc == 5
    assert "was deleted" in err


# --- the Python client ----------------------------------------------------------------------
@pytest.fixture
def client(control_plane, namespace):
    return Client(namespace, config_file=str(control_plane.kubeconfig))


def test_client_create_from_dict_validates_locally_first(client, namespace):
    bad = trainjob({"batchSize": 0}, name="bad")
    with pytest.raises(TrainJobInvalid, match="spec.batchSize"):
        client.create(bad)
    with pytest.raises(ApiRejected) as err:
        client.create(trainjob({}, name="ok") | {"metadata": {"name": "ok", "annotations": {"a b": "c"}}})
    assert err.value.status == 422 and "metadata.annotations" in str(err.value)
    dry = client.create(trainjob({}, name="ok"), dry_run=True)
    assert dry.name == "ok" and dry.raw["spec"]["epochs"] == 5
    with pytest.raises(ApiRejected) as err:
        client.get("ok")
    assert err.value.not_found
    snap = client.create(trainjob({}, name="ok"))
    assert (snap.name, snap.namespace, snap.phase) == ("ok", namespace, "")
    assert snap.raw["spec"]["epochs"] == 5  # the server's defaults
    assert client.get("ok").uid == snap.uid


def test_client_wait_stream_and_metrics(client, control_plane, namespace):
    kube = control_plane.kube()
    client.create(trainjob({}, name="waited"))
    with pytest.raises(WaitTimeout) as err:
        client.wait("waited", timeout=1)
    assert err.value.snapshot.name == "waited"

    seen: list = []
    result: dict = {}

    def waiter():
        for snap in client.stream("waited", timeout=120):
            seen.append(snap)
        result["final"] = client.wait("waited", timeout=60)

    t = threading.Thread(target=waiter)
    t.start()
    wait_for(lambda: seen, 30, "the first snapshot")
    patch_status(kube, namespace, "waited", {"phase": "Running", "progress": PROGRESS})
    wait_for(lambda: any(s.progress for s in seen), 30, "the progress snapshot")
    patch_status(kube, namespace, "waited", {
        "phase": "Succeeded", "metrics": {"before": {"ndcg@10": 0.25}, "after": {"ndcg@10": 0.5},
                                           "latest": {"ndcg@10": 0.5}}})
    t.join(60)
    assert not t.is_alive()
    assert [s.phase for s in seen] == ["", "Running", "Succeeded"]
    assert seen[1].progress.step == 3 and seen[1].progress.loss == pytest.approx(2.0794)
    final = result["final"]
    assert final.succeeded and final.metrics.after == {"ndcg@10": 0.5}
    assert client.metrics("waited").before == {"ndcg@10": 0.25}


def test_stream_relists_after_410_and_resumes_after_watch_expiry(client, control_plane, namespace, monkeypatch):
    """A watch from an expired resourceVersion gets 410 Gone from the server: the client lists
    again and goes on; a watch the server ends (timeoutSeconds) resumes where it was."""
    kube = control_plane.kube()
    client.create(trainjob({}, name="expiry"))
    real_list, real_watch = client_api.Client._list, client_api.Client._watch
    calls = {"list": 0, "watch": 0, "gone": 0}

    def stale_list(self, name, ns):
        snap, rv = real_list(self, name, ns)
        calls["list"] += 1
        return snap, ("1" if calls["list"] == 1 else rv)  # the first watch starts far too old

    def counting_watch(self, name, ns, rv, seconds):
        calls["watch"] += 1
        try:
            yield from real_watch(self, name, ns, rv, seconds)
        except client_api._Gone:
            calls["gone"] += 1
            raise

    monkeypatch.setattr(client_api.Client, "_list", stale_list)
    monkeypatch.setattr(client_api.Client, "_watch", counting_watch)
    seen: list = []
    t = threading.Thread(target=lambda: seen.extend(client.stream("expiry", timeout=120, watch_seconds=1)))
    t.start()
    wait_for(lambda: calls["gone"] == 1 and calls["list"] == 2, 30, "a 410 and the relist")
    wait_for(lambda: calls["watch"] >= 3, 30, "a watch the server ended, and the next one")
    patch_status(kube, namespace, "expiry", {"phase": "Failed", "message": "boom"})
    t.join(60)
    assert not t.is_alive()
    assert [s.phase for s in seen] == ["", "Failed"]


def test_stream_of_a_deleted_job(client, control_plane, namespace):
    client.create(trainjob({}, name="gone"))
    it = client.stream("gone")
    assert next(it).name == "gone"
    client.delete("gone")
    with pytest.raises(TrainJobDeleted):
        next(it)


# --- logs -----------------------------------------------------------------------------------
def worker_pod(name: str, tj: str, attempt: int, index: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"kontrast.dev/trainjob": tj, "kontrast.dev/component": "worker",
                                                  "kontrast.dev/attempt": str(attempt),
                                                  "batch.kubernetes.io/job-completion-index": str(index)},
                         "annotations": {"kontrast.dev/trainjob-name": tj,
                                         "batch.kubernetes.io/job-completion-index": str(index)}},
            # no scheduler binds these (the e2e node agent may still run in this session)
            "spec": {"schedulerName": "kontrast-test-unscheduled",
                     "containers": [{"name": "trainer", "image": "trainer:test"}]}}


def test_logs_picks_the_newest_attempts_worker(control_plane, namespace):
    """Pod selection through the API server's label selector. There is no kubelet here (the
    e2e node agent does not serve the kubelet's log endpoint either), so the pods name a
    scheduler that does not exist and stay unscheduled: the command names the pod it chose and says it has no log yet."""
    proc = kontrast(control_plane, "logs", "lj", "-n", namespace)
    assert proc.returncode == 4 and "TrainJob lj has no worker pods (yet)" in proc.stderr
    kube = control_plane.kube()
    for args in (("lj-1-0", "lj", 1, 0), ("lj-1-1", "lj", 1, 1), ("lj-2-0", "lj", 2, 0), ("lj-2-1", "lj", 2, 1),
                 ("other-9-1", "other", 9, 1)):
        kube.post(f"/api/v1/namespaces/{namespace}/pods", worker_pod(*args))
    proc = kontrast(control_plane, "logs", "lj", "--worker", "1", "-n", namespace)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == "==> pod lj-2-1 (attempt 2, worker 1)"
    assert "not on a node yet" in proc.stderr
    proc = kontrast(control_plane, "logs", "lj", "--worker", "2", "-n", namespace)
    assert proc.returncode == 4 and "attempt 2 has no worker 2 (workers: 0, 1)" in proc.stderr
    client = Client(namespace, config_file=str(control_plane.kubeconfig))
    assert client.worker_pod("lj", attempt=1)["metadata"]["name"] == "lj-1-0"
    assert {p["metadata"]["name"] for p in client.worker_pods("lj")} == {"lj-1-0", "lj-1-1", "lj-2-0", "lj-2-1"}
