"""policy: what the platform lets a TrainJob pass to its pods (pure), and the rule that fails a
TrainJob that breaks it."""

from __future__ import annotations

import datetime as dt

import pytest

from kontrast.operator.config import OperatorConfig
from kontrast.operator.lifecycle.plan import decide
from kontrast.operator.policy import Policy, violations

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def spec(env=(), annotations=None, secret=None):
    out = {"scheduling": {"env": list(env), "podAnnotations": annotations or {}}}
    if secret:
        out["storageSecretRef"] = {"name": secret}
    return out


SECRET_ENV = {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}
FIELD_ENV = {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
APPARMOR = "container.apparmor.security.beta.kubernetes.io/trainer"


def test_no_policy_allows_anything():
    assert violations(spec([SECRET_ENV], {APPARMOR: "unconfined"}, "s3"), Policy()) == []


def test_value_from_sources_are_allowed_by_kind_or_by_name():
    by_kind = Policy(env_value_from=("fieldRef", "secretKeyRef:wandb"))
    assert violations(spec([FIELD_ENV]), by_kind) == []
    (problem,) = violations(spec([FIELD_ENV, SECRET_ENV]), by_kind)
    assert problem.startswith("spec.scheduling.env[1].valueFrom.secretKeyRef: secretKeyRef 'db' is not allowed")
    assert "fieldRef, secretKeyRef:wandb" in problem
    wandb = {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}}
    assert violations(spec([wandb]), by_kind) == []


def test_the_storage_secret_is_a_secret_source_too():
    (problem,) = violations(spec(secret="team-a-s3"), Policy(env_value_from=("fieldRef",)))
    assert problem.startswith("spec.storageSecretRef.name: Secret 'team-a-s3' is not allowed")
    assert violations(spec(secret="team-a-s3"), Policy(env_value_from=("secretKeyRef:team-a-s3",))) == []


def test_pod_annotations_must_start_with_an_allowed_prefix():
    policy = Policy(pod_annotation_prefixes=("prometheus.io/",))
    assert violations(spec(annotations={"prometheus.io/scrape": "true"}), policy) == []
    (problem,) = violations(spec(annotations={APPARMOR: "unconfined"}), policy)
    assert problem.startswith(f"spec.scheduling.podAnnotations[{APPARMOR}]: this annotation is not allowed")
    assert violations(spec(annotations={"a": "b"}), Policy(pod_annotation_prefixes=())) != []


def test_the_chart_values_are_read_and_a_typo_is_named():
    config = OperatorConfig.from_env({"KONTRAST_POLICY": '{"allowedEnvValueFrom": ["fieldRef"], '
                                                          '"allowedPodAnnotationPrefixes": null}'})
    assert config.policy == Policy(env_value_from=("fieldRef",), pod_annotation_prefixes=None)
    assert OperatorConfig.from_env({}).policy == Policy()
    with pytest.raises(ValueError, match="allowedEnvValueFrom entry 'secretRef'"):
        OperatorConfig.from_env({"KONTRAST_POLICY": '{"allowedEnvValueFrom": ["secretRef"]}'})
    with pytest.raises(ValueError, match="unknown policy setting"):
        OperatorConfig.from_env({"KONTRAST_POLICY": '{"allowedEnvValueFroms": []}'})


def test_a_trainjob_that_breaks_the_policy_fails_before_anything_runs():
    tj = {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
          "metadata": {"name": "clip", "namespace": "ml", "uid": "u1", "generation": 1},
          "spec": {"nodes": 1, "scheduling": {"env": [SECRET_ENV]}}, "status": {}}
    found = violations(tj["spec"], Policy(env_value_from=()))
    plan = decide(tj, [], [], NOW, violations=found)
    assert plan.create is None and plan.status["phase"] == "Failed"
    failed = {c["type"]: c for c in plan.status["conditions"]}["Failed"]
    assert failed["reason"] == "PolicyViolation"
    assert "spec.scheduling.env[0].valueFrom.secretKeyRef" in failed["message"]
