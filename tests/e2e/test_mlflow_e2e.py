"""A TrainJob through the operator that logs to a real MLflow server and registers its model:
the credentials reach the pods as secretKeyRefs, status.outputs.mlflow names the run and the
model version, and the MLflow client reads them back."""

from __future__ import annotations

import json

import pytest

from harness.waiting import wait_for

from e2e.support import trainjob

pytestmark = [pytest.mark.e2e, pytest.mark.mlflow]


def test_a_two_node_trainjob_logs_to_mlflow_and_registers_its_model(tjs, tiny, mlflow):
    tjs.kube.post(f"/api/v1/namespaces/{tjs.ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mlflow-token"},
        "stringData": {"MLFLOW_TRACKING_TOKEN": "not-checked-by-this-server"}})
    model = f"{mlflow.experiment}-model"
    tracking = mlflow.spec(registeredModel=model, credentialsSecretRef={"name": "mlflow-token"})
    tjs.create(trainjob("tracked", tiny, epochs=2, nodes=2, tracking=tracking, evalEvery=1))
    (job,) = wait_for(lambda: tjs.jobs("tracked"), 60, "the worker Job")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlflow-token", "key": "MLFLOW_TRACKING_TOKEN", "optional": True}

    st = tjs.wait_phase("tracked", "Succeeded", timeout=420)
    published = st["outputs"]["mlflow"]
    run_dir = tjs.agent.pvc_path(tjs.ns, "runs") / "tracked"
    assert json.loads((run_dir / "mlflow_run.json").read_text())["runId"] == published["runId"]
    assert published["uri"] == mlflow.uri and published["modelUri"] == f"models:/{model}/{published['modelVersion']}"

    client = mlflow.server.client()
    run = client.get_run(published["runId"])
    assert run.info.status == "FINISHED" and run.info.experiment_id == published["experimentId"]
    assert run.data.params["resolved.worldSize"] == "2" and run.data.params["nodes"] == "2"
    tj = tjs.get("tracked")
    assert run.data.tags["kontrast.namespace"] == tjs.ns and run.data.tags["kontrast.uid"] == tj["metadata"]["uid"]
    losses = client.get_metric_history(published["runId"], "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, st["progress"]["totalSteps"] + 1))
    assert sorted(m.step for m in client.get_metric_history(published["runId"], "eval/ndcg_at_10"))[:3] == [0, 1, 2]
    assert {"summary.json", "report.html", "plots", "model_card", "model"} <= {
        a.path for a in client.list_artifacts(published["runId"])}
    version = client.get_model_version(model, published["modelVersion"])
    assert version.run_id == published["runId"]
    assert version.tags["kontrast.name"] == "tracked" and version.tags["kontrast.uid"] == tj["metadata"]["uid"]
    assert json.loads(version.tags["kontrast.data.trainData"])["location"] == str(tiny["train"])
