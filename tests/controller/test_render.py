"""children/: TrainJob -> child manifests (pure)."""

from __future__ import annotations

import copy
import json

import yaml

from kontrast import contract
from kontrast.operator.children.job import children, worker_job
from kontrast.operator.children.names import (ANNOTATION_HOLD, ANNOTATION_PARKED_FOR, ANNOTATION_QUEUE, ANNOTATION_REASON,
                                              ANNOTATION_RESTARTS, ANNOTATION_TRAINJOB, KUEUE_PRIORITY_LABEL,
                                              KUEUE_QUEUE_LABEL, LABEL_TRAINJOB, PARKING_QUEUE, job_name,
                                              service_name)
from kontrast.operator.children.pod import STORAGE_SECRET_KEYS
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
    objs = children(tj, attempt=0, restarts=0, config=CONFIG)
    assert [o["kind"] for o in objs] == ["ServiceAccount", "Role", "RoleBinding", "Service", "ConfigMap", "Job"]
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
    assert children(tj, 3, 1, CONFIG) == children(copy.deepcopy(tj), 3, 1, CONFIG)


def test_parent_labels_and_annotations_never_leak():
    objs = children(trainjob(), 0, 0, CONFIG)
    job = by_kind(objs)["Job"]
    for meta in [o["metadata"] for o in objs] + [job["spec"]["template"]["metadata"]]:
        for key in meta.get("labels", {}):
            assert key.startswith("kontrast.dev/"), key
        for key in meta.get("annotations", {}):
            assert key.startswith("kontrast.dev/"), key


def test_role_allows_only_this_jobs_status():
    role = by_kind(children(trainjob(), 0, 0, CONFIG))["Role"]
    assert role["rules"] == [{"apiGroups": ["kontrast.dev"], "resources": ["trainjobs/status"],
                              "resourceNames": ["clip"], "verbs": ["get", "patch"]}]
    binding = by_kind(children(trainjob(), 0, 0, CONFIG))["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "clip-trainer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "clip-trainer", "namespace": "ml"}]


def test_headless_service_publishes_not_ready_pods():
    svc = by_kind(children(trainjob(), 0, 0, CONFIG))["Service"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"kontrast.dev/trainjob": "clip", "kontrast.dev/component": "worker"}


def test_configmap_holds_the_spec_unchanged_the_uid_and_kontrasts_annotations():
    """The trainer's run identity needs the uid; `kontrast.dev/generate-example-data` the annotation."""
    tj = trainjob()
    tj["metadata"]["annotations"] = {"kontrast.dev/generate-example-data": "true",
                                     "kubectl.kubernetes.io/last-applied-configuration": "{...}"}
    cm = by_kind(children(tj, 0, 0, CONFIG))["ConfigMap"]
    doc = yaml.safe_load(cm["data"][contract.TRAINJOB_FILE])
    assert doc == {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
                   "metadata": {"name": "clip", "namespace": "ml", "uid": tj["metadata"]["uid"],
                                "annotations": {"kontrast.dev/generate-example-data": "true"}},
                   "spec": tj["spec"]}


def test_indexed_job_gang_and_failure_policy():
    job = worker_job(trainjob(), attempt=2, restarts=1, config=CONFIG, reason="PodFailed")
    spec = job["spec"]
    assert job["metadata"]["name"] == "clip-2"
    assert job["metadata"]["labels"]["kontrast.dev/attempt"] == "2"
    assert job["metadata"]["annotations"][ANNOTATION_RESTARTS] == "1"
    assert job["metadata"]["annotations"][ANNOTATION_REASON] == "PodFailed"
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
    job = worker_job(trainjob(), attempt=2, restarts=0, config=CONFIG)
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
    assert env[contract.JOB_UID_ENV] == job["metadata"]["ownerReferences"][0]["uid"]
    assert env[contract.TERMINATION_LOG_ENV] == contract.TERMINATION_LOG
    assert c["terminationMessagePath"] == contract.TERMINATION_LOG


def test_trainer_pod_meets_pod_security_restricted():
    """The checks of the "restricted" Pod Security Standard that concern a pod we render
    (the API server's PodSecurity admission runs them for real in tests/e2e)."""
    pod = worker_job(trainjob(), 0, 0, OperatorConfig())["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # the trainer image's numeric user, so runAsNonRoot holds for any image built from it
    assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["fsGroup"] == 1000
    allowed = {"configMap", "emptyDir", "persistentVolumeClaim", "projected", "secret", "downwardAPI"}
    for vol in pod["volumes"]:
        assert set(vol) - {"name"} <= allowed, vol
    assert not any(p.get("hostPort") for p in c["ports"])
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(field)
    # an admin who empties podSecurityContext cannot lose the container-level guarantees
    pod = worker_job(trainjob(), 0, 0, OperatorConfig(pod_security_context={}))["spec"]["template"]["spec"]
    assert "securityContext" not in pod
    assert pod["containers"][0]["securityContext"]["runAsNonRoot"] is True


def test_pvc_volumes_for_every_pvc_uri():
    pod = worker_job(trainjob(), 0, 0, CONFIG)["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims) == {"models", "data", "runs"}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    for claim, vol in claims.items():
        assert mounts[vol] == f"{contract.PVC_ROOT_DEFAULT}/{claim}"
    assert mounts["trainjob"] == contract.TRAINJOB_MOUNT_DIR
    assert mounts["dshm"] == "/dev/shm"


def test_a_corpus_on_its_own_claim_is_mounted():
    pod = worker_job(trainjob(corpusData="pvc://catalogue/documents.jsonl"), 0, 0, CONFIG)
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert "catalogue" in claims


def test_eval_sets_on_their_own_claims_are_mounted():
    sets = [{"name": "in-domain", "data": "pvc://splits/eval_in_domain.csv"},
            {"name": "zero-shot", "data": "pvc://splits/eval_zero_shot.csv", "corpus": "pvc://catalogue/docs.jsonl"}]
    pod = worker_job(trainjob(evalData=None, evalSets=sets), 0, 0, CONFIG)
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {"models", "data", "runs", "splits", "catalogue"}


def test_the_chart_cache_volume_serves_a_trainjob_without_its_own_cache():
    pod = job_pod(trainjob())["spec"]
    (c,) = pod["containers"]
    assert {"name": "cache", "emptyDir": {}} in pod["volumes"]
    assert {"name": "cache", "mountPath": contract.CACHE_MOUNT} in c["volumeMounts"]
    assert {"name": contract.CACHE_ENV, "value": contract.CACHE_MOUNT} in c["env"]
    # a platform's node-wide cache (kept across pods and jobs)
    host = {"hostPath": {"path": "/var/cache/kontrast", "type": "DirectoryOrCreate"}}
    cfg = OperatorConfig.from_env({"KONTRAST_POD_DEFAULTS": json.dumps({"cacheVolume": host})})
    assert {"name": "cache", **host} in job_pod(trainjob(), cfg)["spec"]["volumes"]
    # a TrainJob's own cache folder (here on a claim) replaces it; {} turns the volume off
    for pod in (job_pod(trainjob(data={"cache": "pvc://scratch/cache"}))["spec"],
                job_pod(trainjob(), OperatorConfig(cache_volume={}))["spec"]):
        assert not [v for v in pod["volumes"] if v["name"] == "cache"]
        assert contract.CACHE_ENV not in {e["name"] for e in pod["containers"][0]["env"]}
    claims = [v["persistentVolumeClaim"]["claimName"] for v in
              job_pod(trainjob(data={"cache": "pvc://scratch/cache"}))["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert "scratch" in claims


def test_a_cache_volume_of_two_sources_is_an_error_naming_it():
    import pytest

    with pytest.raises(ValueError, match="cacheVolume must be one volume source"):
        OperatorConfig.from_env({"KONTRAST_POD_DEFAULTS": '{"cacheVolume": {"emptyDir": {}, "hostPath": {"path": "/x"}}}'})


def secret_env(pod):
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["containers"][0]["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_storage_secret_passes_only_the_s3_variables():
    tj = trainjob(model="ViT-B-32", trainData="s3://b/train.csv", evalData="s3://b/eval.csv", output="s3://b/out",
                  storageSecretRef={"name": "s3-creds"})
    pod = worker_job(tj, 0, 0, CONFIG)["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert "envFrom" not in pod["containers"][0]  # never the whole Secret
    refs = secret_env(pod)
    assert set(refs) == set(STORAGE_SECRET_KEYS["s3"])
    assert all(r == {"name": "s3-creds", "key": k, "optional": True} for k, r in refs.items())


def test_storage_secret_with_keys_passes_exactly_those():
    tj = trainjob(output="s3://b/out", storageSecretRef={"name": "creds", "keys": ["AWS_ACCESS_KEY_ID", "MY_TOKEN"]})
    refs = secret_env(worker_job(tj, 0, 0, CONFIG)["spec"]["template"]["spec"])
    assert refs == {"AWS_ACCESS_KEY_ID": {"name": "creds", "key": "AWS_ACCESS_KEY_ID", "optional": False},
                    "MY_TOKEN": {"name": "creds", "key": "MY_TOKEN", "optional": False}}


def test_storage_secret_for_pvc_only_uris_passes_nothing():
    pod = worker_job(trainjob(storageSecretRef={"name": "creds"}), 0, 0, CONFIG)["spec"]["template"]["spec"]
    assert secret_env(pod) == {}


def test_mlflow_credentials_pass_only_the_clients_variables():
    tracking = {"mlflow": {"uri": "https://mlflow.example.com", "credentialsSecretRef": {"name": "mlflow-token"}}}
    pod = worker_job(trainjob(tracking=tracking), 0, 0, CONFIG)["spec"]["template"]["spec"]
    assert "envFrom" not in pod["containers"][0]  # never the whole Secret
    assert secret_env(pod) == {k: {"name": "mlflow-token", "key": k, "optional": True}
                               for k in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    no_secret = {"mlflow": {"uri": "http://mlflow:5000"}}
    assert secret_env(worker_job(trainjob(tracking=no_secret), 0, 0, CONFIG)["spec"]["template"]["spec"]) == {}


def test_scheduling_fields_reach_the_pod():
    sched = {
        "image": "my/trainer:dev", "imagePullPolicy": "Always",
        "resources": {"limits": {"nvidia.com/gpu": 4, "memory": "64Gi"}},
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "training",
    }
    pod = worker_job(trainjob(scheduling=sched), 0, 0, CONFIG)["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "my/trainer:dev"
    assert c["imagePullPolicy"] == "Always"
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 4, "memory": "64Gi"}}
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == sched["tolerations"]
    assert pod["priorityClassName"] == "training"


ZONE_SPREAD = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
NODE_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}}
POD_SETTINGS = {
    "affinity": NODE_AFFINITY,
    "topologySpreadConstraints": [ZONE_SPREAD],
    "podLabels": {"team": "search", "cost-center": "42"},
    "podAnnotations": {"sidecar.istio.io/inject": "false"},
    "env": [{"name": "NCCL_DEBUG", "value": "INFO"},
            {"name": "NCCL_IB_HCA", "valueFrom": {"configMapKeyRef": {"name": "nccl", "key": "hca"}}}],
    "imagePullSecrets": [{"name": "regcred"}],
    "terminationGracePeriodSeconds": 600,
    "schedulerName": "volcano",
    "priorityClassName": "training",
}


def job_pod(tj, config=CONFIG, attempt=0):
    return worker_job(tj, attempt, 0, config)["spec"]["template"]


def test_pod_settings_from_the_trainjob_reach_the_pod():
    template = job_pod(trainjob(scheduling=POD_SETTINGS), attempt=3)
    pod, meta = template["spec"], template["metadata"]
    assert pod["affinity"] == NODE_AFFINITY
    # a constraint without labelSelector spreads this attempt's pods
    assert pod["topologySpreadConstraints"] == [{**ZONE_SPREAD, "labelSelector": {"matchLabels": {
        "kontrast.dev/trainjob": "clip", "kontrast.dev/component": "worker", "kontrast.dev/attempt": "3"}}}]
    assert meta["labels"]["team"] == "search" and meta["labels"]["kontrast.dev/attempt"] == "3"
    assert meta["annotations"] == {"sidecar.istio.io/inject": "false", ANNOTATION_TRAINJOB: "clip"}
    env = pod["containers"][0]["env"]
    assert env[-2:] == POD_SETTINGS["env"]  # after the launcher's own variables
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["terminationGracePeriodSeconds"] == 600
    assert pod["schedulerName"] == "volcano" and pod["priorityClassName"] == "training"


def test_a_spread_constraint_with_its_own_selector_is_kept():
    own = {**ZONE_SPREAD, "labelSelector": {"matchLabels": {"app": "x"}}}
    pod = job_pod(trainjob(scheduling={"topologySpreadConstraints": [own]}))["spec"]
    assert pod["topologySpreadConstraints"] == [own]


def test_chart_defaults_apply_when_scheduling_is_silent():
    cfg = OperatorConfig(defaults={**POD_SETTINGS, "resources": {"requests": {"cpu": "2"}},
                                   "nodeSelector": {"pool": "train"}}, shm_size="")
    template = job_pod(trainjob(), cfg)
    pod = template["spec"]
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "2"}}
    assert pod["nodeSelector"] == {"pool": "train"}
    assert pod["priorityClassName"] == "training" and pod["schedulerName"] == "volcano"
    assert pod["affinity"] == NODE_AFFINITY and pod["terminationGracePeriodSeconds"] == 600
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert template["metadata"]["labels"]["team"] == "search"
    assert pod["containers"][0]["env"][-2:] == POD_SETTINGS["env"]
    assert not [v for v in pod["volumes"] if v["name"] == "dshm"]


def test_builtin_grace_period_leaves_time_for_the_sigterm_checkpoint():
    assert job_pod(trainjob())["spec"]["terminationGracePeriodSeconds"] == 120


def test_trainjob_settings_replace_or_merge_over_chart_defaults():
    cfg = OperatorConfig(defaults={"tolerations": [{"key": "a", "operator": "Exists"}], "nodeSelector": {"pool": "x"},
                                   "podLabels": {"team": "platform", "tier": "batch"},
                                   "env": [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "A", "value": "1"}],
                                   "terminationGracePeriodSeconds": 120})
    own = {"tolerations": [{"key": "b", "operator": "Exists"}], "nodeSelector": {"zone": "z"},
           "podLabels": {"team": "search"}, "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
           "terminationGracePeriodSeconds": 30}
    template = job_pod(trainjob(scheduling=own), cfg)
    pod = template["spec"]
    assert pod["tolerations"] == own["tolerations"]            # lists are replaced
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["nodeSelector"] == {"pool": "x", "zone": "z"}   # maps merge, the TrainJob wins
    assert template["metadata"]["labels"]["team"] == "search"
    assert template["metadata"]["labels"]["tier"] == "batch"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["A"] == "1"
    assert [e["name"] for e in pod["containers"][0]["env"]].count("NCCL_DEBUG") == 1


def test_enforced_settings_win_over_the_trainjob():
    forced_tol = [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    cfg = OperatorConfig(enforced={"tolerations": forced_tol, "nodeSelector": {"pool": "ml"},
                                   "priorityClassName": "ml-batch", "podLabels": {"billing": "ml"}})
    own = {"tolerations": [{"key": "gpu", "operator": "Exists"}], "nodeSelector": {"pool": "prod", "zone": "a"},
           "priorityClassName": "system-cluster-critical", "podLabels": {"billing": "free", "team": "x"}}
    template = job_pod(trainjob(scheduling=own), cfg)
    pod = template["spec"]
    assert pod["tolerations"] == forced_tol
    assert pod["nodeSelector"] == {"pool": "ml", "zone": "a"}
    assert pod["priorityClassName"] == "ml-batch"
    assert template["metadata"]["labels"]["billing"] == "ml" and template["metadata"]["labels"]["team"] == "x"


def test_kontrast_labels_and_annotations_cannot_be_overridden():
    cfg = OperatorConfig(defaults={"podLabels": {"kontrast.dev/attempt": "9"},
                                   "podAnnotations": {ANNOTATION_TRAINJOB: "other"}})
    meta = job_pod(trainjob(), cfg)["metadata"]
    assert meta["labels"]["kontrast.dev/attempt"] == "0"
    assert meta["annotations"][ANNOTATION_TRAINJOB] == "clip"


def test_kueue_queue_label_and_suspended_job():
    job = worker_job(trainjob(scheduling={"queueName": "team-a"}), 0, 0, CONFIG)
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    assert job["spec"]["suspend"] is True


def test_kueue_pod_set_and_priority_class():
    """Kueue reads one pod set of `nodes` pods (parallelism = completions) with the per-pod
    requests, and the WorkloadPriorityClass from the Job's label: the TrainJob's own label is
    passed through, no other TrainJob label is."""
    tj = trainjob(scheduling={"queueName": "team-a", "resources": {"requests": {"cpu": "4", "nvidia.com/gpu": 4},
                                                                    "limits": {"nvidia.com/gpu": 4}}})
    tj["metadata"]["labels"][KUEUE_PRIORITY_LABEL] = "urgent"
    job = worker_job(tj, 0, 0, CONFIG)
    assert job["metadata"]["labels"][KUEUE_PRIORITY_LABEL] == "urgent"
    assert "team" not in job["metadata"]["labels"]
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 2
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == {"cpu": "4", "nvidia.com/gpu": 4}
    plain = worker_job(trainjob(scheduling={"queueName": "team-a"}), 0, 0, CONFIG)
    assert KUEUE_PRIORITY_LABEL not in plain["metadata"]["labels"]


def test_long_and_odd_names_stay_valid_and_distinct():
    long_a = "a" * 200 + ".x"
    long_b = "a" * 200 + ".y"
    for name in (long_a, long_b, "9lives", "with.dots"):
        tj = trainjob(nodes=1000)
        tj["metadata"]["name"] = name
        for o in children(tj, 12, 0, CONFIG):
            n = o["metadata"]["name"]
            assert len(n) <= 63 and n[0].isalpha() and "." not in n, n
            assert len(o["metadata"]["labels"][LABEL_TRAINJOB]) <= 63
        job = job_name(name, 12, 1000)
        assert len(f"{job}-999") <= 63
    assert job_name(long_a, 0) != job_name(long_b, 0)
    assert service_name("9lives") == "tj-9lives-workers"
    assert service_name("with.dots") == "with-dots-workers"


def test_config_from_env():
    cfg = OperatorConfig.from_env({
        "KONTRAST_TRAINER_IMAGE": "img:2",
        "KONTRAST_POD_DEFAULTS": '{"nodeSelector": {"a": "b"}, "shmSize": "4Gi"}',
        "KONTRAST_WATCH_NAMESPACES": "ml, research",
        "KONTRAST_MASTER_PORT": "31234",
    })
    assert cfg.trainer_image == "img:2"
    assert cfg.master_port == 31234 and OperatorConfig.from_env({}).master_port == 29500
    assert cfg.defaults == {"nodeSelector": {"a": "b"}, "terminationGracePeriodSeconds": 120}
    assert cfg.shm_size == "4Gi"
    assert cfg.watch_namespaces == ("ml", "research")
    assert cfg.pod_security_context["runAsUser"] == 1000


def test_config_names_an_unknown_pod_setting():
    import pytest

    with pytest.raises(ValueError, match="KONTRAST_POD_ENFORCED: unknown pod setting.*nodeSelectr"):
        OperatorConfig.from_env({"KONTRAST_POD_ENFORCED": '{"nodeSelectr": {"a": "b"}}'})


def test_config_takes_image_pull_secrets_as_names():
    cfg = OperatorConfig.from_env({"KONTRAST_POD_DEFAULTS": '{"imagePullSecrets": ["regcred"]}'})
    assert cfg.defaults["imagePullSecrets"] == [{"name": "regcred"}]


def test_pod_fields_are_scheduling_fields_of_the_crd():
    from kontrast.api.schema import spec_schema
    from kontrast.operator.config import POD_FIELDS

    assert set(POD_FIELDS) <= set(spec_schema()["properties"]["scheduling"]["properties"])


def test_scheduling_defaults_come_from_the_crd():
    from kontrast.api.schema import spec_schema
    from kontrast.api.scheduling import Scheduling, field_name

    props = spec_schema()["properties"]["scheduling"]["properties"]
    expected = {k: p["default"] for k, p in props.items() if "default" in p}
    assert expected  # maxRestarts, suspend, cleanup
    assert {k: getattr(Scheduling.from_spec({}), field_name(k)) for k in expected} == expected


def test_held_attempt_starts_suspended():
    assert worker_job(trainjob(), 1, 0, CONFIG, hold=True)["spec"]["suspend"] is True
    assert worker_job(trainjob(), 1, 0, CONFIG, hold=False)["spec"]["suspend"] is False


def test_held_attempt_waits_in_the_parking_queue_until_released():
    """Kueue's webhook labels an unlabelled Job with a namespace's `default` LocalQueue and may
    admit it; a held attempt bound for a queue is labelled with one that cannot exist instead."""
    tj = trainjob(scheduling={"queueName": "team-a"})
    held = worker_job(tj, 1, 0, CONFIG, hold=True)
    assert held["spec"]["suspend"] is True and held["metadata"]["labels"][KUEUE_QUEUE_LABEL] == PARKING_QUEUE
    assert held["metadata"]["annotations"][ANNOTATION_HOLD] == "true"
    assert held["metadata"]["annotations"][ANNOTATION_QUEUE] == "team-a"
    assert held["metadata"]["annotations"][ANNOTATION_PARKED_FOR] == "team-a"
    # Bound for a queue Kueue defaulted (the spec names none): parked too, and the spec's "" recorded.
    defaulted = worker_job(trainjob(), 1, 0, CONFIG, hold=True, queue="default")
    assert defaulted["metadata"]["labels"][KUEUE_QUEUE_LABEL] == PARKING_QUEUE
    assert defaulted["metadata"]["annotations"][ANNOTATION_QUEUE] == ""
    # Without any queue nothing is labelled (Kueue, if it labels it, holds it as its own).
    plain = worker_job(trainjob(), 1, 0, CONFIG, hold=True)
    assert KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"] and plain["spec"]["suspend"] is True


def test_job_carries_the_deadline_left_and_pods_the_status_interval():
    job = worker_job(trainjob(), 0, 0, OperatorConfig(status_interval_seconds=25), active_deadline_seconds=90)
    assert job["spec"]["activeDeadlineSeconds"] == 90
    assert "activeDeadlineSeconds" not in worker_job(trainjob(), 0, 0, CONFIG)["spec"]
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KONTRAST_STATUS_INTERVAL"] == "25"
