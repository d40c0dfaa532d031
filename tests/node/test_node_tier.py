"""The whole product on a real node: the trainer image pulled from the registry and run by
containerd/runc under the kubelet, the operator as a pod from its image, installed with Helm.

What the fast tiers (harness.nodeagent: processes on the host) cannot show: the image's install
path and entry point, UID 1000 with every capability dropped in a namespace enforcing Pod
Security "restricted", /dev/shm for DataLoader workers, pod IPs and cluster DNS for the torchrun
rendezvous, the `kubernetes` Service for the in-pod status reporter, cgroup memory limits, image
pulls, `kubectl logs` and `kubectl exec` through the kubelet.
"""

from __future__ import annotations

import ipaddress

import pytest

from harness.node import POD_CIDR
from harness.waiting import wait_for
from node.support import PROGRESS_LINE, Cluster, example_trainjob

pytestmark = pytest.mark.node


@pytest.fixture
def cluster(node, restricted_ns):
    ns, folder = restricted_ns
    c = Cluster(node, ns)
    c.folder = folder
    c.apply_example_pvc()
    return c


@pytest.fixture
def data(cluster):
    cluster.generate_example_data(cluster.folder)
    return cluster


def test_example_trains_on_two_pods_as_real_containers(data):
    c = data
    c.create(example_trainjob("cpu", epochs=8))
    c.wait_running_pods("cpu", 2)
    pods = c.pods("cpu")
    names = [p["metadata"]["name"] for p in pods]
    ips = [p["status"]["podIP"] for p in pods]
    # Each pod is its own container with its own IP on the node's CNI bridge.
    assert len(set(ips)) == 2 and all(ipaddress.ip_address(ip) in ipaddress.ip_network(POD_CIDR) for ip in ips)
    # The image's user, as the namespace's Pod Security "restricted" demands.
    assert c.exec(names[1], "id", "-u").strip() == "1000"
    status_line = c.exec(names[1], "grep", "^CapEff", "/proc/self/status")
    assert status_line.split()[1] == "0000000000000000", status_line
    # /dev/shm is the in-memory emptyDir, not the runtime's 64 MiB default.
    shm = c.exec(names[0], "df", "-k", "/dev/shm").splitlines()[-1].split()
    assert shm[0] == "tmpfs" and int(shm[1]) > 1024 * 1024, shm
    # The rendezvous name resolves through cluster DNS (CoreDNS, the headless Service) to rank 0's pod IP.
    env = {e["name"]: e.get("value") for e in pods[1]["spec"]["containers"][0]["env"]}
    master = env["PET_MASTER_ADDR"]
    # The record exists once the EndpointSlice controller and then CoreDNS have seen rank 0's IP, which
    # on a busy node can be seconds after Running (CI once saw EAI_AGAIN there); torchrun's c10d client
    # retries the lookup meanwhile, so the test waits for it too.
    lookup = f"import socket; print(socket.gethostbyname({master!r}))"
    resolved = wait_for(lambda: c.exec(names[1], "python3", "-c", lookup).strip(), 120,
                        f"{master} to resolve in pod {names[1]}", interval=1)
    assert resolved == ips[0], (master, resolved, ips)

    # `kubectl logs` (API server -> kubelet -> containerd's log files) shows progress lines.
    wait_for(lambda: PROGRESS_LINE.search(c.logs(names[0])), 600, "a progress line in kubectl logs")
    # `kontrast logs` picks the worker's pod and reads the same log through the kubelet.
    for worker, pod in enumerate(names):
        proc = c.kontrast("logs", "cpu", "--worker", str(worker))
        assert proc.returncode == 0 and f"==> pod {pod} (attempt 0, worker {worker})" in proc.stderr, proc.stderr
        assert "kontrast.launch: torchrun" in proc.stdout, proc.stdout[-2000:]
        assert worker != 0 or PROGRESS_LINE.search(proc.stdout), proc.stdout[-2000:]  # rank 0 reports

    st = c.wait_phase("cpu", "Succeeded", timeout=900)
    assert st["restarts"] == 0
    assert st["resolved"]["worldSize"] == 2 and st["resolved"]["device"] == "cpu"
    assert st["progress"]["step"] == st["progress"]["totalSteps"] and st["progress"]["epochText"] == "8/8"
    assert st["checkpoints"]["latest"]["epoch"] == 8
    assert set(st["metrics"]["after"]) >= {"ndcg@10", "mrr@10"}
    # The exported model and the report are on the volume (a folder on this node).
    run = c.folder / "product-search" / "runs" / "cpu"
    assert st["outputs"]["report"].endswith("/cpu/report.html") and (run / "report.html").is_file()
    assert (run / "model" / "open_clip_model.safetensors").is_file()
    assert (run / "checkpoints" / "epoch_8.pt").is_file()
    assert (run / "report.html").stat().st_uid == 1000  # written by the container's user


def test_killed_container_resumes_from_its_checkpoint(data, node):
    c = data
    c.create(example_trainjob("kill", epochs=14))
    st = c.wait_checkpoint("kill", 2)
    ckpt_step = st["checkpoints"]["latest"]["step"]
    victim = c.pods("kill", attempt=0)[1]
    # SIGKILL to every process of the trainer container, through containerd: what the kernel's
    # OOM killer or a crash does. The pod is not deleted; its container exits 137.
    node.kill_container(victim, "trainer")
    wait_for(lambda: c.status("kill").get("restarts") == 1, 180, "restarts == 1")
    restarting = c.cond("kill", "Restarting")
    assert "137" in restarting["message"], restarting
    wait_for(lambda: [p for p in c.pods("kill", attempt=1) if "resuming from" in c.logs(p["metadata"]["name"])],
             600, "the new rank 0 to resume from the checkpoint")
    st = c.wait_phase("kill", "Succeeded", timeout=900)
    assert st["restarts"] == 1
    assert st["progress"]["step"] == st["progress"]["totalSteps"] > ckpt_step


def test_deleted_pod_resumes_without_spending_the_restart_budget(data, node):
    """Preemption and drains evict pods through the Eviction API (a DisruptionTarget condition,
    then a graceful deletion: the kubelet SIGTERMs the container, which checkpoints)."""
    c = data
    c.create(example_trainjob("evict", epochs=14))
    c.wait_checkpoint("evict", 1)
    victim = c.pods("evict", attempt=0)[1]["metadata"]["name"]
    c.kube.post(f"/api/v1/namespaces/{c.ns}/pods/{victim}/eviction",
                {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim, "namespace": c.ns}})
    wait_for(lambda: (c.cond("evict", "Restarting") or {}).get("reason") == "Disrupted", 180,
             "a restart for the disruption")
    wait_for(lambda: len(c.pods("evict", attempt=1)) == 2 and not c.pods("evict", attempt=0), 300,
             "the new attempt's pods, alone")
    wait_for(lambda: [p for p in c.pods("evict", attempt=1) if "resuming from" in c.logs(p["metadata"]["name"])],
             600, "the new rank 0 to resume from the checkpoint")
    st = c.wait_phase("evict", ("Running", "Succeeded"))
    assert st["restarts"] == 0


def test_too_small_memory_limit_fails_with_oomkilled(data):
    """A permanent condition: the trainer cannot fit its limit. The TrainJob ends Failed with a
    reason that says OOMKilled and names the container and the limit, without spending restarts."""
    c = data
    c.create(example_trainjob("oom", epochs=4, scheduling={
        "resources": {"requests": {"cpu": "250m", "memory": "200Mi"}, "limits": {"memory": "200Mi"}},
        "maxRestarts": 3}))
    # The kubelet reports what the kernel did.
    wait_for(lambda: [cs for p in c.pods("oom") for cs in p["status"].get("containerStatuses") or []
                      if ((cs.get("state") or {}).get("terminated") or {}).get("reason") == "OOMKilled"
                      or ((cs.get("lastState") or {}).get("terminated") or {}).get("reason") == "OOMKilled"],
             300, "a container OOMKilled by the kernel")
    st = c.wait_phase("oom", "Failed", timeout=300)
    failed = c.cond("oom", "Failed") or {}
    text = f"{failed.get('reason')} {failed.get('message')} {st.get('message')}"
    assert "OOMKilled" in text, st
    assert "trainer" in text and "200Mi" in text, st
    assert st["restarts"] == 0, st


def test_bad_image_tag_surfaces_the_pull_error(cluster, node):
    c = cluster
    repo = node.images["trainer"].rpartition(":")[0]
    c.create(example_trainjob("badimage", epochs=2, scheduling={"image": f"{repo}:no-such-tag"}))

    def pull_error():
        st = c.status("badimage")
        text = " ".join([st.get("message") or ""] + [c.get("message") or "" for c in st.get("conditions") or []])
        return ("ErrImagePull" in text or "ImagePullBackOff" in text) and st
    st = wait_for(pull_error, 60 + 30, "ErrImagePull/ImagePullBackOff in the TrainJob's status")
    assert st.get("phase") in ("Pending", "Running", "Failed"), st


def test_example_generates_its_own_data(cluster):
    """examples/cluster-cpu.yaml says the annotation kontrast.dev/generate-example-data makes
    rank 0 generate the data set into the (empty) volume: "this file is all you need"."""
    c = cluster
    tj = example_trainjob("gen", epochs=1)
    assert tj["metadata"]["annotations"]["kontrast.dev/generate-example-data"] == "true"
    c.create(tj)
    c.wait_phase("gen", "Succeeded", timeout=900)
    assert (c.folder / "product-search" / "data" / "train.csv").is_file()
