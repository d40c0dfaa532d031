"""charts/kontrast: the CRD copy, helm lint/template, RBAC that covers what the operator does,
the Deployment's safety settings, and the Argo CD health check."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from kontrast.operator.children import base
from kontrast.operator.children.job import children
from kontrast.operator.config import OperatorConfig

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kontrast"


@pytest.fixture(scope="module")
def helm():
    from harness.controlplane import ensure_binaries

    path = ensure_binaries() / "helm"
    assert path.exists(), "the test binaries have no helm"
    return path


def template(helm, *args: str) -> list[dict]:
    out = subprocess.run([str(helm), "template", "kontrast", str(CHART), "-n", "kontrast-system", *args],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_crd_is_identical_to_the_source_of_truth():
    assert (CHART / "crds" / "trainjob.yaml").read_bytes() == (REPO / "crds" / "trainjob.yaml").read_bytes(), \
        "charts/kontrast/crds/trainjob.yaml differs: cp crds/trainjob.yaml charts/kontrast/crds/"


def test_helm_lint_is_clean(helm):
    proc = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[INFO]" not in proc.stdout, proc.stdout


def test_default_render(helm):
    docs = template(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service",
                     "ServiceAccount", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["python", "-m", "kontrast.operator"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KONTRAST_TRAINER_IMAGE"] == "ghcr.io/kontrast/trainer:0.1.0"
    assert env["KONTRAST_WATCH_NAMESPACES"] == ""
    assert env["KONTRAST_LIVENESS"] == "http://0.0.0.0:8080/healthz"
    # the env the chart sets is the env the operator reads
    cfg = OperatorConfig.from_env({k: v for k, v in env.items() if v is not None})
    assert cfg.shm_size == "2Gi" and cfg.pod_security_context["runAsUser"] == 1000
    assert c["image"] == "ghcr.io/kontrast/operator:0.1.0"


def chart_config(docs) -> OperatorConfig:
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    return OperatorConfig.from_env({k: v for k, v in env.items() if v is not None})


def test_chart_defaults_are_the_operators_builtin_defaults(helm):
    """values.yaml shows the pod defaults the operator uses without a chart; they must agree."""
    cfg, builtin = chart_config(template(helm)), OperatorConfig()
    assert cfg.defaults == builtin.defaults
    assert cfg.pod_security_context == builtin.pod_security_context
    assert cfg.shm_size == builtin.shm_size
    assert cfg.cache_volume == builtin.cache_volume == {"emptyDir": {}}
    assert cfg.enforced == builtin.enforced == {}


def test_pod_settings_values_reach_the_operator(helm):
    docs = template(helm, "--set-json", 'trainer.defaults.env=[{"name":"NCCL_DEBUG","value":"WARN"}]',
                    "--set", "trainer.defaults.schedulerName=volcano",
                    "--set", "trainer.defaults.terminationGracePeriodSeconds=300",
                    "--set-json", 'trainer.defaults.imagePullSecrets=["regcred"]',
                    "--set-json", 'trainer.enforced={"priorityClassName":"ml","nodeSelector":{"pool":"ml"}}')
    cfg = chart_config(docs)
    assert cfg.defaults["env"] == [{"name": "NCCL_DEBUG", "value": "WARN"}]
    assert cfg.defaults["schedulerName"] == "volcano" and cfg.defaults["terminationGracePeriodSeconds"] == 300
    assert cfg.defaults["imagePullSecrets"] == [{"name": "regcred"}]
    assert cfg.enforced == {"priorityClassName": "ml", "nodeSelector": {"pool": "ml"}}


def test_status_policy_guards_every_operator_field_of_the_crd(helm):
    """Operator-only fields come from the CRD's status schema; the trainer's are one list."""
    from kontrast.api.schema import openapi_schema

    docs = template(helm)
    (vap,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    spec = vap["spec"]
    assert spec["matchConstraints"]["resourceRules"][0]["resources"] == ["trainjobs/status"]
    assert spec["matchConditions"][0]["expression"] == \
        "request.userInfo.username != 'system:serviceaccount:kontrast-system:kontrast-operator'"
    guarded = {v["expression"].split("?status.?")[1].split(" ")[0] for v in spec["validations"]}
    trainer = set(yaml.safe_load((CHART / "values.yaml").read_text())["admissionPolicy"]["trainerStatusFields"])
    assert trainer == {"progress", "checkpoints", "metrics", "resolved", "data", "outputs"}
    assert guarded == set(openapi_schema()["properties"]["status"]["properties"]) - trainer
    assert {"phase", "conditions", "restarts", "startTime", "completionTime"} <= guarded
    (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}
    # a trainer-written field added to the list is no longer guarded
    docs = template(helm, "--set-json", 'admissionPolicy.trainerStatusFields=["progress","checkpoints","metrics",'
                                        '"resolved","message"]')
    (vap,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    assert not [v for v in vap["spec"]["validations"] if "?status.?message " in v["expression"]]
    assert not [d for d in template(helm, "--set", "admissionPolicy.enabled=false") if "Validating" in d["kind"]]


def test_platform_policy_renders_only_with_platform_values(helm):
    docs = template(helm, "--set-json", 'trainer.allowedImagePrefixes=["registry.example/ml/"]',
                    "--set-json", 'trainer.enforced={"tolerations":[{"key":"d","operator":"Exists"}]}',
                    "--set", "watchNamespaces={ml}")
    vaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    platform = vaps["kontrast-trainjob-platform"]["spec"]
    assert platform["matchConstraints"]["resourceRules"][0]["operations"] == ["CREATE", "UPDATE"]
    exprs = [v["expression"] for v in platform["validations"]]
    assert exprs == ['!has(variables.scheduling.image) || ["registry.example/ml/"].exists(p, '
                     'variables.scheduling.image.startsWith(p))', "!has(variables.scheduling.tolerations)"]
    for b in (d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"):
        assert b["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["ml"]}]
    names = {d["metadata"]["name"] for d in template(helm) if d["kind"] == "ValidatingAdmissionPolicy"}
    assert names == {"kontrast-trainjob-status"}


def test_aggregated_roles_extend_edit_and_view(helm):
    roles = {d["metadata"]["name"]: d for d in template(helm) if d["kind"] == "ClusterRole"}
    edit, view = roles["kontrast-trainjobs-edit"], roles["kontrast-trainjobs-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert _allowed(edit["rules"], "kontrast.dev", "trainjobs", "create")
    assert not _allowed(edit["rules"], "kontrast.dev", "trainjobs/status", "patch")
    assert not any(_allowed(view["rules"], "kontrast.dev", r, v) for r in ("trainjobs", "trainjobs/status")
                   for v in ("create", "update", "patch", "delete"))
    assert not [d for d in template(helm, "--set", "rbac.aggregateToDefaultRoles=false")
                if "trainjobs-" in d["metadata"]["name"]]


def test_values_reach_the_operator(helm):
    docs = template(helm, "--set", "watchNamespaces={ml,research}", "--set", "trainer.image.tag=dev",
                    "--set-json", 'trainer.defaults.nodeSelector={"pool":"gpu"}', "--set", "metrics.enabled=false")
    kinds = sorted((d["kind"], d["metadata"].get("namespace")) for d in docs)
    assert not [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "kontrast-operator"]
    assert kinds.count(("Role", "ml")) == 1 and kinds.count(("RoleBinding", "research")) == 1
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    cfg = OperatorConfig.from_env(env)
    assert cfg.watch_namespaces == ("ml", "research")
    assert cfg.trainer_image.endswith(":dev")
    assert cfg.defaults["nodeSelector"] == {"pool": "gpu"}
    assert cfg.metrics_port == 0
    assert not [d for d in docs if d["kind"] == "Service"]


def _allowed(rules, group, resource, verb):
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def test_rbac_covers_exactly_what_the_operator_does(helm):
    role = next(d for d in template(helm) if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "kontrast-operator")
    rules = role["rules"]
    tj = {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
          "metadata": {"name": "x", "namespace": "n", "uid": "u"},
          "spec": {"nodes": 1, "trainData": "a", "output": "b"}}
    plural = {"ServiceAccount": ("", "serviceaccounts"), "Role": ("rbac.authorization.k8s.io", "roles"),
              "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"), "Service": ("", "services"),
              "ConfigMap": ("", "configmaps"), "Job": ("batch", "jobs")}
    for obj in children(tj, 0, 0, OperatorConfig()):
        group, res = plural[obj["kind"]]
        for verb in ("create", "get", "delete"):
            assert _allowed(rules, group, res, verb), (obj["kind"], verb)
    # The per-job Role's verbs must be held by the operator (RBAC escalation prevention).
    for rule in base.role(tj)["rules"]:
        for verb in rule["verbs"]:
            assert _allowed(rules, "kontrast.dev", "trainjobs/status", verb)
    for verb in ("list", "watch"):
        assert _allowed(rules, "batch", "jobs", verb) and _allowed(rules, "", "pods", verb)
        assert _allowed(rules, "kontrast.dev", "trainjobs", verb)
    # A finished TrainJob is deleted when its ttlSecondsAfterFinished runs out: one by one, by uid.
    assert _allowed(rules, "kontrast.dev", "trainjobs", "delete")
    # Least privilege: no wildcards, never secrets, never update or delete-all of TrainJobs, read-only pods.
    for r in rules:
        assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
        assert "secrets" not in r["resources"]
    assert not _allowed(rules, "kontrast.dev", "trainjobs", "deletecollection")
    assert not _allowed(rules, "kontrast.dev", "trainjobs", "update")
    assert not _allowed(rules, "", "pods", "delete") and not _allowed(rules, "", "pods", "create")


# --- Argo CD health ----------------------------------------------------------------------
def health(obj: dict) -> dict:
    import lupa  # a dev dependency: the health script is real Lua, run by a real Lua runtime

    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    script = (CHART / "files" / "argocd-health.lua").read_text()

    # Argo CD runs the script with the object as a Lua table named `obj`.
    def convert(value):
        if isinstance(value, dict):
            return lua.table_from({k: convert(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([convert(v) for v in value])
        return value

    run = lua.eval(f"function(obj)\n{script}\nend")
    result = run(convert(obj))
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize("status,expected", [
    ({"phase": "Succeeded", "message": "Training completed"}, "Healthy"),
    ({"phase": "Failed", "message": "column 'score': not a number"}, "Degraded"),
    ({"phase": "Suspended"}, "Suspended"),
    ({"phase": "Running"}, "Progressing"),
    ({"phase": "Restarting"}, "Progressing"),
    ({"phase": "Pending"}, "Progressing"),
    ({}, "Progressing"),
    (None, "Progressing"),
    ({"phase": "Running", "conditions": [{"type": "Failed", "status": "True", "message": "boom"}]}, "Degraded"),
])
def test_argocd_health(status, expected):
    obj = {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob", "metadata": {"name": "x"}}
    if status is not None:
        obj["status"] = status
    result = health(obj)
    assert result["status"] == expected
    if status and status.get("message"):
        assert result["message"] == status["message"]


def test_chart_values_are_documented_json_serialisable():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    json.dumps(values)
    assert values["trainer"]["defaults"]["shmSize"] == OperatorConfig().shm_size


def test_lifecycle_values_reach_the_operator_and_its_pods(helm):
    docs = template(helm, "--set", "trainer.statusIntervalSeconds=30", "--set", "operator.resyncSeconds=60",
                    "--set", "operator.hangTimeoutSeconds=0")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    cfg = OperatorConfig.from_env({k: v for k, v in env.items() if v is not None})
    assert (cfg.status_interval_seconds, cfg.resync_seconds, cfg.hang_after()) == (30.0, 60.0, None)
    defaults = OperatorConfig.from_env({k: v for k, v in {e["name"]: e.get("value") for e in next(
        d for d in template(helm) if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }.items() if v is not None})
    assert 15 <= defaults.status_interval_seconds <= 30 and defaults.hang_seconds > 0
    assert defaults.ttl_seconds_after_finished is None            # finished TrainJobs are kept unless asked


@pytest.mark.parametrize("value,seconds", [("604800", 604800.0), ("0", 0.0)])
def test_the_platform_ttl_default_reaches_the_operator(helm, value, seconds):
    docs = template(helm, "--set", f"operator.ttlSecondsAfterFinished={value}")
    assert chart_config(docs).ttl_seconds_after_finished == seconds


def test_a_bad_ttl_default_names_its_variable():
    with pytest.raises(ValueError, match="KONTRAST_TTL_SECONDS_AFTER_FINISHED must not be negative"):
        OperatorConfig.from_env({"KONTRAST_TTL_SECONDS_AFTER_FINISHED": "-1"})
    with pytest.raises(ValueError, match="KONTRAST_TTL_SECONDS_AFTER_FINISHED must be a number"):
        OperatorConfig.from_env({"KONTRAST_TTL_SECONDS_AFTER_FINISHED": "a week"})


def test_a_cache_volume_from_values_replaces_the_default_emptydir(helm, tmp_path):
    values = tmp_path / "v.yaml"
    values.write_text("trainer: {defaults: {cacheVolume: {emptyDir: null, hostPath: {path: /var/cache/kontrast}}}}\n")
    assert chart_config(template(helm, "-f", str(values))).cache_volume == {"hostPath": {"path": "/var/cache/kontrast"}}
    assert chart_config(template(helm, "--set", "trainer.defaults.cacheVolume.emptyDir=null")).cache_volume == {}
