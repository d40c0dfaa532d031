"""The cluster status reporter: rank 0 patches its TrainJob's ``status`` while it trains.

It writes only ``status.progress``, ``status.checkpoints``, ``status.metrics`` and
``status.resolved`` (the operator owns phase and conditions), with JSON merge patches on the
``trainjobs/<name>/status`` subresource, authenticated with the pod's ServiceAccount token.
The operator's Role lets that ServiceAccount get and patch the status of this one TrainJob
and nothing else.

- Progress goes at most every ``interval`` seconds; checkpoints, evaluations and the end go
  at once. Sending happens on a background thread, so a slow API server never slows training.
- Every value is conformed to the CRD's status schema (the same file the API server uses):
  undeclared keys are dropped, integers stay integers, NaN/inf are left out. A patch the
  server would reject cannot be built.
- A failing report never fails training: errors are logged (the first, then rarely) and
  the newest state is sent again later.

Plain urllib (no kubernetes client, no kopf), so the trainer image stays small.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Optional

from kontrast.api import GROUP, PLURAL, VERSION
from kontrast.contract import JOB_NAME_ENV, JOB_NAMESPACE_ENV, STATUS_INTERVAL_ENV

from ..evaluation.metrics import BEST_BY
from .heartbeat import TRAINING
from .reporters import Reporter, utc_now

log = logging.getLogger(__name__)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SA_DIR_ENV = "KONTRAST_SERVICEACCOUNT_DIR"  # tests and unusual mounts
DEFAULT_INTERVAL = 5.0
MAX_SAVED = 20


def status_schema() -> dict:
    """``status`` of the TrainJob CRD (the single source of truth)."""
    from kontrast.api import openapi_schema

    return openapi_schema()["properties"]["status"]


def conform(value: Any, schema: Mapping[str, Any]) -> Any:
    """``value`` shaped to ``schema``, or None when it cannot be (the caller drops it)."""
    if value is None:
        return None
    kind = schema.get("type")
    if kind == "object" or "properties" in schema or "additionalProperties" in schema:
        if not isinstance(value, Mapping):
            return None
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out = {}
        for k, v in value.items():
            sub = props.get(k) if k in props else (extra if isinstance(extra, Mapping) else None)
            if sub is None:
                continue
            c = conform(v, sub)
            if c is not None:
                out[k] = c
        return out
    if kind == "array":
        if not isinstance(value, (list, tuple)):
            return None
        items = [conform(v, schema.get("items") or {}) for v in value]
        return [i for i in items if i is not None]
    if kind in ("integer", "number"):
        if isinstance(value, bool):
            return None
        try:
            f = float(value)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(f):
            return None
        if kind == "number":
            return f
        return int(f) if f == int(f) else None
    if kind == "string":
        return value if isinstance(value, str) else str(value)
    if kind == "boolean":
        return value if isinstance(value, bool) else None
    return value


def _merge(into: dict, patch: Mapping[str, Any]) -> dict:
    for k, v in patch.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)
    return into


def eval_patch(event: Mapping[str, Any]) -> dict:
    """The status patch of an evaluation event: the first eval set's metrics as latest (and
    before/after), every set's under ``sets`` (merged by name, so each keeps its before), and
    the history with only ``BEST_BY`` of each set per evaluation. The full history of every
    set would grow the status by sets x metrics x 200 evaluations; summary.json keeps it."""
    phases = ("latest", event["phase"]) if event.get("phase") in ("before", "after") else ("latest",)
    metrics: dict = {phase: dict(event.get("metrics") or {}) for phase in phases}
    if event.get("selectBy"):
        metrics["selectBy"] = event["selectBy"]
    if event.get("sets"):
        metrics["sets"] = {name: {phase: dict(m) for phase in phases} for name, m in event["sets"].items()}
    if event.get("epoch") is not None:
        metrics["epoch"] = event["epoch"]
    if event.get("history"):
        metrics["history"] = [_history_entry(h) for h in event["history"]]
    patch: dict = {"metrics": metrics}
    if event.get("best"):
        patch["checkpoints"] = {"best": dict(event["best"])}
    return patch


def _history_entry(entry: Mapping[str, Any]) -> dict:
    out = {k: entry[k] for k in ("epoch", "phase", "metrics") if k in entry}
    if entry.get("sets"):
        out["sets"] = {name: {BEST_BY: m[BEST_BY]} for name, m in entry["sets"].items() if BEST_BY in m}
    return out


def progress_fields(p: Mapping[str, Any]) -> dict:
    """The trainer's step dict plus the printer-column texts (Epoch, Progress)."""
    out = dict(p)
    if p.get("epoch") is not None and p.get("epochs") is not None:
        out["epochText"] = f"{p['epoch']}/{p['epochs']}"
    if p.get("percent") is not None:
        try:
            out["percentText"] = f"{float(p['percent']):.0f}%"
        except (TypeError, ValueError):
            pass
    return out


class StatusClient:
    """GET and merge-PATCH one TrainJob's status with the pod's ServiceAccount token."""

    def __init__(self, name: str, namespace: str, server: str, sa_dir: str = SA_DIR, timeout: float = 10.0):
        self.url = f"{server}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        self.sa_dir = sa_dir
        self.timeout = timeout
        ca = os.path.join(sa_dir, "ca.crt")
        self.context = ssl.create_default_context(cafile=ca if os.path.exists(ca) else None)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "StatusClient":
        env = os.environ if env is None else env
        name, namespace = env.get(JOB_NAME_ENV), env.get(JOB_NAMESPACE_ENV)
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not (name and namespace and host):
            raise RuntimeError(f"not in a cluster pod: {JOB_NAME_ENV}, {JOB_NAMESPACE_ENV} and "
                               "KUBERNETES_SERVICE_HOST must be set")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return cls(name, namespace, f"https://{host}:{port}", env.get(SA_DIR_ENV) or SA_DIR)

    def _token(self) -> str:
        # Re-read every time: projected tokens rotate.
        with open(os.path.join(self.sa_dir, "token")) as f:
            return f.read().strip()

    def _request(self, method: str, body: Optional[bytes] = None, content_type: Optional[str] = None) -> dict:
        req = urllib.request.Request(self.url, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self._token()}")
        req.add_header("Accept", "application/json")
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{method} {self.url}: HTTP {e.code}: {detail}") from None

    def get_status(self) -> dict:
        return self._request("GET").get("status") or {}

    def patch_status(self, status: Mapping[str, Any]) -> None:
        body = json.dumps({"status": status}, allow_nan=False).encode()
        self._request("PATCH", body, "application/merge-patch+json")


class StatusReporter(Reporter):
    """A Reporter (see reporters.py) that mirrors training into the TrainJob's status."""

    def __init__(self, client: Any, interval: float = DEFAULT_INTERVAL, schema: Optional[Mapping[str, Any]] = None,
                 clock: Callable[[], float] = time.monotonic, background: bool = True):
        self.client = client
        self.interval = interval
        self.schema = schema if schema is not None else status_schema()
        self.clock = clock
        self._cv = threading.Condition()
        self._pending: dict = {}
        self._due: Optional[float] = None
        self._last_sent = -math.inf
        self._saved: Optional[list] = None  # seeded from the current status before the first checkpoint
        self._closed = False
        self._errors = 0
        self.sent: list[dict] = []  # what was sent (tests, debugging); kept short
        self._thread: Optional[threading.Thread] = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="kontrast-status", daemon=True)
            self._thread.start()

    @classmethod
    def from_env(cls) -> "StatusReporter":
        interval = float(os.environ.get(STATUS_INTERVAL_ENV) or DEFAULT_INTERVAL)
        return cls(StatusClient.from_env(), interval=interval)

    # hooks ---------------------------------------------------------------------------------
    def on_start(self, info):
        patch: dict = {}
        if info.get("resolved"):
            patch["resolved"] = info["resolved"]
        if info.get("data"):
            patch["data"] = info["data"]
        if (info.get("tracking") or {}).get("mlflow"):
            patch["outputs"] = {"mlflow": dict(info["tracking"]["mlflow"])}
        progress = {"epochs": info.get("epochs"), "totalSteps": info.get("totalSteps")}
        if info.get("startStep") is not None:
            progress["step"] = info.get("startStep")
        if info.get("startEpoch") is not None:
            progress["epoch"] = info.get("startEpoch")
        if info.get("totalSteps") and info.get("startStep") is not None:
            progress["percent"] = round(100.0 * info["startStep"] / info["totalSteps"], 2)
        patch["progress"] = progress_fields({k: v for k, v in progress.items() if v is not None})
        self._queue(patch, now=True)

    def on_mined(self, counts):
        self._queue({"hardNegatives": dict(counts)}, now=True)

    def on_step(self, progress):
        stage = {"stage": TRAINING, "stageDone": progress.get("step"), "stageTotal": progress.get("totalSteps"),
                 "stageText": TRAINING}
        self._queue({"progress": {**progress_fields(progress), **stage}}, now=False)

    def on_stage(self, stage, done, total):
        """A stage's start goes at once, its progress with the next throttled patch; each moves
        updatedAt, which the operator's hang watchdog reads."""
        text = f"{stage}({done}/{total})" if total else stage  # one word: kubectl's columns split on spaces
        fields = {"stage": stage, "stageDone": done, "stageTotal": total, "stageText": text, "updatedAt": utc_now()}
        self._queue({"progress": {k: v for k, v in fields.items() if v is not None}}, now=done == 0)

    def on_checkpoint(self, checkpoint):
        self._queue({"checkpoints": {"latest": dict(checkpoint)}}, now=True, checkpoint=dict(checkpoint))

    def on_eval(self, event):
        self._queue(eval_patch(event), now=True)

    def on_end(self, summary):
        patch: dict = {}
        step, total = summary.get("step"), summary.get("totalSteps")
        if step is not None:
            progress = {"step": step, "totalSteps": total, "epoch": summary.get("epoch"),
                        "epochs": summary.get("epoch"), "loss": summary.get("finalLoss")}
            if total:
                progress["percent"] = round(100.0 * step / total, 2)
            patch["progress"] = progress_fields({k: v for k, v in progress.items() if v is not None})
        evals = summary.get("eval") if isinstance(summary.get("eval"), Mapping) else {}
        metrics = {k: evals[k] for k in ("before", "after", "selectBy", "sets") if evals.get(k)}
        if metrics:
            patch["metrics"] = metrics
        saved = summary.get("checkpoints")
        if isinstance(saved, list) and saved:
            self._saved = list(saved)[-MAX_SAVED:]
            patch["checkpoints"] = {"latest": saved[-1], "saved": list(self._saved)}
        if summary.get("outputs"):
            patch["outputs"] = dict(summary["outputs"])
        self._queue(patch, now=True)

    def close(self):
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 15)
        else:
            self.flush()

    # machinery -----------------------------------------------------------------------------
    def _queue(self, patch: Mapping[str, Any], now: bool, checkpoint: Optional[dict] = None) -> None:
        with self._cv:
            if checkpoint is not None:
                self._pending.setdefault("_new_checkpoints", []).append(checkpoint)
            _merge(self._pending, patch)
            due = self.clock() if now else max(self._last_sent + self.interval, self.clock())
            self._due = due if self._due is None else min(self._due, due)
            self._cv.notify_all()
        if self._thread is None and self._due is not None and self._due <= self.clock():
            self.flush()

    def _take(self) -> dict:
        with self._cv:
            pending, self._pending, self._due = self._pending, {}, None
        return pending

    def _with_saved(self, pending: dict) -> dict:
        """``pending`` with the full saved-checkpoints list (merge patches replace lists)."""
        new = pending.pop("_new_checkpoints", None)
        if new:
            if self._saved is None:
                try:
                    current = self.client.get_status()
                    self._saved = list(((current.get("checkpoints") or {}).get("saved")) or [])
                except Exception as exc:  # keep going with what this run saw
                    log.debug("could not read the current status: %s", exc)
                    self._saved = []
            for c in new:
                self._saved = [s for s in self._saved if s.get("uri") != c.get("uri")] + [c]
            self._saved = self._saved[-MAX_SAVED:]
            pending.setdefault("checkpoints", {})["saved"] = list(self._saved)
        return pending

    def flush(self) -> bool:
        """Send what is pending now; False (and keep it for later) when sending failed."""
        pending = self._with_saved(self._take())
        if not pending:
            return True
        body = conform(pending, self.schema) or {}
        if not body:
            return True
        try:
            self.client.patch_status(body)
        except Exception as exc:
            self._errors += 1
            if self._errors == 1 or self._errors % 20 == 0:
                log.warning("could not report status (training continues; %d failure(s) so far): %s",
                            self._errors, exc)
            with self._cv:  # put it back under anything newer
                newer, self._pending = self._pending, pending
                new_ckpts = newer.pop("_new_checkpoints", None)
                _merge(self._pending, newer)
                if new_ckpts:
                    self._pending["_new_checkpoints"] = new_ckpts
                retry = self.clock() + min(30.0, self.interval * (2 ** min(self._errors, 3)))
                self._due = retry if self._due is None else min(self._due, retry)
            return False
        self._last_sent = self.clock()
        self._errors = 0
        self.sent.append(body)
        del self.sent[:-50]
        return True

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed:
                    if self._due is not None and self.clock() >= self._due:
                        break
                    timeout = None if self._due is None else max(0.0, self._due - self.clock())
                    self._cv.wait(timeout)
                closing = self._closed
            self.flush()
            if closing:
                # One last try for anything a failed send left behind.
                if self._pending:
                    self.flush()
                return


def make_reporter(resolved: Any = None) -> StatusReporter:
    """The trainer's hook: a reporter for the TrainJob named in the pod's environment."""
    return StatusReporter.from_env()
