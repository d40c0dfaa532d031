"""The TrainJob CRD against the real kube-apiserver: schema, rules, defaults, immutability,
status pruning. The same cases (tests/cases/trainjob_rules.yaml) are checked locally in
tests/api; here the server must agree with them."""

from __future__ import annotations

import copy
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from harness.kube import ApiError
from rulecases import CASES, trainjob

pytestmark = pytest.mark.k8s

CRD_NAME = "trainjobs.kontrast.dev"


def path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/kontrast.dev/v1alpha1/namespaces/{namespace}/trainjobs"
    return f"{base}/{name}" if name else base


def rejected_fields(err: ApiError) -> list[str]:
    causes = (err.body.get("details") or {}).get("causes") or [] if isinstance(err.body, dict) else []
    return [c.get("field", "") for c in causes]


def assert_rejected_naming(err: ApiError, field: str) -> None:
    """422 with a cause on `field` itself or on one of its elements (spec.leftWeights[1])."""
    assert err.status == 422, err
    named = [f for f in rejected_fields(err) if f == field or f.startswith(field + "[")]
    assert named, f"expected a cause for {field}: {err.body}"
    assert field in err.message


@pytest.fixture(scope="module")
def ns(control_plane):
    return control_plane.create_namespace(f"api-{uuid.uuid4().hex[:6]}")


def test_crd_is_structural_and_established(control_plane):
    crd = control_plane.kube().get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
    conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conds["Established"] == "True"
    assert conds["NamesAccepted"] == "True"
    assert "NonStructuralSchema" not in conds, crd["status"]["conditions"]
    assert crd["status"]["acceptedNames"]["kind"] == "TrainJob"


def test_base_example_is_accepted(control_plane, ns):
    created = control_plane.kube().post(path(ns), trainjob({}), dryRun="All")
    assert created["spec"]["model"] == CASES["base"]["model"]


@pytest.mark.parametrize("case", CASES["rules"], ids=[c["rule"] for c in CASES["rules"]])
def test_server_rejects_bad_and_accepts_good(control_plane, ns, case):
    kube = control_plane.kube()
    with pytest.raises(ApiError) as err:
        kube.post(path(ns), trainjob(case["bad"]), dryRun="All")
    assert_rejected_naming(err.value, case["field"])
    kube.post(path(ns), trainjob(case["good"]), dryRun="All")


def show_defaults(tmp_path: Path, obj: dict) -> dict:
    f = tmp_path / "trainjob.yaml"
    f.write_text(yaml.safe_dump(obj))
    out = subprocess.run([sys.executable, "-m", "kontrast.cli", "validate", "--show-defaults", str(f)],
                         capture_output=True, text=True, check=True)
    return yaml.safe_load(out.stdout)


@pytest.mark.parametrize("patch", [{}, {"scheduling": {"maxRestarts": 7}},
                                   {"lrScheduler": "const-cooldown", "epochsCooldown": 1, "nodes": 2}],
                         ids=["base", "partial-scheduling", "cooldown"])
def test_server_defaults_equal_kontrast_validate(control_plane, ns, tmp_path, patch):
    obj = trainjob(patch)
    server = control_plane.kube().post(path(ns), obj, dryRun="All")
    local = show_defaults(tmp_path, obj)
    assert server["spec"] == local["spec"]
    assert server["spec"] != obj["spec"], "nothing was defaulted: the comparison proves nothing"


@pytest.mark.parametrize("case", CASES["rules"], ids=[c["rule"] for c in CASES["rules"]])
def test_server_defaults_equal_apply_defaults(control_plane, ns, case):
    from kontrast.api import apply_defaults

    obj = trainjob(case["good"])
    server = control_plane.kube().post(path(ns), obj, dryRun="All")
    assert server["spec"] == apply_defaults(obj)["spec"]


@pytest.fixture
def stored(control_plane, ns):
    """A created TrainJob, deleted afterwards."""
    name = f"tj-{uuid.uuid4().hex[:6]}"
    kube = control_plane.kube()
    kube.post(path(ns), trainjob({}, name))
    yield name
    kube.delete(path(ns, name))


@pytest.mark.parametrize("case", CASES["immutable"],
                         ids=[c["field"] + "/" + ",".join(sorted(c["change"])) for c in CASES["immutable"]])
def test_training_inputs_are_immutable(control_plane, ns, stored, case):
    kube = control_plane.kube()
    before = kube.get(path(ns, stored))
    with pytest.raises(ApiError) as err:
        kube.patch(path(ns, stored), {"spec": case["change"]})
    assert_rejected_naming(err.value, case["field"])
    assert "create a new TrainJob" in err.value.message
    assert kube.get(path(ns, stored))["spec"] == before["spec"]


@pytest.mark.parametrize("change", CASES["mutable"], ids=lambda c: ",".join(sorted(c["scheduling"])))
def test_scheduling_stays_mutable(control_plane, ns, stored, change):
    kube = control_plane.kube()
    before = kube.get(path(ns, stored))
    after = kube.patch(path(ns, stored), {"spec": change})
    for key, value in change["scheduling"].items():
        assert after["spec"]["scheduling"][key] == value
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1


# What the operator and the trainer write into status (DESIGN.md "Status"). Every field must
# survive the round trip: the API server silently drops anything the schema does not declare.
FULL_STATUS = {
    "phase": "Running",
    "observedGeneration": 1,
    "startTime": "2026-01-02T03:04:05Z",
    "completionTime": "2026-01-02T04:04:05Z",
    "restarts": 1,
    "message": "training, epoch 2 of 3",
    "conditions": [
        {"type": "Created", "status": "True", "reason": "ChildrenCreated", "message": "ok",
         "lastTransitionTime": "2026-01-02T03:04:05Z", "observedGeneration": 1},
        {"type": "Running", "status": "True", "reason": "PodsRunning", "message": "2/2 pods",
         "lastTransitionTime": "2026-01-02T03:05:05Z", "observedGeneration": 1},
    ],
    "progress": {"epoch": 2, "epochs": 3, "epochText": "2/3", "step": 40, "totalSteps": 60,
                 "percent": 66.7, "percentText": "66.7%", "samplesPerSecond": 120.5,
                 "etaSeconds": 30.0, "loss": 1.25, "lr": 0.0004, "microBatchSize": 8,
                 "updatedAt": "2026-01-02T03:30:00Z"},
    "checkpoints": {
        "latest": {"uri": "pvc://data/runs/x/epoch_2.pt", "epoch": 2, "step": 40,
                   "time": "2026-01-02T03:29:00Z"},
        "saved": [{"uri": "pvc://data/runs/x/epoch_1.pt", "epoch": 1, "step": 20,
                   "time": "2026-01-02T03:15:00Z"},
                  {"uri": "pvc://data/runs/x/epoch_2.pt", "epoch": 2, "step": 40,
                   "time": "2026-01-02T03:29:00Z"}],
    },
    "metrics": {"before": {"ndcg@10": 0.1, "mrr@10": 0.2, "recall@10": 0.3, "map": 0.15},
                "after": {"ndcg@10": 0.4, "mrr@10": 0.5, "recall@10": 0.6, "map": 0.45},
                "latest": {"ndcg@10": 0.4}, "epoch": 2},
    "resolved": {"beta2": 0.98, "eps": 1e-6, "poolingMethod": "default", "logitScale": 2.6592,
                 "logitBias": -10.0, "microBatchSize": 8, "accumSteps": 1, "globalBatchSize": 16,
                 "worldSize": 2, "totalSteps": 60, "peakLr": 0.0005, "device": "cpu",
                 "precision": "fp32"},
}


def test_status_keeps_declared_fields_and_prunes_undeclared(control_plane, ns, stored):
    kube = control_plane.kube()
    status = copy.deepcopy(FULL_STATUS)
    status["undeclared"] = "dropped"
    status["progress"]["bogus"] = 1
    status["checkpoints"]["latest"]["sha"] = "dropped"
    out = kube.patch(path(ns, stored) + "/status", {"status": status})
    assert out["status"] == FULL_STATUS
    assert kube.get(path(ns, stored))["status"] == FULL_STATUS


def test_status_subresource_cannot_change_spec(control_plane, ns, stored):
    kube = control_plane.kube()
    out = kube.patch(path(ns, stored) + "/status", {"spec": {"lr": 0.5}, "status": {"phase": "Pending"}})
    assert out["status"]["phase"] == "Pending"
    assert out["spec"]["lr"] != 0.5


@pytest.mark.parametrize("case", CASES["names"], ids=[c["name"] for c in CASES["names"]])
def test_server_rejects_names_whose_children_would_be_invalid_or_collide(control_plane, ns, case):
    with pytest.raises(ApiError) as err:
        control_plane.kube().post(path(ns), trainjob({}, name=case["name"]), dryRun="All")
    assert err.value.status == 422 and case["says"] in err.value.message, err.value.message


@pytest.mark.parametrize("name", CASES["good_names"])
def test_server_accepts_good_names(control_plane, ns, name):
    control_plane.kube().post(path(ns), trainjob({}, name=name), dryRun="All")


class _KubeStatusClient:
    """The trainer's StatusClient, through the test harness's connection (same merge patches)."""

    def __init__(self, kube, location: str):
        self.kube, self.location = kube, location

    def get_status(self) -> dict:
        return self.kube.get(self.location).get("status") or {}

    def patch_status(self, status: dict) -> None:
        self.kube.patch(self.location + "/status", {"status": status})


def test_status_of_several_eval_sets_round_trips_through_the_trainers_reporter(control_plane, ns, stored):
    """Two eval sets reported by the trainer's own StatusReporter: the server keeps every field
    it sends (nothing pruned), each set keeps its before when a later evaluation merges in, and
    the history holds each set's nDCG@10 per evaluation."""
    from kontrast.trainer.report.cluster_status import StatusReporter
    from kontrast.trainer.run.evaluations import eval_entry, eval_summary

    kube = control_plane.kube()
    reporter = StatusReporter(_KubeStatusClient(kube, path(ns, stored)), background=False)

    def sets(base: float) -> dict:
        return {"in-domain": {"ndcg@10": base, "mrr@10": base / 2, "ndcg@10@dim8": base / 3, "queries": 20.0},
                "zero-shot": {"ndcg@10": base / 4, "mrr@10": base / 8, "ndcg@10@dim8": base / 5, "queries": 7.0}}

    history = []
    for epoch, phase, base in ((0, "before", 0.2), (1, "epoch", 0.5), (2, "after", 0.6)):
        history.append(eval_entry(epoch, phase, sets(base)))
        best = {"uri": "pvc://data/runs/x/epoch_1.pt", "epoch": 1, "ndcg@10": 0.5, "evalSet": "in-domain"}
        reporter.on_eval({**history[-1], "selectBy": "in-domain", "history": list(history),
                          "best": best if epoch else None})
    reporter.on_end({"eval": eval_summary(sets(0.2), sets(0.6))})
    reporter.close()

    status = kube.get(path(ns, stored))["status"]
    first = {base: sets(base)["in-domain"] for base in (0.2, 0.5, 0.6)}
    assert status["metrics"] == {   # all of it: the server pruned nothing the reporter sent
        "before": first[0.2], "latest": first[0.6], "after": first[0.6], "epoch": 2, "selectBy": "in-domain",
        "sets": {name: {"before": sets(0.2)[name], "latest": sets(0.6)[name], "after": sets(0.6)[name]}
                 for name in ("in-domain", "zero-shot")},
        "history": [{"epoch": e, "phase": p, "metrics": first[base],
                     "sets": {n: {"ndcg@10": m["ndcg@10"]} for n, m in sets(base).items()}}
                    for e, p, base in ((0, "before", 0.2), (1, "epoch", 0.5), (2, "after", 0.6))],
    }
    assert status["checkpoints"]["best"]["evalSet"] == "in-domain"
