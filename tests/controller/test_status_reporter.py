"""trainer/src/status_reporter.py: rank 0's status patches (throttled, schema-shaped, never fatal)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from kontrast.trainer.report.cluster_status import StatusClient, StatusReporter, conform, status_schema


class FakeClient:
    def __init__(self, status=None, fail=0):
        self.patches = []
        self.status = status or {}
        self.fail = fail

    def get_status(self):
        return self.status

    def patch_status(self, body):
        if self.fail:
            self.fail -= 1
            raise RuntimeError("HTTP 503")
        json.dumps(body, allow_nan=False)  # what the real client would send
        self.patches.append(body)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def reporter(client, clock, interval=5.0):
    return StatusReporter(client, interval=interval, clock=clock, background=False)


def step(n, total=100, loss=1.0):
    return {"epoch": 1 + n // 50, "epochs": 2, "step": n, "totalSteps": total, "percent": 100.0 * n / total,
            "samplesPerSecond": 10.0, "etaSeconds": 5.0, "loss": loss, "lr": 1e-4, "microBatchSize": 8,
            "updatedAt": "2026-01-01T00:00:00Z"}


def test_progress_is_throttled_and_checkpoints_go_at_once():
    client, clock = FakeClient(), Clock()
    r = reporter(client, clock)
    r.on_start({"resolved": {"beta2": 0.98, "device": "cpu", "worldSize": 2, "unknownKey": 1},
                "epochs": 2, "totalSteps": 100, "startStep": 0, "startEpoch": 0})
    assert client.patches[-1]["resolved"] == {"beta2": 0.98, "device": "cpu", "worldSize": 2}
    assert client.patches[-1]["progress"]["totalSteps"] == 100
    n = len(client.patches)
    for i in range(1, 5):
        clock.t += 1.0
        r.on_step(step(i))
    assert len(client.patches) == n  # 4 steps within the 5 s interval: nothing sent yet
    clock.t += 0.5
    r.on_checkpoint({"uri": "/out/epoch_1.pt", "epoch": 1, "step": 50, "time": "2026-01-01T00:00:01Z"})
    last = client.patches[-1]
    assert last["checkpoints"]["latest"]["uri"] == "/out/epoch_1.pt"
    assert last["checkpoints"]["saved"] == [last["checkpoints"]["latest"]]
    # the newest progress rides along with the checkpoint
    assert last["progress"]["step"] == 4
    assert last["progress"]["epochText"] == "1/2"
    assert last["progress"]["percentText"] == "4%"


def test_eval_metrics_before_after_latest():
    client, clock = FakeClient(), Clock()
    r = reporter(client, clock)
    r.on_eval({"phase": "before", "epoch": 0, "metrics": {"ndcg@10": 0.1, "mrr@10": 0.2}})
    assert client.patches[-1]["metrics"] == {"before": {"ndcg@10": 0.1, "mrr@10": 0.2},
                                             "latest": {"ndcg@10": 0.1, "mrr@10": 0.2}, "epoch": 0}
    r.on_eval({"phase": "after", "epoch": 2, "metrics": {"ndcg@10": 0.5}})
    assert client.patches[-1]["metrics"]["after"] == {"ndcg@10": 0.5}


def test_saved_checkpoints_continue_across_restarts():
    old = {"uri": "/out/epoch_1.pt", "epoch": 1, "step": 50, "time": "t1"}
    client, clock = FakeClient(status={"checkpoints": {"latest": old, "saved": [old]}}), Clock()
    r = reporter(client, clock)
    r.on_checkpoint({"uri": "/out/epoch_2.pt", "epoch": 2, "step": 100, "time": "t2"})
    assert [c["uri"] for c in client.patches[-1]["checkpoints"]["saved"]] == ["/out/epoch_1.pt", "/out/epoch_2.pt"]


def test_values_are_shaped_to_the_schema():
    schema = status_schema()
    out = conform({"progress": {"step": 3.0, "loss": math.nan, "lr": float("inf"), "epoch": True, "bogus": 1},
                   "metrics": {"latest": {"ndcg@10": "0.5", "bad": "x"}},
                   "phase": "Running"}, schema)
    assert out["progress"] == {"step": 3}
    assert out["metrics"] == {"latest": {"ndcg@10": 0.5}}
    assert out["phase"] == "Running"  # the schema allows it; the reporter never sends it (not in its hooks)


def test_failures_never_raise_and_are_retried():
    client, clock = FakeClient(fail=2), Clock()
    r = reporter(client, clock)
    r.on_checkpoint({"uri": "/out/epoch_1.pt", "epoch": 1, "step": 50, "time": "t"})  # fails
    r.on_eval({"phase": "before", "epoch": 0, "metrics": {"map": 0.3}})  # fails again
    assert client.patches == []
    clock.t += 60
    assert r.flush()
    body = client.patches[-1]
    assert body["checkpoints"]["latest"]["uri"] == "/out/epoch_1.pt"
    assert body["metrics"]["before"] == {"map": 0.3}


def test_end_reports_final_progress_metrics_and_checkpoints():
    client, clock = FakeClient(), Clock()
    r = reporter(client, clock)
    ck = [{"uri": f"/out/epoch_{i}.pt", "epoch": i, "step": 50 * i, "time": "t"} for i in (1, 2)]
    r.on_end({"step": 100, "totalSteps": 100, "epoch": 2, "finalLoss": 0.7,
              "eval": {"before": {"map": 0.1}, "after": {"map": 0.4}}, "checkpoints": ck,
              "outputs": {"report": "/out/report.html", "model": "/out/model"}})
    body = client.patches[-1]
    assert body["progress"]["percentText"] == "100%" and body["progress"]["epochText"] == "2/2"
    assert body["metrics"] == {"before": {"map": 0.1}, "after": {"map": 0.4}}
    assert body["checkpoints"]["latest"]["uri"] == "/out/epoch_2.pt"
    assert len(body["checkpoints"]["saved"]) == 2
    assert body["outputs"] == {"report": "/out/report.html", "model": "/out/model"}


def test_background_thread_sends_and_close_flushes():
    client = FakeClient()
    r = StatusReporter(client, interval=0.2)
    r.on_step(step(1))
    r.on_step(step(2))
    r.close()
    assert client.patches and client.patches[-1]["progress"]["step"] == 2


def test_client_from_env_requires_cluster_env():
    with pytest.raises(RuntimeError):
        StatusClient.from_env({})


def test_client_talks_http_with_the_token(tmp_path):
    """A real PATCH over HTTP: method, path, content type, bearer token re-read from the file."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.command, self.path, self.headers["Content-Type"], self.headers["Authorization"],
                         json.loads(body)))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "token").write_text("tok-1\n")
        client = StatusClient("clip", "ml", f"http://127.0.0.1:{server.server_port}", sa_dir=str(tmp_path))
        client.patch_status({"progress": {"step": 1}})
        (tmp_path / "token").write_text("tok-2")
        client.patch_status({"progress": {"step": 2}})
    finally:
        server.shutdown()
    assert seen[0][:4] == ("PATCH", "/apis/kontrast.dev/v1alpha1/namespaces/ml/trainjobs/clip/status",
                           "application/merge-patch+json", "Bearer tok-1")
    assert seen[0][4] == {"status": {"progress": {"step": 1}}}
    assert seen[1][3] == "Bearer tok-2"


def test_the_mlflow_run_is_in_status_from_the_start_and_its_model_version_at_the_end():
    client, clock = FakeClient(), Clock()
    r = reporter(client, clock)
    run = {"uri": "http://mlflow:5000", "experimentId": "3", "runId": "abc"}
    r.on_start({"epochs": 2, "totalSteps": 100, "startStep": 0, "tracking": {"mlflow": run}})
    assert client.patches[-1]["outputs"] == {"mlflow": run}
    version = {**run, "modelName": "search", "modelVersion": "4", "modelUri": "models:/search/4"}
    r.on_end({"step": 100, "totalSteps": 100, "epoch": 2, "outputs": {"model": "/out/model", "mlflow": version}})
    assert client.patches[-1]["outputs"]["mlflow"] == version     # the CRD's schema keeps every field


def test_set_up_stages_move_updated_at_and_training_is_a_stage_too():
    """The heartbeat: a stage's start goes at once; its progress is throttled like steps, each
    patch moving updatedAt (what the operator's hang watchdog reads); steps say Training."""
    client, clock = FakeClient(), Clock()
    r = reporter(client, clock)
    r.on_stage("Prefetching", 0, 500)
    first = client.patches[-1]["progress"]
    assert first["stage"] == "Prefetching" and first["stageText"] == "Prefetching(0/500)" and first["updatedAt"]
    n = len(client.patches)
    for done in range(1, 200):
        r.on_stage("Prefetching", done, 500)
    assert len(client.patches) == n  # throttled
    clock.t += 6.0
    r.on_stage("Prefetching", 200, 500)
    assert client.patches[-1]["progress"]["stageText"] == "Prefetching(200/500)"
    r.on_stage("Loading", 0, None)
    assert client.patches[-1]["progress"]["stageText"] == "Loading"
    clock.t += 6.0
    r.on_step(step(3))
    assert client.patches[-1]["progress"]["stage"] == "Training"
    assert client.patches[-1]["progress"]["stageDone"] == 3


def test_mined_hard_negatives_go_to_status_at_once():
    client, clock = FakeClient(), Clock()
    r = reporter(client, clock)
    r.on_mined({"mined": 460, "dropped": 12, "queries": 230, "epoch": 1, "undeclared": 3})
    assert client.patches[-1]["hardNegatives"] == {"mined": 460, "dropped": 12, "queries": 230, "epoch": 1}
