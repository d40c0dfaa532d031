"""Observe -> decide -> act, once per trigger, serialised per TrainJob.

Every trigger (TrainJob created/updated/resumed, a child changed, a wake-up the last
decision asked for, the periodic resync) runs the same level-based reconcile: read the
TrainJob and its children from the API server, let :func:`lifecycle.plan.decide` choose,
then do exactly what the plan says. Re-running it is always safe: creation treats
AlreadyExists (of our own child) as success, deletes treat NotFound as success, and the
status patch only carries fields that changed.

Order of the actions: create (the new attempt records the restart budget it spent), hand
a held attempt on, repair missing children, write the status and post its events, and only
then delete Jobs or clean up. A status patch that fails therefore leaves every child in place, and the next
pass decides the same again: a success is never followed by a second training run.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any, Callable, Collection, Mapping, Optional

from . import policy
from .children.base import BASE_KINDS, base_children
from .children.job import children
from .config import OperatorConfig
from .kube import ChildConflict, Kube, api_error_message
from .lifecycle.plan import Plan, create_failed, decide
from .metrics import Metrics

log = logging.getLogger(__name__)

EventPoster = Callable[[Mapping[str, Any], str, str, str], None]  # (trainjob, type, reason, message)


def not_known(objs: list[dict[str, Any]], seen: Optional[Collection[str]]) -> list[dict[str, Any]]:
    """The children of ``objs`` not known to exist. A restart's new attempt needs only its Job:
    creating the five base children again costs five requests answered 409. When the
    TrainJob's base children were not seen yet (``seen`` None) all are created."""
    return objs if seen is None else [o for o in objs if o["kind"] not in seen]


class Reconciler:
    def __init__(self, kube: Kube, config: OperatorConfig, metrics: Optional[Metrics] = None,
                 post_event: Optional[EventPoster] = None):
        self.kube = kube
        self.config = config
        self.metrics = metrics or Metrics()
        self.post_event = post_event or (lambda tj, etype, reason, message: None)
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
        self.metrics.set_phase(namespace, name, None)

    def reconcile(self, namespace: str, name: str, now: Optional[dt.datetime] = None,
                  present: Optional[Callable[[str], Optional[Collection[str]]]] = None) -> Optional[Plan]:
        """``present(uid)``: the kinds of base children that exist for the TrainJob with that
        uid (from the operator's watches), or None when not known; missing ones are created
        again."""
        with self._lock(namespace, name):
            try:
                plan = self._reconcile(namespace, name, now or dt.datetime.now(dt.timezone.utc), present)
            except Exception as exc:
                self.metrics.reconciled(False)
                self.metrics.error(type(exc).__name__)
                raise
            self.metrics.reconciled(True)
            return plan

    def _reconcile(self, namespace: str, name: str, now: dt.datetime,
                   present: Optional[Callable[[str], Optional[Collection[str]]]]) -> Optional[Plan]:
        tj = self.kube.get_trainjob(namespace, name)
        if tj is None:
            self.forget(namespace, name)
            return None
        seen = present(tj["metadata"]["uid"]) if present else None
        missing = frozenset(BASE_KINDS) - frozenset(seen) if seen is not None else frozenset()
        plan = decide(tj, self.kube.list_jobs(tj), self.kube.list_pods(tj), now,
                      missing_children=missing, hang_after=self.config.hang_after(),
                      violations=policy.violations(tj.get("spec") or {}, self.config.policy), read=self.kube,
                      default_ttl=self.config.ttl_seconds_after_finished)
        self.execute(tj, plan, seen)
        return plan

    def execute(self, tj: Mapping[str, Any], plan: Plan, seen: Optional[Collection[str]] = None) -> None:
        """``seen``: the kinds of base children known to exist (None: not known)."""
        meta = tj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if plan.create is not None:
            c = plan.create
            self._create(tj, not_known(children(tj, c.attempt, c.restarts, self.config, c.reason, c.hold,
                                                c.active_deadline_seconds, c.queue), seen))
            if c.reason in ("PodFailed", "Disrupted", "Evicted", "Hung"):
                self.metrics.restarted(c.reason)
        if plan.release:
            self.kube.release_job(ns, plan.release, plan.release_queue, unpark=plan.release_unpark)
            log.info("released Job %s/%s (older attempts are gone)%s", ns, plan.release,
                     f" to LocalQueue {plan.release_queue}" if plan.release_queue else "")
        if plan.repair:
            self._create(tj, [o for o in base_children(tj, self.config) if o["kind"] in plan.repair])

        patch = plan.status_patch(tj.get("status") or {})
        if patch:
            self._patch_status(ns, name, patch)
        if plan.record:
            # After the status: a crash between the two leaves the older record, from which
            # the rules decide the same phase again (and write completionTime, ...).
            self._patch(ns, name, self.kube.annotate_trainjob, plan.record)
        self.metrics.set_phase(ns, name, plan.status.get("phase"))
        for event in plan.events:
            self.post_event(tj, event.type, event.reason, event.message)

        for job in plan.delete_jobs:
            if self.kube.delete_job(ns, job):
                log.info("deleted Job %s/%s", ns, job)
        if plan.cleanup:
            # Everything but the Jobs (already deleted above) and, of course, the TrainJob.
            self.kube.delete_children(reversed(base_children(tj, self.config)))
            log.info("cleaned up the children of %s/%s", ns, name)
        if plan.delete_trainjob and self.kube.delete_trainjob(tj):
            log.info("deleted TrainJob %s/%s: its ttlSecondsAfterFinished ran out", ns, name)

    def _create(self, tj: Mapping[str, Any], objs: list[dict[str, Any]]) -> None:
        """Create ``objs`` (existing ones of ours are fine); on failure say why in status."""
        meta = tj["metadata"]
        try:
            created = [o for o in objs if self.kube.create(o)]
        except Exception as exc:
            # Record why in status (not only in a log), keep everything else as it was: the
            # failed attempt stays the newest Job, so nothing is counted twice.
            message = f"could not create the children: {api_error_message(exc)}"
            self._patch_status(meta["namespace"], meta["name"], create_failed(tj, message, dt.datetime.now(dt.timezone.utc)))
            self.post_event(tj, "Warning", "CreateFailed", message)
            self.metrics.error("ChildConflict" if isinstance(exc, ChildConflict) else "CreateFailed")
            raise
        for obj in created:
            log.info("created %s %s/%s", obj["kind"], meta["namespace"], obj["metadata"]["name"])

    def _patch_status(self, ns: str, name: str, patch: Mapping[str, Any]) -> None:
        self._patch(ns, name, self.kube.patch_trainjob_status, patch)

    @staticmethod
    def _patch(ns: str, name: str, how: Callable[[str, str, Mapping[str, Any]], Any], patch: Mapping[str, Any]) -> None:
        try:
            how(ns, name, patch)
        except Exception as exc:  # e.g. deleted meanwhile
            if getattr(exc, "status", None) == 404:
                return
            raise
