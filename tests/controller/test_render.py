"""render.py: TrainJob -> child manifests (pure)."""

from __future__ import annotations

import copy

import yaml

from kontrast import contract
from kontrast.operator import render
from kontrast.operator.config import OperatorConfig

CONFIG = OperatorConfig(trainer_image="registry.example/kontrast-trainer:1", shm_size="1Gi")


def trainjob(**spec_overrides):
    spec = {
        "leftKeys": ["query"], "leftWeights": [1.0],
        "rightKeys": ["image", "title"], "rightWeights": [1.0, 0.5],
        "weightKey": "score",
        "model": "pvc://models/tiny.json",
        "trainData": "pvc://data/train.csv",
        "evalData": "pvc://data/eval.csv",
        "output": "pvc://runs/exp1",
        "nodes": 2, "procsPerNode": 4,
        "scheduling": {"maxRestarts": 3, "suspend": False, "cleanup": "OnSuccess"},
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "kontrast.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {
            "name": "clip", "namespace": "ml", "uid": "uid-1", "generation": 1,
            "labels": {"app.kubernetes.io/instance": "argo-app", "team": "search"},
            "annotations": {"argocd.argoproj.io/tracking-id": "x"},
        },
        "spec": spec,
    }


def by_kind(objs):
    return {o["kind"]: o for o in objs}


def test_children_kinds_names_and_ownership():
    tj = trainjob()
    objs = render.children(tj, attempt=0, restarts=0, config=CONFIG)
    assert render.kinds(objs) == ["ServiceAccount", "Role", "RoleBinding", "Service", "ConfigMap", "Job"]
    names = {o["kind"]: o["metadata"]["name"] for o in objs}
    assert names == {"ServiceAccount": "clip-trainer", "Role": "clip-trainer", "RoleBinding": "clip-trainer",
                     "Service": "clip-workers", "ConfigMap": "clip-trainjob", "Job": "clip-0"}
    for o in objs:
        assert o["metadata"]["namespace"] == "ml"
        assert o["metadata"]["ownerReferences"] == [{
            "apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob", "name": "clip", "uid": "uid-1",
            "controller": True, "blockOwnerDeletion": True}]


def test_children_are_deterministic():
    tj = trainjob()
    assert render.children(tj, 3, 1, CONFIG) == render.children(copy.deepcopy(tj), 3, 1, CONFIG)


def test_parent_labels_and_annotations_never_leak():
    objs = render.children(trainjob(), 0, 0, CONFIG)
    job = by_kind(objs)["Job"]
    for meta in [o["metadata"] for o in objs] + [job["spec"]["template"]["metadata"]]:
        for key in meta.get("labels", {}):
            assert key.startswith("kontrast.dev/"), key
        for key in meta.get("annotations", {}):
            assert key.startswith("kontrast.dev/"), key


def test_role_allows_only_this_jobs_status():
    role = by_kind(render.children(trainjob(), 0, 0, CONFIG))["Role"]
    assert role["rules"] == [{"apiGroups": ["kontrast.dev"], "resources": ["trainjobs/status"],
                              "resourceNames": ["clip"], "verbs": ["get", "patch"]}]
    binding = by_kind(render.children(trainjob(), 0, 0, CONFIG))["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "clip-trainer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "clip-trainer", "namespace": "ml"}]


def test_headless_service_publishes_not_ready_pods():
    svc = by_kind(render.children(trainjob(), 0, 0, CONFIG))["Service"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"kontrast.dev/trainjob": "clip", "kontrast.dev/component": "worker"}


def test_configmap_holds_the_spec_unchanged():
    tj = trainjob()
    cm = by_kind(render.children(tj, 0, 0, CONFIG))["ConfigMap"]
    doc = yaml.safe_load(cm["data"][contract.TRAINJOB_FILE])
    assert doc == {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
                   "metadata": {"name": "clip", "namespace": "ml"}, "spec": tj["spec"]}


def test_indexed_job_gang_and_failure_policy():
    job = render.worker_job(trainjob(), attempt=2, restarts=1, config=CONFIG, reason="PodFailed")
    spec = job["spec"]
    assert job["metadata"]["name"] == "clip-2"
    assert job["metadata"]["labels"]["kontrast.dev/attempt"] == "2"
    assert job["metadata"]["annotations"][render.ANNOTATION_RESTARTS] == "1"
    assert job["metadata"]["annotations"][render.ANNOTATION_REASON] == "PodFailed"
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0
    assert spec["suspend"] is False
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                              "values": [contract.EXIT_PERMANENT]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == "clip-workers"
    assert pod["serviceAccountName"] == "clip-trainer"
    assert spec["template"]["metadata"]["labels"] == {
        "kontrast.dev/trainjob": "clip", "kontrast.dev/component": "worker", "kontrast.dev/attempt": "2"}


def test_trainer_container_runs_launch_with_torchrun_env():
    job = render.worker_job(trainjob(), attempt=2, restarts=0, config=CONFIG)
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["name"] == "trainer"
    assert c["image"] == "registry.example/kontrast-trainer:1"
    assert c["command"] == ["kontrast", "launch", "/etc/kontrast/trainjob.yaml"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["PET_NNODES"] == "2"
    assert env["PET_NPROC_PER_NODE"] == "4"
    assert env["PET_NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env["PET_MASTER_ADDR"] == "clip-2-0.clip-workers"
    assert env["PET_MASTER_PORT"] == "29500"
    assert env[contract.JOB_NAME_ENV] == "clip"
    assert env[contract.JOB_NAMESPACE_ENV] == "ml"
    assert env[contract.TERMINATION_LOG_ENV] == contract.TERMINATION_LOG
    assert c["terminationMessagePath"] == contract.TERMINATION_LOG
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_pvc_volumes_for_every_pvc_uri():
    pod = render.worker_job(trainjob(), 0, 0, CONFIG)["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims) == {"models", "data", "runs"}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    for claim, vol in claims.items():
        assert mounts[vol] == f"{contract.PVC_ROOT_DEFAULT}/{claim}"
    assert mounts["trainjob"] == contract.TRAINJOB_MOUNT_DIR
    assert mounts["dshm"] == "/dev/shm"


def test_no_pvc_volumes_for_object_store_uris():
    tj = trainjob(model="ViT-B-32", trainData="s3://b/train.csv", evalData="s3://b/eval.csv", output="s3://b/out",
                  storageSecretRef={"name": "s3-creds"})
    pod = render.worker_job(tj, 0, 0, CONFIG)["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]


def test_scheduling_fields_reach_the_pod():
    sched = {
        "image": "my/trainer:dev", "imagePullPolicy": "Always",
        "resources": {"limits": {"nvidia.com/gpu": 4, "memory": "64Gi"}},
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "training",
    }
    pod = render.worker_job(trainjob(scheduling=sched), 0, 0, CONFIG)["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "my/trainer:dev"
    assert c["imagePullPolicy"] == "Always"
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 4, "memory": "64Gi"}}
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == sched["tolerations"]
    assert pod["priorityClassName"] == "training"


def test_operator_defaults_apply_when_scheduling_is_silent():
    cfg = OperatorConfig(default_resources={"requests": {"cpu": "2"}}, default_node_selector={"pool": "train"},
                         default_priority_class="batch", image_pull_secrets=("regcred",), shm_size="")
    pod = render.worker_job(trainjob(), 0, 0, cfg)["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "2"}}
    assert pod["nodeSelector"] == {"pool": "train"}
    assert pod["priorityClassName"] == "batch"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert not [v for v in pod["volumes"] if v["name"] == "dshm"]


def test_kueue_queue_label_and_suspended_job():
    job = render.worker_job(trainjob(scheduling={"queueName": "team-a"}), 0, 0, CONFIG)
    assert job["metadata"]["labels"][render.KUEUE_QUEUE_LABEL] == "team-a"
    assert job["spec"]["suspend"] is True


def test_kueue_pod_set_and_priority_class():
    """Kueue reads one pod set of `nodes` pods (parallelism = completions) with the per-pod
    requests, and the WorkloadPriorityClass from the Job's label: the TrainJob's own label is
    passed through, no other TrainJob label is."""
    tj = trainjob(scheduling={"queueName": "team-a", "resources": {"requests": {"cpu": "4", "nvidia.com/gpu": 4},
                                                                    "limits": {"nvidia.com/gpu": 4}}})
    tj["metadata"]["labels"][render.KUEUE_PRIORITY_LABEL] = "urgent"
    job = render.worker_job(tj, 0, 0, CONFIG)
    assert job["metadata"]["labels"][render.KUEUE_PRIORITY_LABEL] == "urgent"
    assert "team" not in job["metadata"]["labels"]
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 2
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == {"cpu": "4", "nvidia.com/gpu": 4}
    plain = render.worker_job(trainjob(scheduling={"queueName": "team-a"}), 0, 0, CONFIG)
    assert render.KUEUE_PRIORITY_LABEL not in plain["metadata"]["labels"]


def test_long_and_odd_names_stay_valid_and_distinct():
    long_a = "a" * 200 + ".x"
    long_b = "a" * 200 + ".y"
    for name in (long_a, long_b, "9lives", "with.dots"):
        tj = trainjob(nodes=1000)
        tj["metadata"]["name"] = name
        for o in render.children(tj, 12, 0, CONFIG):
            n = o["metadata"]["name"]
            assert len(n) <= 63 and n[0].isalpha() and "." not in n, n
            assert len(o["metadata"]["labels"][render.LABEL_TRAINJOB]) <= 63
        job = render.job_name(name, 12, 1000)
        assert len(f"{job}-999") <= 63
    assert render.job_name(long_a, 0) != render.job_name(long_b, 0)
    assert render.service_name("9lives") == "tj-9lives-workers"
    assert render.service_name("with.dots") == "with-dots-workers"


def test_config_from_env():
    cfg = OperatorConfig.from_env({
        "KONTRAST_TRAINER_IMAGE": "img:2",
        "KONTRAST_POD_DEFAULTS": '{"nodeSelector": {"a": "b"}, "shmSize": "4Gi"}',
        "KONTRAST_WATCH_NAMESPACES": "ml, research",
    })
    assert cfg.trainer_image == "img:2"
    assert cfg.default_node_selector == {"a": "b"}
    assert cfg.shm_size == "4Gi"
    assert cfg.watch_namespaces == ("ml", "research")


def test_held_attempt_starts_suspended():
    assert render.worker_job(trainjob(), 1, 0, CONFIG, hold=True)["spec"]["suspend"] is True
    assert render.worker_job(trainjob(), 1, 0, CONFIG, hold=False)["spec"]["suspend"] is False
