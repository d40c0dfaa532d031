"""Phase names, condition types, and reading and writing conditions (of any object's status)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Mapping, Optional

PENDING, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED = (
    "Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
TERMINAL = frozenset({SUCCEEDED, FAILED})
CONDITION_TYPES = ("Created", "Queued", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
#: The condition that is True in each phase (Pending has none).
PHASE_CONDITION = {RUNNING: "Running", RESTARTING: "Restarting", SUSPENDED: "Suspended",
                   SUCCEEDED: "Succeeded", FAILED: "Failed"}
MESSAGE_LIMIT = 2000


def fmt_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: Optional[str]) -> Optional[dt.datetime]:
    if not s:
        return None
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def condition(status: Optional[Mapping[str, Any]], ctype: str) -> Optional[Mapping[str, Any]]:
    """The condition of type ``ctype`` in a status (a TrainJob's, Job's, Pod's or Workload's)."""
    return next((c for c in (status or {}).get("conditions") or [] if c.get("type") == ctype), None)


def condition_true(status: Optional[Mapping[str, Any]], ctype: str) -> bool:
    return (condition(status, ctype) or {}).get("status") == "True"


class Conditions:
    """Conditions keyed by type; lastTransitionTime moves only when the status flips."""

    def __init__(self, current: Iterable[Mapping[str, Any]], now: dt.datetime, generation: Optional[int]):
        self._by_type = {c["type"]: dict(c) for c in current or [] if "type" in c}
        self._now = fmt_time(now)
        self._generation = generation

    def set(self, ctype: str, status: bool, reason: str, message: str = "") -> None:
        value = "True" if status else "False"
        old = self._by_type.get(ctype)
        cond = {
            "type": ctype,
            "status": value,
            "reason": reason,
            "message": truncate(message),
            "lastTransitionTime": self._now if not old or old.get("status") != value else old.get(
                "lastTransitionTime", self._now),
        }
        if self._generation is not None:
            cond["observedGeneration"] = self._generation
        self._by_type[ctype] = cond

    def is_true(self, ctype: str) -> bool:
        return condition_true({"conditions": self._by_type.values()}, ctype)

    def as_list(self) -> list[dict[str, Any]]:
        order = {t: i for i, t in enumerate(CONDITION_TYPES)}
        return sorted(self._by_type.values(), key=lambda c: (order.get(c["type"], 99), c["type"]))
