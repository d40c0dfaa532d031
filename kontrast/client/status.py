"""Typed, read-only views of a TrainJob and its status (pure: no kubernetes import).

The operator writes ``status.phase``, ``status.conditions`` and ``status.message``; the
trainer's rank 0 writes ``status.progress``, ``status.metrics``, ``status.checkpoints`` and
``status.outputs`` (crds/trainjob.yaml documents every field). A :class:`Snapshot` is one
observed version of the object, parsed into dataclasses; ``raw`` keeps the object itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Mapping, Optional

#: Phases after which nothing changes any more.
TERMINAL_PHASES = ("Succeeded", "Failed")

#: The evaluation metrics in the order the trainer reports them (others follow, sorted).
METRIC_ORDER = ("ndcg@10", "ndcg_exp@10", "mrr@10", "recall@10", "recall@100", "p@10", "map",
                "err@10", "rbp@0.8", "queries")


def _num(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse_time(value: Any) -> Optional[dt.datetime]:
    """An RFC 3339 timestamp of the API (``2026-01-02T03:04:05Z``, maybe with fractions)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class Progress:
    """``status.progress``: where training is (patched by rank 0 every few seconds)."""

    epoch: Optional[int] = None
    epochs: Optional[int] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    percent: Optional[float] = None
    loss: Optional[float] = None
    lr: Optional[float] = None
    samples_per_second: Optional[float] = None
    eta_seconds: Optional[float] = None
    grad_norm: Optional[float] = None
    updated_at: Optional[dt.datetime] = None

    @classmethod
    def from_status(cls, progress: Mapping[str, Any] | None) -> Optional["Progress"]:
        if not progress:
            return None
        p = progress
        return cls(epoch=_int(p.get("epoch")), epochs=_int(p.get("epochs")), step=_int(p.get("step")),
                   total_steps=_int(p.get("totalSteps")), percent=_num(p.get("percent")),
                   loss=_num(p.get("loss")), lr=_num(p.get("lr")),
                   samples_per_second=_num(p.get("samplesPerSecond")),
                   eta_seconds=_num(p.get("etaSeconds")), grad_norm=_num(p.get("gradNorm")),
                   updated_at=parse_time(p.get("updatedAt")))

    @property
    def fraction(self) -> Optional[float]:
        """Done share of the optimizer steps in [0, 1]."""
        if self.step is not None and self.total_steps:
            return min(1.0, max(0.0, self.step / self.total_steps))
        if self.percent is not None:
            return min(1.0, max(0.0, self.percent / 100.0))
        return None


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str = ""
    message: str = ""
    last_transition_time: Optional[dt.datetime] = None

    @classmethod
    def from_status(cls, c: Mapping[str, Any]) -> "Condition":
        return cls(type=str(c.get("type", "")), status=str(c.get("status", "Unknown")),
                   reason=str(c.get("reason") or ""), message=str(c.get("message") or ""),
                   last_transition_time=parse_time(c.get("lastTransitionTime")))

    @property
    def is_true(self) -> bool:
        return self.status == "True"


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation of ``status.metrics.history``: ``phase`` is before, epoch or after;
    ``metrics`` the first eval set's, ``sets`` each set's nDCG@10 by name (what the status keeps
    of every set per evaluation)."""

    epoch: Optional[int]
    phase: str
    metrics: dict[str, float]
    sets: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """``status.metrics``: retrieval metrics on evalData, or the first of evalSets (ndcg@10,
    mrr@10, recall@10, ...); ``sets``: every eval set's ``{"before", "latest", "after"}`` by name."""

    latest: dict[str, float] = dataclasses.field(default_factory=dict)
    before: dict[str, float] = dataclasses.field(default_factory=dict)
    after: dict[str, float] = dataclasses.field(default_factory=dict)
    epoch: Optional[int] = None
    history: tuple[Evaluation, ...] = ()
    select_by: Optional[str] = None
    sets: dict[str, dict[str, dict[str, float]]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_status(cls, metrics: Mapping[str, Any] | None) -> "Metrics":
        m = metrics or {}

        def table(value: Any) -> dict[str, float]:
            return {str(k): float(v) for k, v in (value or {}).items() if _num(v) is not None}

        def tables(value: Any) -> dict[str, dict[str, Any]]:
            return {str(k): v for k, v in (value or {}).items() if isinstance(v, Mapping)}

        history = tuple(Evaluation(epoch=_int(h.get("epoch")), phase=str(h.get("phase") or ""),
                                   metrics=table(h.get("metrics")),
                                   sets={n: table(t) for n, t in tables(h.get("sets")).items()})
                        for h in m.get("history") or [] if isinstance(h, Mapping))
        sets = {n: {phase: table(v) for phase, v in tables(t).items()} for n, t in tables(m.get("sets")).items()}
        return cls(latest=table(m.get("latest")), before=table(m.get("before")), after=table(m.get("after")),
                   epoch=_int(m.get("epoch")), history=history,
                   select_by=str(m["selectBy"]) if m.get("selectBy") else None, sets=sets)

    def __bool__(self) -> bool:
        return bool(self.latest or self.before or self.after or self.history)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One observed version of a TrainJob: its status parsed, the object in ``raw``."""

    name: str
    namespace: str
    uid: str
    resource_version: str
    phase: str
    message: str
    restarts: int
    conditions: tuple[Condition, ...]
    progress: Optional[Progress]
    metrics: Metrics
    outputs: dict[str, str]
    checkpoints: dict[str, Any]
    resolved: dict[str, Any]
    raw: dict[str, Any] = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> "Snapshot":
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        return cls(
            name=str(meta.get("name", "")), namespace=str(meta.get("namespace", "")),
            uid=str(meta.get("uid", "")), resource_version=str(meta.get("resourceVersion", "")),
            phase=str(status.get("phase") or ""), message=str(status.get("message") or ""),
            restarts=_int(status.get("restarts")) or 0,
            conditions=tuple(Condition.from_status(c) for c in status.get("conditions") or []
                             if isinstance(c, Mapping)),
            progress=Progress.from_status(status.get("progress")),
            metrics=Metrics.from_status(status.get("metrics")),
            outputs={str(k): str(v) for k, v in (status.get("outputs") or {}).items()},
            checkpoints=dict(status.get("checkpoints") or {}),
            resolved=dict(status.get("resolved") or {}),
            raw=dict(obj),
        )

    # -- conditions ------------------------------------------------------------------------
    def condition(self, ctype: str) -> Optional[Condition]:
        for c in self.conditions:
            if c.type == ctype:
                return c
        return None

    # -- outcome ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def succeeded(self) -> bool:
        return self.phase == "Succeeded"

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"

    @property
    def reason(self) -> str:
        """The reason of the condition of the current phase (e.g. RestartLimitExceeded)."""
        c = self.condition(self.phase) if self.phase else None
        return c.reason if c else ""

    @property
    def outcome_message(self) -> str:
        """status.message, else the message of the current phase's condition."""
        if self.message:
            return self.message
        c = self.condition(self.phase) if self.phase else None
        return c.message if c else ""

    # -- progress --------------------------------------------------------------------------
    def eta_seconds(self, steps_per_second: Optional[float] = None) -> Optional[float]:
        """Seconds left, from the steps left and the rate (see :func:`eta_seconds`)."""
        return eta_seconds(self.progress, self.resolved.get("globalBatchSize"), steps_per_second)


def eta_seconds(progress: Optional[Progress], global_batch_size: Any = None,
                steps_per_second: Optional[float] = None) -> Optional[float]:
    """Seconds until the last optimizer step: (totalSteps - step) / steps per second.

    The rate is samples/s divided by the rows of one optimizer step (status.resolved's
    globalBatchSize), else ``steps_per_second`` as a watcher measured it between two
    progress updates, else the trainer's own etaSeconds is returned as is.
    """
    if progress is None:
        return None
    left = None
    if progress.step is not None and progress.total_steps is not None:
        left = max(0, progress.total_steps - progress.step)
    gbs = _num(global_batch_size)
    rate = None
    if progress.samples_per_second and gbs:
        rate = progress.samples_per_second / gbs
    elif steps_per_second and steps_per_second > 0:
        rate = steps_per_second
    if left is not None and rate:
        return left / rate
    if left == 0:
        return 0.0
    return progress.eta_seconds
