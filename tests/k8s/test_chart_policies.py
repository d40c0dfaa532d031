"""The chart's admission policies and aggregated roles, applied as helm renders them to the real
kube-apiserver (its built-in ValidatingAdmissionPolicy admission and the controller manager's
ClusterRole aggregation), then exercised with real ServiceAccount tokens.

Every policy binding here is scoped to the test's own namespace (the chart's watchNamespaces)
and deleted afterwards, so the session's other tests never see it."""

from __future__ import annotations

import uuid

import pytest

from e2e.support import ensure_namespace, render_chart
from harness.kube import ApiError, Kube
from harness.waiting import wait_for
from kontrast.operator.children.base import base_children
from kontrast.operator.children.names import service_account_name
from kontrast.operator.config import OperatorConfig
from rulecases import trainjob

pytestmark = pytest.mark.k8s

OPERATOR_NS = "kontrast-system"
OPERATOR_SA = "kontrast-operator"  # the chart's ServiceAccount for release "kontrast"
VAP = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies"
VAPB = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings"
CLUSTER_ROLES = "/apis/rbac.authorization.k8s.io/v1/clusterroles"


def tj_path(ns: str, name: str = "") -> str:
    base = f"/apis/kontrast.dev/v1alpha1/namespaces/{ns}/trainjobs"
    return f"{base}/{name}" if name else base


@pytest.fixture(scope="module")
def helm():
    from harness.controlplane import ensure_binaries

    return ensure_binaries() / "helm"


@pytest.fixture
def ns(control_plane):
    name = control_plane.create_namespace(f"pol-{uuid.uuid4().hex[:6]}")
    yield name
    control_plane.kube().delete(f"/api/v1/namespaces/{name}")


def apply_kinds(kube: Kube, docs: list[dict], kinds: dict[str, str]) -> list[str]:
    """Create the rendered objects of the given kinds (kind -> collection path); return the
    paths of those this call created (another test of the session may have made the rest)."""
    made = []
    for obj in docs:
        base = kinds.get(obj["kind"])
        if base is None:
            continue
        try:
            kube.post(base, obj)
        except ApiError as e:
            if e.status != 409:
                raise
            continue
        made.append(f"{base}/{obj['metadata']['name']}")
    return made


@pytest.fixture
def policies(control_plane, helm, ns):
    """Render the chart for namespace ns with extra helm args; create its policies; clean up."""
    kube = control_plane.kube()
    made: list[str] = []

    def install(*args: str) -> list[dict]:
        docs = render_chart(helm, "--set", f"watchNamespaces={{{ns}}}", *args)
        made.extend(apply_kinds(kube, docs, {"ValidatingAdmissionPolicy": VAP,
                                             "ValidatingAdmissionPolicyBinding": VAPB}))
        return docs
    yield install
    for path in reversed(made):
        kube.delete(path)


def as_service_account(control_plane, ns: str, name: str) -> Kube:
    kube = control_plane.kube()
    try:
        kube.post(f"/api/v1/namespaces/{ns}/serviceaccounts",
                  {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
    except ApiError as e:
        if e.status != 409:
            raise
    return Kube(control_plane.service_account_client(ns, name))


def grant(control_plane, ns: str, user_ns: str, user: str, rules: list[dict], role: str) -> None:
    kube = control_plane.kube()
    base = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}"
    kube.post(f"{base}/roles", {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                                "metadata": {"name": role}, "rules": rules})
    kube.post(f"{base}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": user, "namespace": user_ns}]})


def denied(call) -> ApiError:
    with pytest.raises(ApiError) as err:
        call()
    return err.value


def until_enforced(probe, what: str) -> ApiError:
    """Policies take effect once the API server's policy informer has them (about a second)."""
    def attempt():
        try:
            probe()
        except ApiError as e:
            return e
        return None
    return wait_for(attempt, 30, what, interval=0.3)


# --- status belongs to whom it is for ------------------------------------------------------
def test_status_policy_lets_only_the_operator_write_the_lifecycle(control_plane, ns, policies):
    kube = control_plane.kube()
    tj = kube.post(tj_path(ns), trainjob({}, "mine"))
    # The trainer's identity exactly as the operator renders it (ServiceAccount, Role, binding);
    # an operator running in this session may have made them already.
    apply_kinds(kube, base_children(tj, OperatorConfig())[:3], {
        "ServiceAccount": f"/api/v1/namespaces/{ns}/serviceaccounts",
        "Role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
        "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"})
    as_trainer = Kube(control_plane.service_account_client(ns, service_account_name("mine")))
    # The operator's ServiceAccount, with (here) just the status rights it holds in the chart.
    ensure_namespace(control_plane, OPERATOR_NS)
    as_operator = as_service_account(control_plane, OPERATOR_NS, OPERATOR_SA)
    grant(control_plane, ns, OPERATOR_NS, OPERATOR_SA, [{"apiGroups": ["kontrast.dev"],
          "resources": ["trainjobs/status"], "verbs": ["get", "patch"]}], "operator-status")
    status = tj_path(ns, "mine") + "/status"
    wait_for(lambda: _can_patch(as_operator, status), 30, "the operator's Role to apply")

    # Without the policy, RBAC alone lets the trainer's token write any status field. (The
    # probe writes `message`: a phase could make an operator running in this session act.)
    as_trainer.patch(status, {"status": {"message": "written by the trainer"}})
    docs = policies()
    vap = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")
    assert vap["metadata"]["name"] == "kontrast-trainjob-status"
    # (each probe writes a new value: rewriting the same value changes nothing, so passes)
    err = until_enforced(lambda: as_trainer.patch(status, {"status": {"message": uuid.uuid4().hex}}),
                         "the status policy to deny the trainer a message")
    assert err.status == 403 and "status.message is written only by the kontrast operator" in err.message

    err = denied(lambda: as_trainer.patch(status, {"status": {"phase": "Succeeded"}}))
    assert err.status == 403, err
    assert "status.phase is written only by the kontrast operator" in err.message
    assert "status.progress, status.checkpoints, status.metrics, status.resolved" in err.message

    # The trainer writes its own fields; one operator field in the same patch denies the patch.
    as_trainer.patch(status, {"status": {"progress": {"step": 3}, "checkpoints": {"latest": {"epoch": 1}},
                                         "metrics": {"latest": {"map": 0.5}}, "resolved": {"worldSize": 2}}})
    # (values no operator writes: an operator reconciling this TrainJob in the same session sets
    # restarts to 0 and its own conditions, and rewriting an existing value is no change)
    for field, value in (("conditions", [{"type": "Probe", "status": "True"}]), ("restarts", 7),
                         ("startTime", "2026-01-01T00:00:00Z"), ("completionTime", "2026-01-01T00:00:00Z"),
                         ("message", "done"), ("observedGeneration", 9)):
        err = denied(lambda: as_trainer.patch(status, {"status": {"progress": {"step": 4}, field: value}}))
        assert err.status == 403 and f"status.{field} is written only by the kontrast operator" in err.message
    # Removing an operator field is a change too.
    err = denied(lambda: as_trainer.patch(status, {"status": {"message": None}}))
    assert "status.message" in err.message

    # The operator writes the lifecycle (and may write anything).
    st = as_operator.patch(status, {"status": {"phase": "Succeeded", "restarts": 1, "progress": {"step": 5},
                                               "conditions": [{"type": "Succeeded", "status": "True"}]}})["status"]
    assert st["phase"] == "Succeeded" and st["restarts"] == 1
    assert st["progress"]["step"] == 5 and st["checkpoints"]["latest"]["epoch"] == 1


def _can_patch(client: Kube, path: str) -> bool:
    try:
        client.patch(path, {"status": {"progress": {"step": 0}}})
        return True
    except ApiError as e:
        if e.status == 403:
            return False
        raise


# --- platform policy ----------------------------------------------------------------------
def test_platform_policy_rejects_foreign_images_and_enforced_fields(control_plane, ns, policies):
    kube = control_plane.kube()
    policies("--set-json", 'trainer.allowedImagePrefixes=["registry.example/ml/"]',
             "--set-json", 'trainer.enforced={"tolerations": [{"key": "dedicated", "operator": "Exists"}],'
                           ' "nodeSelector": {"pool": "ml"}, "env": [{"name": "NCCL_IB_DISABLE", "value": "1"}]}')

    def create(name: str, **scheduling):
        return kube.post(tj_path(ns), trainjob({"scheduling": scheduling}, name))

    err = until_enforced(lambda: create(f"evil-{uuid.uuid4().hex[:6]}", image="docker.io/evil/miner:1"),
                         "the platform policy")
    assert err.status == 403 and "spec.scheduling.image must start with one of: registry.example/ml/" in err.message
    err = denied(lambda: create("tol", tolerations=[{"key": "gpu", "operator": "Exists"}]))
    assert "spec.scheduling.tolerations is set by the platform" in err.message
    err = denied(lambda: create("pool", nodeSelector={"pool": "prod"}))
    assert "spec.scheduling.nodeSelector may not change the platform's keys pool" in err.message
    err = denied(lambda: create("nccl", env=[{"name": "NCCL_IB_DISABLE", "value": "0"}]))
    assert "spec.scheduling.env may not set NCCL_IB_DISABLE" in err.message

    create("ok", image="registry.example/ml/trainer:2", nodeSelector={"pool": "ml", "zone": "a"},
           env=[{"name": "NCCL_DEBUG", "value": "INFO"}])
    create("plain")
    # Updates are checked too: an existing TrainJob cannot be edited into a violation.
    err = denied(lambda: kube.patch(tj_path(ns, "plain"), {"spec": {"scheduling": {"image": "evil.io/x"}}}))
    assert "spec.scheduling.image" in err.message


# --- aggregated roles ---------------------------------------------------------------------
def test_namespace_edit_and_view_users_get_trainjob_rights(control_plane, helm, ns):
    kube = control_plane.kube()
    docs = render_chart(helm)
    made = apply_kinds(kube, [d for d in docs if "trainjobs-" in d["metadata"]["name"]],
                       {"ClusterRole": CLUSTER_ROLES})
    try:
        for user, role in (("alice", "edit"), ("bob", "view")):
            as_service_account(control_plane, ns, user)
            kube.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", {
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": user},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": user, "namespace": ns}]})
        alice = Kube(control_plane.service_account_client(ns, "alice"))
        bob = Kube(control_plane.service_account_client(ns, "bob"))

        # The controller manager aggregates the chart's rules into the built-in roles.
        def alice_creates():
            try:
                return alice.post(tj_path(ns), trainjob({}, "by-alice"))
            except ApiError as e:
                if e.status == 403:
                    return None
                raise
        wait_for(alice_creates, 60, "edit to include TrainJobs")
        alice.patch(tj_path(ns, "by-alice"), {"spec": {"scheduling": {"suspend": True}}})
        assert [t["metadata"]["name"] for t in bob.get(tj_path(ns))["items"]] == ["by-alice"]
        assert bob.get(tj_path(ns, "by-alice") + "/status")["metadata"]["name"] == "by-alice"
        assert denied(lambda: bob.post(tj_path(ns), trainjob({}, "by-bob"))).status == 403
        assert denied(lambda: bob.delete(tj_path(ns, "by-alice"))).status == 403
        # edit never writes status: that is the operator's and the trainer's
        err = denied(lambda: alice.patch(tj_path(ns, "by-alice") + "/status", {"status": {"phase": "Succeeded"}}))
        assert err.status == 403
        alice.delete(tj_path(ns, "by-alice"))
    finally:
        for path in made:
            kube.delete(path)


# --- the operator's reach -----------------------------------------------------------------
def test_the_operator_creates_children_only_in_opted_in_namespaces(control_plane, helm, ns):
    """admissionPolicy.operatorNamespaceLabel: the cluster-wide install's ClusterRole reaches every
    namespace; the policy keeps the operator's creations to the namespaces a platform labelled."""
    kube = control_plane.kube()
    ensure_namespace(control_plane, OPERATOR_NS)
    as_operator = as_service_account(control_plane, OPERATOR_NS, OPERATOR_SA)
    grant(control_plane, ns, OPERATOR_NS, OPERATOR_SA, [{"apiGroups": [""], "resources": ["configmaps"],
          "verbs": ["create", "delete"]}], "operator-children")
    configmaps = f"/api/v1/namespaces/{ns}/configmaps"

    def create(name: str) -> dict:
        return as_operator.post(configmaps, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}})

    wait_for(lambda: create("before-the-policy"), 30, "the operator's Role to apply")
    # Not scoped to watchNamespaces: the guard is for the cluster-wide install. Deleted below.
    docs = render_chart(helm, "--set", "admissionPolicy.operatorNamespaceLabel=kontrast.dev/trainjobs")
    made = apply_kinds(kube, [d for d in docs if d["metadata"]["name"] == "kontrast-operator-namespaces"],
                       {"ValidatingAdmissionPolicy": VAP, "ValidatingAdmissionPolicyBinding": VAPB})
    try:
        err = until_enforced(lambda: create(f"cm-{uuid.uuid4().hex[:6]}"), "the namespace guard")
        assert err.status == 403
        assert "only in namespaces labelled kontrast.dev/trainjobs=true" in err.message
        # Others than the operator are not the policy's business.
        kube.post(configmaps, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "admin-made"}})
        kube.patch(f"/api/v1/namespaces/{ns}", {"metadata": {"labels": {"kontrast.dev/trainjobs": "true"}}})
        wait_for(lambda: _creates(create), 30, "the opted-in namespace to accept the operator's ConfigMap")
    finally:
        for path in reversed(made):
            kube.delete(path)


def _creates(create) -> bool:
    try:
        create(f"cm-{uuid.uuid4().hex[:6]}")
        return True
    except ApiError as e:
        if e.status == 403:
            return False
        raise
