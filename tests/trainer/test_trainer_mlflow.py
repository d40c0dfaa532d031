"""spec.tracking.mlflow against a real ``mlflow server`` (SQLite, local artifact store): a local
run, a resumed run, a 2-process torchrun run and a run whose server goes away, each read back
through the MLflow client; with registeredModel, the model version loads back in open_clip."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch
import yaml
from safetensors.torch import load_file

from harness.mlflow import MLFLOW_VERSION, own_server
from kontrast.trainer.report.mlflow_tracking import flatten, metric_key
from kontrast.trainer.report.reporters import Reporter

pytestmark = pytest.mark.mlflow


def jsonl(out: Path, event: str) -> list[dict]:
    return [e for e in map(json.loads, (out / "progress.jsonl").read_text().splitlines()) if e["event"] == event]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


class SlowerThanSteps(Reporter):
    """A server slower than a training step, as a busy one is, in lockstep with training: each
    metrics request is answered only after the next step (whose metrics are then pending), and
    that step returns only once the requests begun before it are answered."""

    def __init__(self, steps: int):
        self.steps, self.done, self.started, self.finished = steps, 0, 0, 0
        self.cond = threading.Condition()

    def on_step(self, progress):        # called after the tracker's: this step's metrics are pending
        with self.cond:
            self.done += 1
            begun = self.started
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.finished >= begun, timeout=60), "a request never ended"

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self.cond:
            self.started += 1
            until = min(self.done + 1, self.steps)
            assert self.cond.wait_for(lambda: self.done >= until, timeout=60), "training stopped"
        try:
            yield
        finally:
            with self.cond:
                self.finished += 1
                self.cond.notify_all()


def count_log_batches(monkeypatch, server: Optional[SlowerThanSteps] = None) -> list[tuple[str, bool]]:
    """(run id, answered) for each log-batch request this process sends from now on.

    Counted per run in the client, not in the session-wide server's access log, where another
    test's requests would count too; a request the loaded server failed (and the tracker sent
    again) is told apart from one it answered."""
    from mlflow.tracking import MlflowClient

    sent: list[tuple[str, bool]] = []
    log_batch = MlflowClient.log_batch

    def counted(self, run_id, *args, **kwargs):
        with server.request() if server is not None and kwargs.get("metrics") else contextlib.nullcontext():
            try:
                result = log_batch(self, run_id, *args, **kwargs)
            except Exception:
                sent.append((run_id, False))
                raise
        sent.append((run_id, True))
        return result

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    return sent


def assert_tracked(client, out: Path, run_id: str, *, steps: int, epochs: int) -> None:
    """The MLflow run holds what progress.jsonl holds: every step's loss, every evaluation."""
    logged = history(client, run_id, "train/loss")
    assert [s for s, _ in logged] == list(range(1, steps + 1))
    assert [v for _, v in logged] == pytest.approx([e["loss"] for e in jsonl(out, "step")], rel=1e-6)
    evals = [(e["epoch"], e["metrics"]["ndcg@10"]) for e in jsonl(out, "eval")]
    assert [s for s, _ in evals][0] == 0 and evals[-1][0] == epochs
    tracked = history(client, run_id, "eval/ndcg_at_10")
    assert [s for s, _ in tracked] == [s for s, _ in evals]
    assert [v for _, v in tracked] == pytest.approx([v for _, v in evals], rel=1e-6)


def test_names_and_params_are_what_mlflow_accepts():
    from mlflow.utils.validation import validate_param_and_metric_name

    assert metric_key("ndcg@10") == "ndcg_at_10" and metric_key("rbp@0.8") == "rbp_at_0.8"
    assert all(validate_param_and_metric_name(metric_key(k)) for k in ("p@10", "err@10", "a b/c.d-e:f"))
    flat = flatten({"data": {"onBadImage": "skip", "cache": None}, "leftKeys": ["q"], "lr": 0.1, "x": "y" * 7000})
    assert flat == {"data.onBadImage": "skip", "leftKeys": '["q"]', "lr": "0.1", "x": "y" * 6000}


def test_the_server_is_the_clients_version():
    from importlib.metadata import version

    assert version("mlflow-skinny") == MLFLOW_VERSION


def test_a_local_run_logs_params_batched_steps_evaluations_and_artifacts(run_training, base_spec, mlflow, tmp_path,
                                                                         monkeypatch):
    # No flush on the clock in this run (a loaded machine's steps can each outlast FLUSH_SECONDS):
    # what remains are the flushes an event asks for, which the progress file counts. Each
    # metrics request outlasts a step: a flush sends what was pending when it began (it once
    # chased the steps that came meanwhile, a request per step until the epoch's end).
    from kontrast.trainer.report import mlflow_tracking
    monkeypatch.setattr(mlflow_tracking, "FLUSH_SECONDS", 1e9)
    slow = SlowerThanSteps(steps=32)
    sent = count_log_batches(monkeypatch, slow)
    summary, resolved = run_training({**base_spec, "batchSize": 4, "evalEvery": 1, "tracking": mlflow.spec()},
                                     reporters=[slow])
    out = Path(resolved.params.output)
    run_id = summary["outputs"]["mlflow"]["runId"]
    assert json.loads((out / "mlflow_run.json").read_text())["runId"] == run_id
    assert jsonl(out, "start")[0]["tracking"]["mlflow"]["runId"] == run_id
    client = mlflow.server.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == resolved.name
    assert client.get_experiment(run.info.experiment_id).name == mlflow.experiment
    assert run.data.params["batchSize"] == "4" and run.data.params["data.onBadImage"] == "fail"
    assert run.data.params["rightWeights"] == "[0.5, 0.5]"
    assert run.data.params["resolved.globalBatchSize"] == "4" and run.data.tags["kontrast.name"] == resolved.name
    steps = summary["step"]
    assert steps == 32
    assert_tracked(client, out, run_id, steps=steps, epochs=2)
    assert len(history(client, run_id, "perf/samples_per_second")) == steps
    # Batched: the params in requests of BATCH_PARAMS, then a request per flush (each checkpoint,
    # each evaluation, the end and the close), not per step.
    flushes = (-(-len(run.data.params) // mlflow_tracking.BATCH_PARAMS)
               + len(jsonl(out, "checkpoint")) + len(jsonl(out, "eval")) + 2)
    requests, failed = sent.count((run_id, True)), sent.count((run_id, False))
    assert 2 <= requests <= flushes < steps / 2, f"{requests} log-batch requests ({failed} failed) for {steps} steps"

    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "report.html", "plots", "model_card"} <= names
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {f"plots/{p.name}" for p in (out / "plots").iterdir()}
    local = Path(client.download_artifacts(run_id, "summary.json", str(tmp_path)))
    assert json.loads(local.read_text())["outputs"]["mlflow"]["runId"] == run_id
    card = Path(client.download_artifacts(run_id, "model_card/README.md", str(tmp_path)))
    assert card.read_text() == (out / "model" / "README.md").read_text()
    assert "registeredModel" not in run.data.params and "modelVersion" not in summary["outputs"]["mlflow"]


def test_mined_hard_negatives_are_logged_as_metrics(run_training, base_spec, mlflow):
    summary, _ = run_training({**base_spec, "epochs": 1, "hardNegatives": {"perQuery": 2}, "tracking": mlflow.spec()})
    counts = summary["hardNegatives"]
    assert counts["mined"] > 0
    client = mlflow.server.client()
    run_id = summary["outputs"]["mlflow"]["runId"]
    for key in ("mined", "dropped", "queries"):
        logged = history(client, run_id, f"hardNegatives/{key}")
        assert logged == [(counts["epoch"], float(counts[key]))], key


def test_a_resumed_run_continues_the_same_mlflow_run(run_training, base_spec, mlflow):
    spec = {**base_spec, "epochs": 3, "tracking": mlflow.spec()}
    stopped, resolved = run_training(spec, max_epochs=1)
    out = Path(resolved.params.output)
    first = json.loads((out / "mlflow_run.json").read_text())["runId"]
    client = mlflow.server.client()
    assert client.get_run(first).info.status == "KILLED"          # interrupted, to be continued
    summary, _ = run_training(spec)
    assert summary["outputs"]["mlflow"]["runId"] == first
    assert len(client.search_runs([client.get_experiment_by_name(mlflow.experiment).experiment_id])) == 1
    assert client.get_run(first).info.status == "FINISHED"
    assert_tracked(client, out, first, steps=summary["step"], epochs=3)


def test_a_two_process_torchrun_run_logs_once_from_rank_0(base_spec, mlflow, tmp_path, h):
    spec = {**base_spec, "batchSize": 8, "tracking": mlflow.spec()}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(h.trainjob(spec, name="torchrun-mlflow")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "kontrast.trainer", str(job), "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = Path(spec["output"])
    client = mlflow.server.client()
    runs = client.search_runs([client.get_experiment_by_name(mlflow.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"      # rank 1 created no run
    assert runs[0].data.params["resolved.worldSize"] == "2"
    summary = json.loads((out / "summary.json").read_text())
    assert_tracked(client, out, runs[0].info.run_id, steps=summary["step"], epochs=2)


class StopServerAt(Reporter):
    """Stops the MLflow server when training reaches ``step`` (the server goes away mid-run)."""

    def __init__(self, server, step: int):
        self.server, self.step, self.stopped = server, step, False

    def on_step(self, progress):
        if progress["step"] == self.step and not self.stopped:
            self.server.stop()
            self.stopped = True


def test_a_run_finishes_when_the_server_stops_mid_run(run_training, base_spec, caplog):
    server = own_server()
    try:
        stopper = StopServerAt(server, step=3)
        spec = {**base_spec, "epochs": 3, "evalEvery": 1,
                "tracking": {"mlflow": {"uri": server.uri, "experiment": "down", "registeredModel": "down-model"}}}
        with caplog.at_level(logging.WARNING, logger="kontrast"):
            summary, resolved = run_training(spec, reporters=[stopper])
        returned = dt.datetime.now(dt.timezone.utc)
    finally:
        server.stop()
    out = Path(resolved.params.output)
    assert stopper.stopped and summary["step"] == 12 and summary["epoch"] == 3 and (out / "model").is_dir()
    assert summary["outputs"]["mlflow"]["runId"] and "modelVersion" not in summary["outputs"]["mlflow"]
    warnings = [r.getMessage() for r in caplog.records if "MLflow tracking" in r.getMessage()]
    assert warnings and "training continues" in warnings[0]
    assert len(warnings) <= 2, warnings        # one warning (and one "not waiting any longer" at most)
    # What the end of the run waited for tracking: from progress.jsonl's end event (whole seconds)
    # to train() returning, about 2 s. Each request is tried once while the server stays away:
    # retrying the end's three requests would take 9 s, MLflow's own retries minutes.
    ended = dt.datetime.fromisoformat(jsonl(out, "end")[-1]["time"].replace("Z", "+00:00"))
    assert (returned - ended).total_seconds() < 8, returned - ended


def test_the_registered_model_version_loads_back_in_open_clip(run_training, base_spec, mlflow, tmp_path):
    summary, resolved = run_training({**base_spec, "evalEvery": 1,
                                      "tracking": mlflow.spec(registeredModel=f"{mlflow.experiment}-model")})
    published = summary["outputs"]["mlflow"]
    name, version = published["modelName"], published["modelVersion"]
    assert published["modelUri"] == f"models:/{name}/{version}"
    client = mlflow.server.client()
    tags = client.get_model_version(name, version).tags
    assert tags["kontrast.name"] == resolved.name and tags["kontrast.best_ndcg_at_10"]
    assert float(tags["kontrast.best_ndcg_at_10"]) == pytest.approx(summary["best"]["ndcg@10"], rel=1e-5)
    train = json.loads(tags["kontrast.data.trainData"])
    assert train["location"] == resolved.params.train_data and int(train["size"]) == os.path.getsize(train["location"])
    assert "kontrast.data.evalData" in tags
    assert client.get_model_version(name, version).run_id == published["runId"]

    # What the README shows: the MLflow client and one open_clip call.
    import mlflow as mlflow_client
    import open_clip

    mlflow_client.set_tracking_uri(mlflow.uri)
    path = mlflow_client.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "dl"))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")

    exported = load_file(Path(resolved.params.output) / "model" / "open_clip_model.safetensors")
    loaded = model.state_dict()
    assert exported.keys() <= loaded.keys()
    assert all(torch.equal(exported[k], loaded[k]) for k in exported)
    assert preprocess.transforms[0].size in (16, [16], (16, 16))


class StartServerAt(Reporter):
    """Starts the (stopped) MLflow server when training reaches ``step``."""

    def __init__(self, server, step: int):
        self.server, self.step, self.started = server, step, False

    def on_step(self, progress):
        if progress["step"] == self.step and not self.started:
            self.server.start()
            self.started = True


def test_a_server_that_comes_back_mid_run_gets_the_whole_run(run_training, base_spec):
    server = own_server(start=False)                      # away when training starts
    try:
        starter = StartServerAt(server, step=3)
        spec = {**base_spec, "epochs": 3, "evalEvery": 1,
                "tracking": {"mlflow": {"uri": server.uri, "experiment": "late"}}}
        summary, resolved = run_training(spec, reporters=[starter])
        out = Path(resolved.params.output)
        assert starter.started and "tracking" not in jsonl(out, "start")[0]   # no run at the start
        run_id = summary["outputs"]["mlflow"]["runId"]
        assert json.loads((out / "mlflow_run.json").read_text())["runId"] == run_id
        client = server.client()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["epochs"] == "3"
        assert_tracked(client, out, run_id, steps=12, epochs=3)  # the steps before it came back too
    finally:
        server.stop()


def test_a_server_that_never_answers_delays_neither_the_start_nor_the_end(run_training, base_spec, monkeypatch):
    import socket

    from kontrast.trainer.report import mlflow_tracking

    # A black hole: the kernel accepts connections for the listening socket, nobody answers.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # each request hangs 2 s (3 tries: 9 s with backoff)
    monkeypatch.setattr(mlflow_tracking, "START_SECONDS", 1.0)
    monkeypatch.setattr(mlflow_tracking, "END_SECONDS", 2.0)
    monkeypatch.setattr(mlflow_tracking, "CLOSE_SECONDS", 1.0)
    waited: list[float] = []
    begin = mlflow_tracking.MlflowTracker.begin

    def timed_begin(self, info):
        started = time.monotonic()
        try:
            return begin(self, info)
        finally:
            waited.append(time.monotonic() - started)

    monkeypatch.setattr(mlflow_tracking.MlflowTracker, "begin", timed_begin)
    try:
        uri = f"http://127.0.0.1:{hole.getsockname()[1]}"
        summary, resolved = run_training({**base_spec, "tracking": {"mlflow": {"uri": uri}}})
        returned = dt.datetime.now(dt.timezone.utc)
    finally:
        hole.close()
    out = Path(resolved.params.output)
    assert summary["step"] == 8 and (out / "model").is_dir() and "mlflow" not in summary["outputs"]
    assert len(waited) == 1 and waited[0] < 1.5, waited
    ended = dt.datetime.fromisoformat(jsonl(out, "end")[-1]["time"].replace("Z", "+00:00"))
    assert (returned - ended).total_seconds() < 5, returned - ended     # END_SECONDS + CLOSE_SECONDS + rounding
