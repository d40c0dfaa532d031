"""MLflow tracking of a run (``spec.tracking.mlflow``): rank 0's reporter, client side only.

One TrainJob is one MLflow run however often it is preempted: the run's id is written to
``<output>/mlflow_run.json`` when the run is created, a resumed run continues that run, and
``status.outputs.mlflow`` shows it. What is logged:

* at the start, the TrainJob's parameters (nested ones flattened: ``data.onBadImage``) and the
  trainer's resolved values (``resolved.peakLr``); a resumed run adds only the keys it has not
  logged yet (MLflow refuses to change a param);
* every step's ``train/*`` and ``perf/*`` metrics (TensorBoard's names), batched: one request
  every ``FLUSH_SECONDS`` and at each checkpoint and evaluation, never one per step;
* each evaluation's metrics as ``eval/*`` with the epoch as step (``ndcg@10`` is logged as
  ``ndcg_at_10``: MLflow's metric names allow no ``@``);
* each mining of hard negatives as ``hardNegatives/mined``, ``/dropped`` and ``/queries``, with
  the epoch it serves as step;
* at the end, with ``registeredModel``, the exported model folder as the artifact folder
  ``model`` (open_clip's ``local-dir:`` layout), registered as a new model version tagged with
  the TrainJob and the data it learned from; then summary.json, report.html, plots/ and the
  model card as artifacts.

Never fatal, never blocking: every request runs on one background thread. A failing request
is retried ``ATTEMPTS`` times with backoff, then logged as a warning; while the server stays
unreachable later requests are tried once each. The start waits for the run at most
``START_SECONDS`` (status shows its id when it came in time), the end at most ``END_SECONDS``. Step metrics that could not be sent are kept (at most
``MAX_PENDING``) and go with the next batch that gets through.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from kontrast.api.tracking import MlflowTracking
from kontrast.contract import JOB_NAMESPACE_ENV, JOB_UID_ENV

from .. import storage
from ..layout import OutputFolder
from ..locations import has_scheme
from ..spec import Resolved
from .reporters import Reporter, eval_scalars
from .tensorboard import STEP_SCALARS

log = logging.getLogger(__name__)

FLUSH_SECONDS = 10.0        #: step metrics are sent at most this often (and at checkpoints, evaluations)
ATTEMPTS = 3                #: tries of a request while the server answered the last one
BACKOFF_SECONDS = 1.0       #: before the second try; doubled for each further one
START_SECONDS = 30.0        #: the longest the start waits for the run (it is then created in the background)
END_SECONDS = 120.0         #: the longest the end of a run waits for its artifacts and model version
CLOSE_SECONDS = 10.0        #: the longest close() waits for requests still queued
MAX_PENDING = 100_000       #: step metrics kept while the server is unreachable (oldest dropped)
#: The client's own HTTP retries and timeout, unless the environment sets them: this module
#: retries, and a request must not hang for MLflow's default 120 s.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
#: MLflow's limits on one log_batch request and on a param value.
BATCH_METRICS, BATCH_PARAMS, PARAM_VALUE_CHARS = 1000, 100, 6000
#: The output files logged as artifacts at the end: (location in OutputFolder, artifact folder).
END_ARTIFACTS = (("summary", ""), ("report", ""), ("plots", "plots"))


def metric_key(name: str) -> str:
    """An MLflow-valid metric or tag name: ``ndcg@10`` -> ``ndcg_at_10``."""
    return re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Params as MLflow stores them: nested keys joined with dots, lists as JSON, values cut to
    MLflow's length limit."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[metric_key(name)] = text[:PARAM_VALUE_CHARS]
    return out


def mlflow_tracker(resolved: Resolved, namespace: Optional[str] = None) -> Optional["MlflowTracker"]:
    """The tracker of ``spec.tracking.mlflow`` (None when unset, or mlflow-skinny is missing).
    ``namespace``: the TrainJob's (default: the pod's $KONTRAST_JOB_NAMESPACE)."""
    settings = resolved.params.tracking.mlflow
    if settings is None:
        return None
    try:
        from mlflow.tracking import MlflowClient  # noqa: F401
    except ImportError:
        log.warning("spec.tracking.mlflow is set but the MLflow client is not installed (pip install "
                    "'kontrast[trainer,mlflow]'): the run is not tracked")
        return None
    params = resolved.params
    identity = {"kontrast.name": resolved.name, "kontrast.uid": resolved.uid or os.environ.get(JOB_UID_ENV, ""),
                "kontrast.namespace": namespace if namespace is not None else os.environ.get(JOB_NAMESPACE_ENV, "")}
    data = {"trainData": params.train_data, "evalData": params.eval_data, "corpusData": params.corpus_data}
    if not params.eval_data:   # evalSets: each set's files under its name
        data.update({f"evalSets.{s.name}{suffix}": location for s in params.eval_sets
                     for suffix, location in (("", s.data), (".corpus", s.corpus))})
    return MlflowTracker(settings, OutputFolder(params.output), identity,
                         {key: location for key, location in data.items() if location})


class MlflowTracker(Reporter):
    """Rank 0's MLflow reporter: :meth:`begin` and the hooks queue requests for one background
    thread, and wait for them only at the start and the end, a bounded time."""

    def __init__(self, settings: MlflowTracking, output: OutputFolder, identity: Mapping[str, str],
                 data: Mapping[str, str]):
        for key, value in CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self.settings, self.output = settings, output
        self.identity = dict(identity)          # kontrast.name, .namespace, .uid: tags of the run and version
        self.data = dict(data)                  # trainData, evalData, corpusData: resolved locations
        self.client = MlflowClient(tracking_uri=settings.uri, registry_uri=settings.uri)
        self.run: dict[str, str] = {}           # uri, experimentId, runId once created or continued
        self.artifact_uri = ""
        self._unreachable = False
        self._pending: list[Any] = []           # mlflow.entities.Metric not sent yet
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._flush_queued = False
        self._ended = False
        self._info: Mapping[str, Any] = {}       # begin()'s start info: the params
        self._params_logged = False
        self._jobs: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    # --- the start ------------------------------------------------------------------------
    def begin(self, info: Mapping[str, Any]) -> dict[str, str]:
        """Start the background thread, continue this output's MLflow run or create one, and log
        the params. Returns ``{"uri", "experimentId", "runId"}``, or {} when the run is not
        there within START_SECONDS (the server is down or slow: training goes on, and the run
        is created when the server answers)."""
        self._info = info
        self._thread = threading.Thread(target=self._work, name="kontrast-mlflow", daemon=True)
        self._thread.start()
        opened = self._submit(self._open, "creating the MLflow run")
        run = self._wait(opened, time.monotonic() + START_SECONDS, "the MLflow run")
        if run:
            log.info("tracking in MLflow run %s (experiment %s) at %s", run["runId"], run["experimentId"], run["uri"])
        return dict(run or {})

    def _open(self) -> dict[str, str]:
        """The run, created (or continued) and its params logged, at the first request that needs
        it: at the start, or when the server answers again."""
        if not self.run:
            self.run = self._find_or_create_run()
        if not self._params_logged:
            self._log_params(self._info)
            self._params_logged = True
        return self.run

    def _find_or_create_run(self) -> dict[str, str]:
        kept = self._kept_run()
        if kept:
            self.client.update_run(kept["runId"], status="RUNNING")
            return kept
        name = self.settings.experiment or self.identity["kontrast.namespace"] or "Default"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        created = self.client.create_run(experiment_id, run_name=self.identity["kontrast.name"],
                                         tags={k: v for k, v in self.identity.items() if v})
        run = {"uri": self.settings.uri, "experimentId": experiment_id, "runId": created.info.run_id}
        self.artifact_uri = created.info.artifact_uri
        storage.write_text(self.output.mlflow_run, json.dumps(run, indent=2) + "\n")
        return run

    def _kept_run(self) -> Optional[dict[str, str]]:
        """The run recorded in the output by an earlier attempt at this server, if it still exists."""
        if not storage.exists(self.output.mlflow_run):
            return None
        with storage.open_read(self.output.mlflow_run) as f:
            kept = json.loads(f.read())
        if kept.get("uri") != self.settings.uri:
            log.warning("%s names a run at %s, not at %s: starting a new MLflow run", self.output.mlflow_run,
                        kept.get("uri"), self.settings.uri)
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.artifact_uri = self.client.get_run(kept["runId"]).info.artifact_uri
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s of %s is gone: starting a new one", kept["runId"], self.output.mlflow_run)
            return None
        return kept

    def _log_params(self, info: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = {**flatten(info.get("parameters") or {}), **flatten(info.get("resolved") or {}, "resolved.")}
        logged = self.client.get_run(self.run["runId"]).data.params
        new = [Param(k, v) for k, v in sorted(params.items()) if k not in logged]
        for i in range(0, len(new), BATCH_PARAMS):
            self.client.log_batch(self.run["runId"], params=new[i:i + BATCH_PARAMS])

    # --- the hooks: queue work --------------------------------------------------------------
    def on_step(self, p):
        if self._thread is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(p[key]), now, int(p["step"])) for key, tag in STEP_SCALARS.items()
                   if isinstance(p.get(key), (int, float))]
        with self._lock:
            self._pending.extend(metrics)
            del self._pending[:-MAX_PENDING]
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self._queue_flush()

    def on_checkpoint(self, checkpoint):
        self._queue_flush()

    def on_eval(self, event):
        self._log_now({f"eval/{metric_key(k)}": v for k, v in eval_scalars(event).items()},
                      int(event.get("epoch") or 0))

    def on_mined(self, counts):
        """``hardNegatives/mined``, ``/dropped`` and ``/queries`` at the epoch the mining serves."""
        self._log_now({f"hardNegatives/{k}": float(counts[k]) for k in ("mined", "dropped", "queries")
                       if isinstance(counts.get(k), (int, float))}, int(counts.get("epoch") or 0))

    def _log_now(self, values: Mapping[str, float], step: int) -> None:
        """Metrics of an event (an evaluation, a mining), sent at once rather than with the steps'."""
        if self._thread is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self._pending.extend(Metric(k, v, now, step) for k, v in values.items())
        self._queue_flush()

    def on_end(self, summary):
        """Flush, register the model, then log the files; adds ``outputs.mlflow`` to ``summary``
        (and summary.json) for the sinks after this one, the cluster status among them."""
        if self._thread is None:
            return
        deadline = time.monotonic() + END_SECONDS
        self._queue_flush()
        version = self._wait(self._submit(lambda: self._register(summary), "registering the model"), deadline,
                             "the model version")
        if self.run:
            summary.setdefault("outputs", {})["mlflow"] = {**self.run, **(version or {})}
            if summary.get("summaryUri"):
                storage.write_text(summary["summaryUri"], json.dumps(summary, indent=2) + "\n")
        self._wait(self._submit(self._log_end_artifacts, "logging the report and summary"), deadline,
                   "the report and summary")
        self._ended = True

    def close(self):
        if self._thread is None:
            return
        status = "FINISHED" if self._ended else "KILLED"    # a resume sets it RUNNING again
        self._queue_flush()
        self._wait(self._submit(lambda: self.run and self.client.set_terminated(self.run["runId"], status),
                                f"ending the MLflow run ({status})"), time.monotonic() + CLOSE_SECONDS,
                   "the run's end")
        self._jobs.put(None)
        self._thread = None

    # --- the background thread ------------------------------------------------------------
    def _submit(self, fn: Callable[[], Any], what: str) -> Future:
        future: Future = Future()
        self._jobs.put((fn, what, future))
        return future

    def _wait(self, future: Future, deadline: float, what: str) -> Any:
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            log.warning("MLflow tracking: not waiting any longer for %s (the server is slow or away; "
                        "training goes on)", what)
            return None

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, what, future = job
            future.set_result(self._attempt(fn, what))

    def _attempt(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` with retries; None after a warning when it keeps failing."""
        tries = 1 if self._unreachable else ATTEMPTS
        for i in range(tries):
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - tracking must never stop training
                if i + 1 < tries:
                    time.sleep(BACKOFF_SECONDS * 2 ** i)
                    continue
                if not self._unreachable:
                    log.warning("MLflow tracking: %s failed after %d attempt(s) (training continues; later "
                                "requests are tried once until one succeeds): %s", what, tries, exc)
                else:
                    log.debug("MLflow tracking: %s failed again: %s", what, exc)
                self._unreachable = True
                return None
            if self._unreachable:
                log.info("MLflow tracking: the server answers again (%s)", what)
            self._unreachable = False
            return result
        return None

    def _queue_flush(self) -> None:
        with self._lock:
            if self._flush_queued or not self._pending:
                return
            self._flush_queued = True
        self._submit(self._flush, "logging metrics")

    def _flush(self) -> None:
        """Send the metrics pending now, in batches; what fails goes back to the pending (and this
        raises). Metrics that arrive meanwhile wait for the next flush: chasing them, one request
        after another, sent a request per step whenever a request outlasted a step."""
        with self._lock:
            self._flush_queued = False
            self._last_flush = time.monotonic()
            taken, self._pending = self._pending, []
        start = 0
        try:
            if taken:
                self._open()
            for start in range(0, len(taken), BATCH_METRICS):
                self.client.log_batch(self.run["runId"], metrics=taken[start:start + BATCH_METRICS])
        except Exception:
            with self._lock:
                self._pending[:0] = taken[start:]
                del self._pending[:-MAX_PENDING]
            raise

    # --- the end: artifacts and the model version -------------------------------------------
    def _register(self, summary: Mapping[str, Any]) -> Optional[dict[str, str]]:
        """Log the exported model folder and register it as a new version (with registeredModel)."""
        name, model = self.settings.registered_model, (summary.get("outputs") or {}).get("model")
        if not name or not model:
            return None
        self._open()
        with tempfile.TemporaryDirectory(prefix="kontrast-mlflow-") as tmp:
            self.client.log_artifacts(self.run["runId"], str(_local_folder(model, Path(tmp))), "model")
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(name, f"{self.artifact_uri}/model", run_id=self.run["runId"],
                                                   tags=self._version_tags(summary))
        log.info("registered model %s version %s", name, version.version)
        return {"modelName": name, "modelVersion": str(version.version),
                "modelUri": f"models:/{name}/{version.version}"}

    def _version_tags(self, summary: Mapping[str, Any]) -> dict[str, str]:
        from ..data.shared_table import source_stamp

        tags = {k: v for k, v in self.identity.items() if v}
        for key, location in self.data.items():
            try:
                stamp = source_stamp(location)
            except Exception as exc:  # noqa: BLE001 - an identity we cannot read is named as such
                stamp = {"error": str(exc)[:200]}
            tags[f"kontrast.data.{key}"] = json.dumps({"location": location, **stamp}, sort_keys=True)
        best = (summary.get("best") or {}).get("ndcg@10")
        if best is None:
            best = ((summary.get("eval") or {}).get("after") or {}).get("ndcg@10")
        if best is not None:
            tags["kontrast.best_ndcg_at_10"] = f"{best:.6g}"
        return tags

    def _log_end_artifacts(self) -> None:
        self._open()
        with tempfile.TemporaryDirectory(prefix="kontrast-mlflow-") as tmp:
            for place, folder in END_ARTIFACTS:
                location = getattr(self.output, place)
                if place == "plots":
                    if storage.list_names(location):
                        self.client.log_artifacts(self.run["runId"], str(_local_folder(location, Path(tmp))), folder)
                elif storage.exists(location):
                    self.client.log_artifact(self.run["runId"], str(_local_file(location, Path(tmp))), folder or None)
            card = storage.join(self.output.model, "README.md")
            if storage.exists(card):
                self.client.log_artifact(self.run["runId"], str(_local_file(card, Path(tmp) / "card")), "model_card")


def _local_file(location: str, tmp: Path) -> Path:
    """``location`` as a local file (copied from an object store into ``tmp``)."""
    if not has_scheme(location):
        return Path(location)
    tmp.mkdir(parents=True, exist_ok=True)
    target = tmp / location.rstrip("/").rsplit("/", 1)[-1]
    with storage.open_read(location) as f:
        target.write_bytes(f.read())
    return target


def _local_folder(location: str, tmp: Path) -> Path:
    """The files directly in folder ``location`` as a local folder (copied from an object store)."""
    if not has_scheme(location):
        return Path(location)
    target = tmp / location.rstrip("/").rsplit("/", 1)[-1]
    for name in storage.list_names(location):
        _local_file(storage.join(location, name), target)
    return target
