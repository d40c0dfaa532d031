"""Progress reporting: one small interface, several sinks, never fatal.

A ``Reporter`` receives plain dicts (JSON-ready, camelCase keys matching the TrainJob's
``status``), so a cluster-status reporter can copy them into ``status.progress``,
``status.checkpoints``, ``status.metrics`` and ``status.resolved`` as they are:

* ``on_start(info)``: ``{"name", "resolved": {...}, "epochs", "totalSteps", "startStep",
  "startEpoch", "output"}`` (``resolved`` holds the model-dependent and derived values).
* ``on_step(progress)``: ``{"epoch", "epochs", "step", "totalSteps", "percent",
  "samplesPerSecond", "etaSeconds", "loss", "lr", "microBatchSize", "updatedAt"}``.
* ``on_checkpoint(checkpoint)``: ``{"uri", "epoch", "step", "time"}``.
* ``on_eval(event)``: ``{"phase": "before" | "epoch" | "after", "epoch", "metrics": {...}, "selectBy",
  "sets": {name: {...}}, "history", "best"}``: ``metrics`` is the first eval set's (``selectBy``),
  ``sets`` every set's (``run.evaluations``).
* ``on_mined(counts)``: hard negatives mined (spec.hardNegatives): ``{"mined", "dropped",
  "queries", "epoch"}``, as ``status.hardNegatives``.
* ``on_end(summary)``: the content of summary.json. A sink that publishes the run elsewhere
  (MLflow) adds where to ``summary["outputs"]``, for the sinks after it.
* ``close()``: always called, also after a failure.

Only rank 0 reports. ``Reporters`` fans out to several sinks and swallows their errors
(logging each failing sink once): a full disk or an API-server hiccup must not kill a
training run that is otherwise fine.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TextIO

from kontrast.display import format_duration

from .. import storage
from ..layout import OutputFolder
from ..locations import has_scheme

log = logging.getLogger(__name__)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reporter:
    """Base class: every hook is a no-op, so a sink implements only what it needs."""

    def on_start(self, info: dict[str, Any]) -> None:
        pass

    def on_step(self, progress: dict[str, Any]) -> None:
        pass

    def on_stage(self, stage: str, done: int, total: Optional[int]) -> None:
        """The set-up moved on (see :mod:`.heartbeat`): ``done`` of ``total`` items of ``stage``."""

    def on_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pass

    def on_eval(self, event: dict[str, Any]) -> None:
        pass

    def on_mined(self, counts: dict[str, Any]) -> None:
        pass

    def on_end(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Reporters(Reporter):
    """Calls every sink; an exception in one is logged (once per sink) and ignored."""

    def __init__(self, sinks: Iterable[Reporter] = ()):
        self.sinks = list(sinks)
        self._failed: set[int] = set()

    def _call(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a reporter must never stop training
                if id(sink) not in self._failed:
                    self._failed.add(id(sink))
                    log.warning("progress reporter %s failed in %s (training continues): %s",
                                type(sink).__name__, method, exc)
                else:
                    log.debug("progress reporter %s failed again in %s: %s", type(sink).__name__, method, exc)

    def on_start(self, info):
        self._call("on_start", info)

    def on_step(self, progress):
        self._call("on_step", progress)

    def on_stage(self, stage, done, total):
        self._call("on_stage", stage, done, total)

    def on_checkpoint(self, checkpoint):
        self._call("on_checkpoint", checkpoint)

    def on_eval(self, event):
        self._call("on_eval", event)

    def on_mined(self, counts):
        self._call("on_mined", counts)

    def on_end(self, summary):
        self._call("on_end", summary)

    def close(self):
        self._call("close")


def format_progress(p: dict[str, Any], width: int = 20) -> str:
    """One line: epoch, a bar, step, percent, loss, lr, gradient norm, samples/s, the data-wait
    share of the step time and ETA."""
    frac = min(1.0, max(0.0, p.get("percent", 0.0) / 100.0))
    filled = int(round(frac * width))
    bar = "#" * filled + "-" * (width - filled)
    loss = p.get("loss")
    sps = p.get("samplesPerSecond")
    return (f"epoch {p['epoch']}/{p['epochs']} [{bar}] step {p['step']}/{p['totalSteps']} "
            f"{p.get('percent', 0.0):5.1f}% | loss {loss:.4f} | lr {p.get('lr', 0.0):.2e} | "
            f"{_grad_and_wait(p)}{(sps or 0.0):.1f} samples/s | ETA {format_duration(p.get('etaSeconds'))}"
            if loss is not None else
            f"epoch {p['epoch']}/{p['epochs']} [{bar}] step {p['step']}/{p['totalSteps']}")


def _grad_and_wait(p: dict[str, Any]) -> str:
    """"grad 1.23 | data 5% | " when the step logged them: a large gradient norm and a large
    data-wait share are the first signs of a diverging or input-bound run."""
    text = ""
    if p.get("gradNorm") is not None:
        text += f"grad {p['gradNorm']:.3g} | "
    wait, compute = p.get("dataWaitSeconds"), p.get("computeSeconds")
    if wait is not None and compute is not None and wait + compute > 0:
        text += f"data {100.0 * wait / (wait + compute):.0f}% | "
    return text


def eval_scalars(event: dict[str, Any]) -> dict[str, float]:
    """The numbers of an eval event for a metrics store (TensorBoard, MLflow): the first set's
    as ``<metric>``, and with several sets every set's as ``<set>/<metric>`` too."""
    out = {k: float(v) for k, v in (event.get("metrics") or {}).items() if _number(v)}
    sets = event.get("sets") or {}
    if len(sets) > 1:
        out.update({f"{name}/{k}": float(v) for name, m in sets.items() for k, v in m.items() if _number(v)})
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_metrics(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


class TerminalReporter(Reporter):
    """A one-line progress bar on a terminal; plain lines every ``interval`` s otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, interval: float = 15.0, redraw: float = 0.2):
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval = interval if not self.tty else redraw
        self._last = 0.0
        self._open_line = False

    def _print(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def on_start(self, info):
        r = info.get("resolved", {})
        self._print(f"kontrast: training {info.get('name')} -> {info.get('output')}")
        self._print(f"  {info.get('totalSteps')} steps ({info.get('epochs')} epochs), global batch "
                    f"{r.get('globalBatchSize')}, peak lr {r.get('peakLr', 0):.3g}, device {r.get('device')}, "
                    f"precision {r.get('precision')}")
        if info.get("startStep"):
            self._print(f"  resuming after step {info['startStep']} (epoch {info.get('startEpoch')})")

    def on_step(self, p):
        now = time.monotonic()
        last_of_run = p.get("step") == p.get("totalSteps")
        if not last_of_run and now - self._last < self.interval:
            return
        self._last = now
        line = format_progress(p)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self._open_line = True
            self.stream.flush()
        else:
            self._print(line)

    def on_checkpoint(self, c):
        self._print(f"  saved checkpoint {c['uri']} (epoch {c['epoch']}, step {c['step']})")

    def on_eval(self, e):
        sets = e.get("sets") or {}
        if len(sets) > 1:   # one line per set, the selecting (first) one marked
            for i, (name, metrics) in enumerate(sets.items()):
                mark = " (selects)" if i == 0 else ""
                self._print(f"  eval {e['phase']} {name}{mark}: {format_metrics(metrics)}")
        else:
            self._print(f"  eval {e['phase']}: {format_metrics(e['metrics'])}")

    def on_mined(self, c):
        self._print(f"  hard negatives: {c['mined']} mined for {c['queries']} queries, "
                    f"{c['dropped']} dropped by the margin")

    def on_end(self, summary):
        self._print(f"kontrast: done in {format_duration(summary.get('durationSeconds'))}; "
                    f"summary in {summary.get('summaryUri')}")

    def close(self):
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


class JsonlReporter(Reporter):
    """Appends one JSON object per event to ``<output>/progress.jsonl``.

    Each line has ``event`` (start, step, checkpoint, eval, hardNegatives, end) and ``time``. A resumed
    run appends to the same file, so the log shows where it picked up. On object stores
    (no append) the lines go to a local spool file holding the current part of the log
    (``OutputFolder.progress_part``), uploaded whole at checkpoints, evaluations and the end,
    and otherwise at most every ``flush_every`` seconds. A part that reaches
    ``PROGRESS_PART_BYTES`` is uploaded a last time and the next one started, so an upload
    never carries more than a part, however long the run.
    """

    def __init__(self, location: str, flush_every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.location = location
        self.flush_every, self.clock = flush_every, clock
        self._last_flush = clock()
        self._pending = False
        self.remote = has_scheme(location)
        if self.remote:
            # ``location`` is an output folder's progress.jsonl: its parts are named beside it
            self.output = OutputFolder(location.rsplit("/", 1)[0])
            self._file = tempfile.NamedTemporaryFile("w+", encoding="utf-8", prefix="progress-", suffix=".jsonl")
            parts = self.output.progress_parts()
            self._part = max(len(parts) - 1, 0)     # a resumed run continues the last part
            if parts:
                with storage.open_read(parts[-1]) as f:
                    shutil.copyfileobj(io.TextIOWrapper(f, encoding="utf-8"), self._file)
        else:
            Path(location).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(location, "a", encoding="utf-8")

    def _write(self, event: str, payload: dict[str, Any], flush: bool = False) -> None:
        line = json.dumps({"event": event, "time": utc_now(), **payload}, sort_keys=False)
        self._file.write(line + "\n")
        self._file.flush()
        if not self.remote:
            return
        self._pending = True
        if self._file.tell() >= self.output.PROGRESS_PART_BYTES:
            self._upload()
            self._part += 1
            self._file.seek(0)
            self._file.truncate()
        elif flush or self.clock() - self._last_flush > self.flush_every:
            self._upload()

    def _upload(self) -> None:
        storage.upload(self._file.name, self.output.progress_part(self._part))
        self._last_flush, self._pending = self.clock(), False

    def on_start(self, info):
        self._write("start", info)

    def on_step(self, p):
        self._write("step", p)

    def on_checkpoint(self, c):
        self._write("checkpoint", c, flush=True)

    def on_eval(self, e):
        self._write("eval", e, flush=True)

    def on_mined(self, c):
        self._write("hardNegatives", c, flush=True)

    def on_end(self, summary):
        self._write("end", {"durationSeconds": summary.get("durationSeconds"),
                            "step": summary.get("step"), "epoch": summary.get("epoch")}, flush=True)

    def close(self):
        if self._file is None:
            return
        if self.remote and self._pending:
            self._upload()
        self._file.close()
        self._file = None
