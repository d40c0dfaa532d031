"""Turn successive snapshots of a TrainJob into change events, and print them (pure).

:class:`Follower` compares each new :class:`~kontrast.client.status.Snapshot` with the
previous one and says what changed: the phase, a condition, the progress, a new evaluation.
:class:`Printer` writes those events for a person: on a terminal the progress is one line
redrawn in place; anywhere else (a pipe, a CI log) every line is a plain, complete line.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, TextIO, Union

from kontrast.display import format_duration

from .status import METRIC_ORDER, Condition, Evaluation, Progress, Snapshot


@dataclasses.dataclass(frozen=True)
class PhaseChanged:
    phase: str
    previous: Optional[str]


@dataclasses.dataclass(frozen=True)
class ConditionChanged:
    condition: Condition
    previous: Optional[Condition]


@dataclasses.dataclass(frozen=True)
class ProgressUpdated:
    progress: Progress
    eta_seconds: Optional[float]


@dataclasses.dataclass(frozen=True)
class EvaluationLanded:
    evaluation: Evaluation


@dataclasses.dataclass(frozen=True)
class Finished:
    snapshot: Snapshot


Event = Union[PhaseChanged, ConditionChanged, ProgressUpdated, EvaluationLanded, Finished]


def _same_condition(a: Condition, b: Condition) -> bool:
    return (a.status, a.reason, a.message) == (b.status, b.reason, b.message)


def _new_evaluations(prev: Optional[Snapshot], cur: Snapshot) -> list[Evaluation]:
    old = prev.metrics if prev is not None else None
    new = cur.metrics
    if new.history:
        seen = list(old.history) if old is not None else []
        if not seen:
            return list(new.history)
        # history keeps the newest 200: find where the last one seen sits now
        last = seen[-1]
        for i in range(len(new.history) - 1, -1, -1):
            if new.history[i] == last:
                return list(new.history[i + 1:])
        return list(new.history)
    if new.latest and (old is None or new.latest != old.latest):
        return [Evaluation(epoch=new.epoch, phase="", metrics=dict(new.latest))]
    return []


class Follower:
    """Keeps the last snapshot seen; :meth:`update` returns the events of a new one.

    It also measures the step rate between two progress updates (steps over the time between
    their ``updatedAt``), the fallback of the ETA when the status has no samples/s.
    """

    def __init__(self) -> None:
        self.last: Optional[Snapshot] = None
        self.steps_per_second: Optional[float] = None

    def update(self, snap: Snapshot) -> list[Event]:
        prev = self.last
        events: list[Event] = []
        if prev is None or snap.phase != prev.phase:
            if snap.phase:
                events.append(PhaseChanged(snap.phase, prev.phase if prev else None))
        for c in snap.conditions:
            old = prev.condition(c.type) if prev is not None else None
            if old is None or not _same_condition(old, c):
                events.append(ConditionChanged(c, old))
        for ev in _new_evaluations(prev, snap):
            events.append(EvaluationLanded(ev))
        p = snap.progress
        old_p = prev.progress if prev is not None else None
        if p is not None and p != old_p:
            self._measure(old_p, p)
            events.append(ProgressUpdated(p, snap.eta_seconds(self.steps_per_second)))
        if snap.done and (prev is None or not prev.done):
            events.append(Finished(snap))
        self.last = snap
        return events

    def _measure(self, old: Optional[Progress], new: Progress) -> None:
        if old is None or None in (old.step, new.step, old.updated_at, new.updated_at):
            return
        seconds = (new.updated_at - old.updated_at).total_seconds()
        if seconds > 0 and new.step > old.step:
            self.steps_per_second = (new.step - old.step) / seconds


def format_progress(p: Progress, eta: Optional[float], width: int = 20) -> str:
    """``epoch 2/5 [######--------------] 30% step 90/300 | loss 0.4123 | 812.3 samples/s | ETA 04:12``"""
    parts = []
    if p.epoch is not None:
        parts.append(f"epoch {p.epoch}/{p.epochs if p.epochs is not None else '?'}")
    frac = p.fraction
    if frac is not None:
        filled = int(round(frac * width))
        parts.append(f"[{'#' * filled}{'-' * (width - filled)}] {frac * 100:3.0f}%")
    if p.step is not None:
        parts.append(f"step {p.step}/{p.total_steps if p.total_steps is not None else '?'}")
    head = " ".join(parts) or "progress"
    tail = []
    if p.loss is not None:
        tail.append(f"loss {p.loss:.4f}")
    if p.samples_per_second is not None:
        tail.append(f"{p.samples_per_second:.1f} samples/s")
    tail.append(f"ETA {format_duration(eta)}")
    return " | ".join([head, *tail])


def format_metrics(metrics: dict[str, float]) -> str:
    keys = [k for k in METRIC_ORDER if k in metrics] + sorted(k for k in metrics if k not in METRIC_ORDER)
    return " | ".join(f"{k} {int(metrics[k])}" if k == "queries" else f"{k} {metrics[k]:.4f}" for k in keys)


def format_evaluation(ev: Evaluation) -> str:
    """The first eval set's metrics; with several sets a second line with each set's (what the
    status keeps of them: nDCG@10)."""
    when = {"before": "before training", "after": "after training"}.get(ev.phase)
    if when is None:
        when = f"epoch {ev.epoch}" if ev.epoch is not None else "latest"
    line = f"metrics {when}: {format_metrics(ev.metrics)}"
    if len(ev.sets) > 1:
        line += "\n  per eval set: " + " | ".join(
            f"{name} {' '.join(f'{k} {v:.4f}' for k, v in m.items())}" for name, m in ev.sets.items())
    return line


def format_condition(c: Condition) -> str:
    text = f"condition {c.type}={c.status}"
    if c.reason:
        text += f" ({c.reason})"
    if c.message:
        text += f": {c.message}"
    return text


def format_outcome(snap: Snapshot) -> str:
    """``Succeeded: Training completed`` or ``Failed (RestartLimitExceeded): ...``."""
    text = snap.phase
    if snap.failed and snap.reason:
        text += f" ({snap.reason})"
    if snap.outcome_message:
        text += f": {snap.outcome_message}"
    return text


class Printer:
    """Writes events to ``out``; with ``tty`` the progress line is redrawn in place (``\\r``).

    Without a terminal every event is one complete line and nothing is redrawn: a progress
    line is written for every new step reported (the trainer patches every few seconds).
    The outcome of a failed job goes to ``err``.
    """

    CLEAR = "\r\x1b[K"

    def __init__(self, out: TextIO, err: Optional[TextIO] = None, tty: Optional[bool] = None):
        self.out = out
        self.err = err if err is not None else out
        self.tty = bool(out.isatty()) if tty is None else tty
        self._bar: Optional[str] = None  # the progress line on screen (tty only)
        self._last_line: Optional[str] = None

    def line(self, text: str, stream: Optional[TextIO] = None) -> None:
        stream = stream or self.out
        if self.tty and self._bar is not None:
            self.out.write(self.CLEAR)
        stream.write(text + "\n")
        stream.flush()
        if self.tty and self._bar is not None:
            self.out.write(self._bar)
            self.out.flush()

    def progress(self, text: str) -> None:
        if self.tty:
            self._bar = text
            self.out.write(self.CLEAR + text)
            self.out.flush()
        elif text != self._last_line:
            self.out.write(text + "\n")
            self.out.flush()
        self._last_line = text

    def end_progress(self) -> None:
        if self.tty and self._bar is not None:
            self.out.write("\n")
            self.out.flush()
            self._bar = None

    def event(self, ev: Event) -> None:
        if isinstance(ev, PhaseChanged):
            self.line(f"phase {ev.phase}")
        elif isinstance(ev, ConditionChanged):
            self.line(format_condition(ev.condition))
        elif isinstance(ev, EvaluationLanded):
            self.line(format_evaluation(ev.evaluation))
        elif isinstance(ev, ProgressUpdated):
            self.progress(format_progress(ev.progress, ev.eta_seconds))
        elif isinstance(ev, Finished):
            self.end_progress()
            snap = ev.snapshot
            for key in ("report", "model", "plots", "tensorboard"):
                if snap.outputs.get(key):
                    self.line(f"output {key}: {snap.outputs[key]}")
            self.line(format_outcome(snap), self.err if snap.failed else self.out)

    def events(self, evs: Iterable[Event]) -> None:
        for ev in evs:
            self.event(ev)
