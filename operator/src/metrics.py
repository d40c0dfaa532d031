"""Prometheus metrics of the operator, in the text exposition format, over aiohttp.

No extra dependency: kopf already brings aiohttp. Exposed:

- ``kontrast_operator_reconciles_total{result="ok"|"error"}``  reconciliations done
- ``kontrast_operator_errors_total{kind=...}``                  failures (API errors, conflicts)
- ``kontrast_operator_restarts_total{reason=...}``              gang restarts decided
- ``kontrast_trainjobs{phase=...}``                              TrainJobs by phase (gauge)
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Mapping, Optional

PHASES = ("Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reconciles: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()
        self._phases: dict[tuple[str, str], str] = {}

    def reconciled(self, ok: bool) -> None:
        with self._lock:
            self.reconciles["ok" if ok else "error"] += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def restarted(self, reason: str) -> None:
        with self._lock:
            self.restarts[reason] += 1

    def set_phase(self, namespace: str, name: str, phase: Optional[str]) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase

    def phases(self) -> Mapping[str, int]:
        with self._lock:
            counts = Counter(self._phases.values())
        return {p: counts.get(p, 0) for p in (*PHASES, *sorted(set(counts) - set(PHASES)))}

    def render(self) -> str:
        with self._lock:
            reconciles, errors, restarts = dict(self.reconciles), dict(self.errors), dict(self.restarts)
        lines = [
            "# HELP kontrast_operator_reconciles_total TrainJob reconciliations, by result.",
            "# TYPE kontrast_operator_reconciles_total counter",
        ]
        for result in ("ok", "error"):
            lines.append(f'kontrast_operator_reconciles_total{{result="{result}"}} {reconciles.get(result, 0)}')
        lines += ["# HELP kontrast_operator_errors_total Errors while reconciling, by kind.",
                  "# TYPE kontrast_operator_errors_total counter"]
        for kind, n in sorted(errors.items()):
            lines.append(f'kontrast_operator_errors_total{{kind="{_escape(kind)}"}} {n}')
        lines += ["# HELP kontrast_operator_restarts_total Gang restarts decided, by reason.",
                  "# TYPE kontrast_operator_restarts_total counter"]
        for reason, n in sorted(restarts.items()):
            lines.append(f'kontrast_operator_restarts_total{{reason="{_escape(reason)}"}} {n}')
        lines += ["# HELP kontrast_trainjobs TrainJobs seen by the operator, by phase.",
                  "# TYPE kontrast_trainjobs gauge"]
        for phase, n in self.phases().items():
            lines.append(f'kontrast_trainjobs{{phase="{_escape(phase)}"}} {n}')
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def serve(metrics: Metrics, host: str, port: int):
    """Start ``/metrics`` on host:port; returns the aiohttp runner (call ``cleanup()`` to stop)."""
    from aiohttp import web

    async def handle(_request: "web.Request") -> "web.Response":
        return web.Response(text=metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
