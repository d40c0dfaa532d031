"""Read back what a run wrote into its output folder: progress.jsonl, summary.json, gallery.json.

The HTML report, the PNG plots and the model card are all rebuilt from these files alone,
so ``kontrast report`` works on a finished run, on a run in progress (no summary yet) and
on an output folder copied elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import storage
from ..layout import OutputFolder

@dataclass
class RunFiles:
    output: str
    events: list[dict[str, Any]] = field(default_factory=list)   #: progress.jsonl, in order
    summary: Optional[dict[str, Any]] = None                      #: None while the run is going
    gallery: Optional[dict[str, Any]] = None

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    @property
    def start(self) -> dict[str, Any]:
        """The last start event (a resumed run appends a new one)."""
        starts = self.of("start")
        return starts[-1] if starts else {}

    def eval_set_names(self) -> list[str]:
        """The eval sets' names, the selecting (first) one first; [] for a run written before
        evaluations named their sets."""
        names: list[str] = []
        for e in self.of("eval"):
            names += [n for n in e.get("sets") or {} if n not in names]
        return names

    def eval_table(self, eval_set: Optional[str] = None) -> tuple[list[str], list[list[Any]]]:
        """Header and rows (phase, epoch, each metric) of every evaluation, in order: of the
        set named ``eval_set``, by default of the first."""
        evals = self.of("eval")
        tables = [(e.get("sets") or {}).get(eval_set) if eval_set else e.get("metrics") for e in evals]
        keys: list[str] = []
        for t in tables:
            keys += [k for k, v in (t or {}).items() if isinstance(v, float) and k not in keys]
        rows = [[e.get("phase"), e.get("epoch")] + [t.get(k) for k in keys] for e, t in zip(evals, tables) if t]
        return ["phase", "epoch", *keys], rows

    def steps(self) -> list[dict[str, Any]]:
        """Step events, later ones winning when a resumed run repeats a step."""
        by_step: dict[int, dict[str, Any]] = {}
        for e in self.of("step"):
            by_step[int(e["step"])] = e
        return [by_step[s] for s in sorted(by_step)]


def _read_text(location: str) -> Optional[str]:
    if not storage.exists(location):
        return None
    with storage.open_read(location) as f:
        return f.read().decode("utf-8")


def _read_json(location: str) -> Optional[dict[str, Any]]:
    text = _read_text(location)
    return json.loads(text) if text else None


def read_events(text: str) -> list[dict[str, Any]]:
    """JSON lines; a torn last line (a run writing as we read) is ignored."""
    events = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def read_run(output: str) -> RunFiles:
    folder = OutputFolder(output)
    parts = [_read_text(part) for part in folder.progress_parts()]
    progress = "".join(p for p in parts if p is not None) if parts else None
    if progress is None and not storage.exists(folder.summary):
        raise FileNotFoundError(f"{output}: neither {folder.PROGRESS} nor {folder.SUMMARY} is there; "
                                "is it a run's output folder?")
    return RunFiles(output=output, events=read_events(progress or ""), summary=_read_json(folder.summary),
                    gallery=_read_json(folder.gallery))
