"""Jobs and pods through the real controllers and the test node agent: Indexed Jobs run to
completion, pods find each other by headless-service names, and the pod features the operator
relies on (env, volumes, ServiceAccount tokens, exit codes, restarts, deletion) behave as a
kubelet's would."""

from __future__ import annotations

import json
import textwrap

import pytest

from harness.controlplane import free_port
from harness.kube import ApiError
from harness.waiting import wait_for

pytestmark = pytest.mark.k8s

IMAGE = "python:3.12-slim"  # mapped by the node agent's image table to this checkout's venv


def py(source: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(source)]


def pod_manifest(name: str, command: list[str], restart: str = "Never", **spec) -> dict:
    container = {"name": "main", "image": IMAGE, "command": command}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **spec.pop("metadata", {})},
            "spec": {"restartPolicy": restart, "containers": [container], **spec}}


def get_pod(kube, ns: str, name: str) -> dict:
    return kube.get(f"/api/v1/namespaces/{ns}/pods/{name}")


def wait_phase(kube, ns: str, name: str, phases=("Succeeded", "Failed"), timeout: float = 120) -> dict:
    return wait_for(lambda: (p := get_pod(kube, ns, name))["status"].get("phase") in phases and p,
                    timeout, f"pod {ns}/{name} in {phases}")


def headless_service(name: str, selector: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"clusterIP": "None", "selector": selector, "ports": [{"name": "x", "port": 1}]}}


def indexed_job(name: str, service: str, command: list[str], env: list | None = None) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"completions": 2, "parallelism": 2, "completionMode": "Indexed", "backoffLimit": 0,
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"subdomain": service, "restartPolicy": "Never",
                                           "containers": [{"name": "worker", "image": IMAGE,
                                                           "command": command, "env": env or []}]}}}}


def job_pods(kube, ns: str, job: str) -> list[dict]:
    pods = kube.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=f"job-name={job}")["items"]
    return sorted(pods, key=lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])


def wait_job_complete(kube, ns: str, job: str, timeout: float = 180) -> dict:
    def done():
        j = kube.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{job}")
        conds = {c["type"]: c["status"] for c in j.get("status", {}).get("conditions", [])}
        if conds.get("Failed") == "True":
            raise AssertionError(f"job failed: {j['status']}")
        return conds.get("Complete") == "True" and j
    return wait_for(done, timeout, f"job {ns}/{job} Complete")


def test_indexed_job_runs_both_pods_to_success(control_plane, node_agent, namespace):
    kube = control_plane.kube()
    ns = namespace
    kube.post(f"/api/v1/namespaces/{ns}/services", headless_service("workers", {"app": "train"}))
    job = indexed_job("train", "workers", py("""
        import os, socket
        print("index", os.environ["JOB_COMPLETION_INDEX"], "rank", os.environ["RANK"],
              "host", socket.gethostname(), "pod", os.environ["POD_NAME"])
    """), env=[{"name": "RANK", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
               {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}])
    kube.post(f"/apis/batch/v1/namespaces/{ns}/jobs", job)

    status = wait_job_complete(kube, ns, "train")["status"]
    assert status["succeeded"] == 2 and status.get("failed", 0) == 0
    assert status["completedIndexes"] == "0,1"
    pods = job_pods(kube, ns, "train")
    assert [p["status"]["phase"] for p in pods] == ["Succeeded", "Succeeded"]
    for index, pod in enumerate(pods):
        name = pod["metadata"]["name"]
        assert pod["spec"]["nodeName"] == node_agent.node_name
        term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert term["exitCode"] == 0 and term["reason"] == "Completed"
        assert node_agent.log(ns, name).split() == [
            "index", str(index), "rank", str(index), "host", f"train-{index}", "pod", name]


def test_pods_reach_each_other_by_headless_service_names(control_plane, node_agent, namespace):
    """Index 1 connects to index 0 by `<job>-0.<service>` (as torchrun's rendezvous will), and
    index 0 answers after resolving index 1's fully qualified name."""
    kube = control_plane.kube()
    ns = namespace
    port = free_port()
    kube.post(f"/api/v1/namespaces/{ns}/services", headless_service("mesh", {"app": "talk"}))
    job = indexed_job("talk", "mesh", py(f"""
        import os, socket, time
        index = int(os.environ["JOB_COMPLETION_INDEX"])
        ns = os.environ["NS"]
        if index == 0:
            srv = socket.create_server(("0.0.0.0", {port}))
            conn, _ = srv.accept()
            msg = conn.recv(100).decode()
            peer = socket.gethostbyname(f"talk-1.mesh.{{ns}}.svc.cluster.local")
            conn.sendall(f"hello {{msg}} from talk-0, you are at {{peer}}".encode())
            print("served", msg)
        else:
            deadline = time.time() + 60
            while True:
                try:
                    sock = socket.create_connection(("talk-0.mesh", {port}), timeout=2)
                    break
                except OSError as e:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.2)
            sock.sendall(b"talk-1")
            print("reply:", sock.recv(200).decode())
    """), env=[{"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}])
    job["spec"]["template"]["metadata"]["labels"]["app"] = "talk"
    kube.post(f"/apis/batch/v1/namespaces/{ns}/jobs", job)

    wait_job_complete(kube, ns, "talk")
    pods = job_pods(kube, ns, "talk")
    assert node_agent.log(ns, pods[0]["metadata"]["name"]).strip() == "served talk-1"
    assert node_agent.log(ns, pods[1]["metadata"]["name"]).strip() == \
        "reply: hello talk-1 from talk-0, you are at 127.0.0.1"


def test_the_pods_of_each_job_get_a_rendezvous_port_of_their_own(control_plane, node_agent, namespace):
    """Every TrainJob's workers rendezvous on the operator's one PET_MASTER_PORT, which in a
    cluster is each pod's own; here all pods share the loopback, so the agent gives each Job's
    pods one of their own (a preempted job's torchrun still holding the port once took in the
    next job's agents)."""
    kube = control_plane.kube()
    ns = namespace
    env = [{"name": "PET_MASTER_PORT", "value": "29500"}]
    show = py("import os; print(os.environ['PET_MASTER_PORT'])")
    for name in ("one", "two"):
        kube.post(f"/api/v1/namespaces/{ns}/services", headless_service(f"{name}-workers", {"app": name}))
        kube.post(f"/apis/batch/v1/namespaces/{ns}/jobs", indexed_job(name, f"{name}-workers", show, env=env))
    kube.post(f"/api/v1/namespaces/{ns}/pods", pod_manifest("alone", show, container={"env": env}))
    ports = {}
    for name in ("one", "two"):
        wait_job_complete(kube, ns, name)
        ports[name] = {node_agent.log(ns, p["metadata"]["name"]).strip() for p in job_pods(kube, ns, name)}
    assert len(ports["one"]) == len(ports["two"]) == 1 and ports["one"] != ports["two"], ports
    assert "29500" not in ports["one"] | ports["two"], ports
    wait_phase(kube, ns, "alone", ("Succeeded",))
    assert node_agent.log(ns, "alone").strip() == "29500"  # no Job, no other job to meet


def test_pod_gets_env_volumes_and_workdir_like_a_kubelet_gives(control_plane, node_agent, namespace):
    kube = control_plane.kube()
    ns = namespace
    kube.post(f"/api/v1/namespaces/{ns}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
        "data": {"mode": "fast", "settings.yaml": "a: 1\n"}})
    kube.post(f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
        "stringData": {"AWS_ACCESS_KEY_ID": "AKIA-TEST", "token": "s3cret"}})
    node_agent.pvc_path(ns, "data").joinpath("input.txt").write_text("from the claim")
    pod = pod_manifest("features", py("""
        import json, os, pathlib
        pathlib.Path("/mnt/data/written.txt").write_text("written by the pod")
        pathlib.Path("/scratch/x").write_text("scratch")
        pathlib.Path("/dev/termination-log").write_text("finished fine")
        env = {k: os.environ.get(k) for k in ("MODE", "TOKEN", "AWS_ACCESS_KEY_ID", "CFG_mode",
               "POD_IP", "LABEL", "ANNOT", "GREETING", "KUBERNETES_SERVICE_HOST")}
        print(json.dumps({"env": env, "cwd": os.getcwd(),
            "cfg": open("/etc/cfg/settings.yaml").read(), "secret": open("/etc/creds/token").read(),
            "claim": open("/mnt/data/input.txt").read(), "labels": open("/etc/podinfo/labels").read(),
            "scratch": open("/scratch/x").read()}))
    """), metadata={"labels": {"team": "search"}, "annotations": {"note": "hi"}},
        container={
            "workingDir": "/scratch",
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}, {"secretRef": {"name": "creds"}}],
            "env": [
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}},
                {"name": "ANNOT", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
                {"name": "GREETING", "value": "mode=$(MODE) kept=$$(MODE)"}],
            "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"},
                             {"name": "creds", "mountPath": "/etc/creds"},
                             {"name": "data", "mountPath": "/mnt/data"},
                             {"name": "scratch", "mountPath": "/scratch"},
                             {"name": "podinfo", "mountPath": "/etc/podinfo"}]},
        volumes=[{"name": "cfg", "configMap": {"name": "cfg"}},
                 {"name": "creds", "secret": {"secretName": "creds"}},
                 {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                 {"name": "scratch", "emptyDir": {}},
                 {"name": "podinfo", "downwardAPI": {"items": [
                     {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}])
    kube.post(f"/api/v1/namespaces/{ns}/pods", pod)

    done = wait_phase(kube, ns, "features")
    assert done["status"]["phase"] == "Succeeded", node_agent.log(ns, "features")
    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "finished fine"
    report = json.loads(node_agent.log(ns, "features"))
    assert report["env"] == {"MODE": "fast", "TOKEN": "s3cret", "AWS_ACCESS_KEY_ID": "AKIA-TEST",
                             "CFG_mode": "fast", "POD_IP": "127.0.0.1", "LABEL": "search", "ANNOT": "hi",
                             "GREETING": "mode=fast kept=$(MODE)", "KUBERNETES_SERVICE_HOST": "127.0.0.1"}
    assert report["cwd"] == "/scratch"
    assert report["cfg"] == "a: 1\n" and report["secret"] == "s3cret"
    assert report["claim"] == "from the claim" and report["scratch"] == "scratch"
    assert report["labels"] == 'team="search"'
    assert (node_agent.pvc_path(ns, "data") / "written.txt").read_text() == "written by the pod"


def test_pod_waits_for_a_missing_configmap(control_plane, node_agent, namespace):
    kube = control_plane.kube()
    ns = namespace
    pod = pod_manifest("waits", py("import os; print(os.environ['V'])"), container={
        "env": [{"name": "V", "valueFrom": {"configMapKeyRef": {"name": "late", "key": "v"}}}]})
    kube.post(f"/api/v1/namespaces/{ns}/pods", pod)
    waiting = wait_for(lambda: (s := get_pod(kube, ns, "waits")["status"].get("containerStatuses"))
                       and "waiting" in s[0]["state"] and s[0]["state"]["waiting"], 60, "waiting state")
    assert waiting["reason"] == "CreateContainerConfigError"
    assert get_pod(kube, ns, "waits")["status"]["phase"] == "Pending"
    kube.post(f"/api/v1/namespaces/{ns}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "late"}, "data": {"v": "arrived"}})
    assert wait_phase(kube, ns, "waits")["status"]["phase"] == "Succeeded"
    assert node_agent.log(ns, "waits").strip() == "arrived"


def test_service_account_token_works_in_cluster_under_rbac(control_plane, node_agent, namespace):
    kube = control_plane.kube()
    ns = namespace
    kube.post(f"/api/v1/namespaces/{ns}/serviceaccounts",
              {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner"}})
    kube.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "read-pods"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]})
    kube.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "runner"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-pods"},
        "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": ns}]})
    pod = pod_manifest("incluster", py("""
        import os
        from kubernetes import client, config
        from kubernetes.client.rest import ApiException
        config.load_incluster_config()
        v1 = client.CoreV1Api()
        ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
        me = v1.read_namespaced_pod(os.environ["HOSTNAME"], ns)
        print("read", me.metadata.name, me.spec.service_account_name)
        try:
            v1.list_namespaced_secret(ns)
            print("secrets readable")
        except ApiException as e:
            print("secrets", e.status)
    """), serviceAccountName="runner")
    kube.post(f"/api/v1/namespaces/{ns}/pods", pod)
    done = wait_phase(kube, ns, "incluster")
    out = node_agent.log(ns, "incluster")
    assert done["status"]["phase"] == "Succeeded", out
    assert out.split("\n")[:2] == ["read incluster runner", "secrets 403"]

    no_token = pod_manifest("notoken", py("""
        import os
        print(os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"))
    """), automountServiceAccountToken=False)
    kube.post(f"/api/v1/namespaces/{ns}/pods", no_token)
    assert wait_phase(kube, ns, "notoken")["status"]["phase"] == "Succeeded"
    assert node_agent.log(ns, "notoken").strip() == "False"


def test_on_failure_restarts_the_container_and_counts_it(control_plane, node_agent, namespace):
    kube = control_plane.kube()
    ns = namespace
    pod = pod_manifest("flaky", py("""
        import os, sys
        runs = int(open("/state/runs").read()) if os.path.exists("/state/runs") else 0
        open("/state/runs", "w").write(str(runs + 1))
        print("run", runs)
        sys.exit(3 if runs == 0 else 0)
    """), restart="OnFailure", container={"volumeMounts": [{"name": "state", "mountPath": "/state"}]},
        volumes=[{"name": "state", "emptyDir": {}}])
    kube.post(f"/api/v1/namespaces/{ns}/pods", pod)
    done = wait_phase(kube, ns, "flaky")
    cs = done["status"]["containerStatuses"][0]
    assert done["status"]["phase"] == "Succeeded"
    assert cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 3
    assert cs["state"]["terminated"]["exitCode"] == 0
    assert node_agent.log(ns, "flaky").strip() == "run 1"
    assert node_agent.log(ns, "flaky", previous=True).strip() == "run 0"


def test_killed_pod_fails_with_exit_code_137(control_plane, node_agent, namespace):
    kube = control_plane.kube()
    ns = namespace
    kube.post(f"/api/v1/namespaces/{ns}/pods", pod_manifest("victim", py("""
        import time
        print("up", flush=True)
        time.sleep(600)
    """)))
    wait_for(lambda: node_agent.log(ns, "victim").startswith("up"), 60, "victim running")
    assert get_pod(kube, ns, "victim")["status"]["phase"] == "Running"
    node_agent.kill_pod(ns, "victim")
    done = wait_phase(kube, ns, "victim")
    assert done["status"]["phase"] == "Failed"
    term = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 137 and term["reason"] == "Error"
    assert not any(c["type"] == "DisruptionTarget" for c in done["status"]["conditions"])


def test_deleting_a_running_pod_stops_its_process_and_finishes_the_deletion(control_plane, node_agent, namespace):
    kube = control_plane.kube()
    ns = namespace
    kube.post(f"/api/v1/namespaces/{ns}/pods", pod_manifest("stopper", py("""
        import signal, sys, time
        def term(*_):
            print("got SIGTERM", flush=True)
            sys.exit(143)
        signal.signal(signal.SIGTERM, term)
        print("up", flush=True)
        time.sleep(600)
    """)))
    wait_for(lambda: node_agent.log(ns, "stopper").startswith("up"), 60, "stopper running")
    worker = node_agent.worker(ns, "stopper")
    kube.request("DELETE", f"/api/v1/namespaces/{ns}/pods/stopper", {"gracePeriodSeconds": 20})

    def gone():
        try:
            get_pod(kube, ns, "stopper")
            return False
        except ApiError as e:
            return e.status == 404
    wait_for(gone, 60, "pod deleted")
    assert "got SIGTERM" in node_agent.log(ns, "stopper")
    assert worker.containers[0].proc.poll() is not None


def test_deleting_a_job_garbage_collects_its_pods(control_plane, node_agent, namespace):
    kube = control_plane.kube()
    ns = namespace
    kube.post(f"/apis/batch/v1/namespaces/{ns}/jobs", {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "sleeper"},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "main", "image": IMAGE, "command": py("import time; print('up', flush=True); time.sleep(600)")}]}}}})
    pod = wait_for(lambda: (items := kube.get(f"/api/v1/namespaces/{ns}/pods",
                                              labelSelector="job-name=sleeper")["items"])
                   and items[0]["status"].get("phase") == "Running" and items[0], 60, "sleeper pod running")
    name = pod["metadata"]["name"]
    worker = node_agent.worker(ns, name)
    kube.request("DELETE", f"/apis/batch/v1/namespaces/{ns}/jobs/sleeper",
                 {"propagationPolicy": "Background", "gracePeriodSeconds": 0})
    wait_for(lambda: not kube.get(f"/api/v1/namespaces/{ns}/pods", labelSelector="job-name=sleeper")["items"],
             90, "job's pods garbage-collected")
    assert worker.containers[0].proc.poll() is not None
