"""kopf handlers: thin triggers around :class:`reconcile.Reconciler`.

Run with ``python -m kontrast.operator`` (or ``kopf run -m kontrast.operator.handlers
--standalone``). One replica, standalone: nothing to elect, no peering CRDs to install.

Triggers, all funnelled through :func:`trigger` (one retry policy, bursts collapse):

- TrainJob created, updated (only ``spec.scheduling`` may change) or seen at operator start.
- Child Jobs and Pods changed; the Kueue Workload of a child Job changed (queued, admitted,
  preempted: what the TrainJob's Queued condition reports); a base child (ServiceAccount, Role, RoleBinding, Service,
  ConfigMap) deleted, so it is created again at once.
- A wake-up the last decision asked for (a deadline, the hang watchdog, a held attempt, a
  finished job's ttlSecondsAfterFinished) and
  the periodic resync of every TrainJob not finished: explicit ``call_later`` timers in the
  operator's memory, not kopf timers, so no finalizer ever blocks a deletion.

Every watch on children is scoped on the API server by the ``kontrast.dev/trainjob`` label
(``settings.watching.label_selectors``), so the operator's traffic does not grow with the
cluster's unrelated pods and Jobs. The operator's state (client, reconciler, wake-ups, which
base children exist) lives in kopf's ``memo``, rebuilt at each start.

Handlers return None: kopf would store return values in status, which the CRD's schema
prunes. Handler progress and the diff base live in ``kontrast.dev/`` annotations.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Optional

import kopf

from kontrast.api import GROUP, PLURAL, VERSION

from . import metrics as metrics_mod
from .children import names
from .config import ENV_KUBECONFIG, OperatorConfig
from .kube import Kube, load_configuration
from .lifecycle import kueue
from .lifecycle.objects import controller_uid
from .lifecycle.observed import record_of, recorded
from .lifecycle.phases import PENDING, TERMINAL
from .metrics import Metrics
from .reconcile import Reconciler

log = logging.getLogger("kontrast.operator")

ANNOTATION_PREFIX = "kontrast.dev"
#: The one retry policy: a failed reconcile is tried again after these delays, then at the
#: next resync.
RETRY_DELAYS = (1, 2, 5, 10, 30)
#: Children the operator watches, by (group, version, plural) and kind; all carry LABEL_TRAINJOB.
BASE_CHILDREN = {
    ("", "v1", "serviceaccounts"): "ServiceAccount",
    ("rbac.authorization.k8s.io", "v1", "roles"): "Role",
    ("rbac.authorization.k8s.io", "v1", "rolebindings"): "RoleBinding",
    ("", "v1", "services"): "Service",
    ("", "v1", "configmaps"): "ConfigMap",
}
WATCHED_CHILDREN = (("batch", "v1", "jobs"), ("", "v1", "pods"), *BASE_CHILDREN)
WORKLOADS = (kueue.GROUP, kueue.VERSION, kueue.PLURAL)


def _post_event(tj: Mapping[str, Any], etype: str, reason: str, message: str) -> None:
    body = {"apiVersion": tj.get("apiVersion"), "kind": tj.get("kind"),
            "metadata": {k: tj["metadata"].get(k) for k in ("name", "namespace", "uid")}}
    try:
        kopf.event(body, type=etype, reason=reason, message=message[:1024])
    except Exception:  # posting must never break reconciling (e.g. outside kopf's context)
        log.debug("could not post event %s for %s", reason, tj["metadata"].get("name"), exc_info=True)


def _kubeconfig() -> Optional[str]:
    return os.environ.get(ENV_KUBECONFIG) or None


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's own connection, from the same credentials as the reconciler's client."""
    cfg = load_configuration(_kubeconfig())
    token = None
    auth = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
    if cfg.refresh_api_key_hook is not None:
        cfg.refresh_api_key_hook(cfg)
        auth = cfg.api_key.get("authorization") or auth
    if auth:
        token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else auth
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme="Bearer" if token else None,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        default_namespace="default",
    )


def scope_watches(settings: kopf.OperatorSettings) -> None:
    """Let the API server filter every child watch by the TrainJob label."""
    for group, version, plural in WATCHED_CHILDREN:
        settings.watching.label_selectors[group, version, plural] = names.LABEL_TRAINJOB
    # Workloads carry no label of ours; Kueue labels every Workload of a Job with its uid.
    settings.watching.label_selectors[WORKLOADS] = kueue.JOB_UID_LABEL


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.peering.standalone = True
    # Strict mode: serve the TrainJob CRD found at startup and the namespaces named on the
    # command line; no cluster-wide list/watch of CRDs or namespaces (least privilege).
    settings.scanning.disabled = True
    # Only our explicit milestone/failure events become Kubernetes Events, not kopf's log lines.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 8
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    scope_watches(settings)

    memo.config = OperatorConfig.from_env()
    configuration = load_configuration(_kubeconfig())
    # a connection per reconcile thread, plus the resync's listings
    configuration.connection_pool_maxsize = memo.config.reconcile_workers + 4
    memo.kube = Kube(configuration)
    memo.metrics = Metrics()
    memo.reconciler = Reconciler(memo.kube, memo.config, memo.metrics, _post_event)
    memo.running, memo.dirty = set(), set()
    memo.wakeups = {}  # (namespace, name) -> asyncio.TimerHandle
    # TrainJob uid -> frozenset of (kind, name) of its base children that exist. Each value is
    # replaced, never changed in place, so a reconcile thread reads its own TrainJob's entry
    # without a copy of the whole map (one per queued pass took gigabytes at 2,000 TrainJobs).
    memo.children = {}
    # The uids of the TrainJobs that exist (their watch's view): the resync keeps children only
    # for these, so a child's late DELETED after its TrainJob's cannot keep an entry for good.
    memo.trainjobs = set()
    # Reconciles wait on the API server, not on the CPU: more threads than asyncio.to_thread's
    # default (cores + 4), and at most a quarter of them for periodic resyncs, so that at
    # thousands of TrainJobs the resyncs cannot queue ahead of a state change.
    memo.executor = ThreadPoolExecutor(memo.config.reconcile_workers, thread_name_prefix="reconcile")
    memo.resync_slots = asyncio.Semaphore(max(1, memo.config.reconcile_workers // 4))
    memo.job_owners = {}  # worker Job uid -> TrainJob name (to route Kueue Workload events)
    memo.children_refresh = asyncio.create_task(_refresh_children(memo))
    memo.metrics_runner = None
    if memo.config.metrics_port:
        try:
            memo.metrics_runner = await metrics_mod.serve(memo.metrics, "0.0.0.0", memo.config.metrics_port)
        except OSError as exc:
            log.warning("metrics endpoint disabled: %s", exc)
    log.info("kontrast operator started; trainer image %s", memo.config.trainer_image)


async def _refresh_children(memo: kopf.Memo) -> None:
    """Every resync period, which base children exist as the API server lists them (one LIST
    per kind), replacing what the watches told: after a relist (410 Gone, an API server
    restart) kopf sends no DELETED for what vanished meanwhile, so memory alone would never
    repair it. A TrainJob known before with none listed now has lost them all."""
    while True:
        await asyncio.sleep(memo.config.resync_seconds)  # the period of the resync, not a wait for a state
        try:
            listed = await asyncio.to_thread(memo.kube.base_children_seen, memo.config.watch_namespaces)
        except Exception as exc:  # noqa: BLE001 - the watches' view stays; try again next period
            log.warning("listing the base children failed (%s); trying again at the next resync", exc)
            continue
        # In place: each handler's memo is kopf's shallow copy of this one, sharing the dict,
        # not the attribute (a new dict here went unseen by every handler and wake-up).
        # Only for TrainJobs that exist: a listing that raced a deletion (children not yet
        # collected) or a child's DELETED after its TrainJob's would otherwise keep an entry.
        alive = memo.trainjobs
        known = {uid: frozenset() for uid in memo.children if uid in alive}
        known.update((uid, frozenset(kids)) for uid, kids in listed.items() if uid in alive)
        for uid in [uid for uid in memo.children if uid not in known]:
            del memo.children[uid]
        memo.children.update(known)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.children_refresh.cancel()
    for handle in memo.wakeups.values():
        handle.cancel()
    if memo.metrics_runner is not None:
        await memo.metrics_runner.cleanup()
    memo.kube.close()
    memo.executor.shutdown(wait=False, cancel_futures=True)


def _wake_up(memo: kopf.Memo, namespace: str, name: str, delay: float, periodic: bool = False) -> None:
    """Reconcile again in ``delay`` seconds (replacing any wake-up already planned);
    ``periodic``: the resync, which yields to passes that events ask for."""
    key = (namespace, name)
    old = memo.wakeups.pop(key, None)
    if old is not None:
        old.cancel()
    loop = asyncio.get_running_loop()
    memo.wakeups[key] = loop.call_later(
        delay, lambda: asyncio.ensure_future(trigger(memo, namespace, name, periodic=periodic)))


async def _reconcile_now(memo: kopf.Memo, namespace: str, name: str) -> None:
    def present(uid: str) -> Optional[frozenset]:
        """None for a TrainJob none of whose children were seen yet (just created, or the
        operator just started), so nothing is repaired by mistake."""
        kids = memo.children.get(uid)   # one atomic read of an immutable value
        return None if kids is None else frozenset(kind for kind, _ in kids)

    # in this task's context, as asyncio.to_thread would: kopf.event reads kopf's context variables
    context = contextvars.copy_context()
    plan = await asyncio.get_running_loop().run_in_executor(
        memo.executor, functools.partial(context.run, memo.reconciler.reconcile, namespace, name, present=present))
    if plan is None or plan.delete_trainjob or plan.status.get("phase") in TERMINAL:
        if plan is not None and plan.requeue_after is not None:
            _wake_up(memo, namespace, name, plan.requeue_after)   # a finished job's TTL, no resync
            return
        handle = memo.wakeups.pop((namespace, name), None)
        if handle is not None:
            handle.cancel()
        return
    # The next pass: when a time-based rule needs it, at the latest at the periodic resync.
    resync = memo.config.resync_seconds
    _wake_up(memo, namespace, name, min(plan.requeue_after or resync, resync),
             periodic=not plan.requeue_after or plan.requeue_after >= resync)


async def trigger(memo: kopf.Memo, namespace: str, name: str, periodic: bool = False) -> None:
    """Reconcile soon; events arriving meanwhile collapse into one more pass. Errors retry
    after RETRY_DELAYS, then at the next resync. A ``periodic`` pass (the resync) first waits
    for one of ``memo.resync_slots``, unmarked as running, so an event's pass never queues
    behind it; it is dropped if an event's pass came meanwhile (that pass plans the next)."""
    key = (namespace, name)
    if periodic:
        if key in memo.running:
            return
        async with memo.resync_slots:
            if key not in memo.running:
                await _passes(memo, namespace, name)
        return
    if key in memo.running:
        memo.dirty.add(key)
        return
    await _passes(memo, namespace, name)


async def _passes(memo: kopf.Memo, namespace: str, name: str) -> None:
    """Reconcile ``(namespace, name)`` until no event marked it dirty meanwhile."""
    key = (namespace, name)
    memo.running.add(key)
    try:
        attempt = 0
        while True:
            memo.dirty.discard(key)
            try:
                await _reconcile_now(memo, namespace, name)
                attempt = 0
            except Exception as exc:  # noqa: BLE001 - every error gets the same retries
                if attempt >= len(RETRY_DELAYS):
                    log.error("reconciling %s/%s keeps failing (%s); next try at the resync", namespace, name, exc)
                    _wake_up(memo, namespace, name, memo.config.resync_seconds, periodic=True)
                    return
                log.warning("reconciling %s/%s failed (%s); retrying in %ss", namespace, name, exc,
                            RETRY_DELAYS[attempt])
                await asyncio.sleep(RETRY_DELAYS[attempt])
                attempt += 1
                memo.dirty.add(key)
            if key not in memo.dirty:
                return
    finally:
        memo.running.discard(key)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def trainjob_changed(memo: kopf.Memo, namespace: str, name: str, **_: Any) -> None:
    await trigger(memo, namespace, name)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def trainjob_seen(event: Mapping[str, Any], memo: kopf.Memo, namespace: str, name: str, uid: str,
                        meta: Mapping[str, Any], status: Mapping[str, Any], **_: Any) -> None:
    """Keep the jobs-by-phase gauge current (cheap: no API call), and put back at once a
    status phase the operator did not decide (the trainer's token can write status)."""
    if event.get("type") == "DELETED":
        memo.reconciler.forget(namespace, name)
        memo.trainjobs.discard(uid)
        memo.children.pop(uid, None)
        handle = memo.wakeups.pop((namespace, name), None)
        if handle is not None:
            handle.cancel()
        return
    memo.trainjobs.add(uid)
    status = status or {}
    record = recorded({"metadata": meta})
    decided = record.get(names.ANNOTATION_PHASE)
    memo.metrics.set_phase(namespace, name, decided or status.get("phase") or PENDING)
    shown = record_of(status.get("phase"), status.get("restarts") or 0)
    if decided and record != shown and not meta.get("deletionTimestamp"):
        await trigger(memo, namespace, name)


def _owner(meta: Mapping[str, Any]) -> Optional[str]:
    return (meta.get("annotations") or {}).get(names.ANNOTATION_TRAINJOB)


@kopf.on.event("batch", "v1", "jobs", labels={names.LABEL_TRAINJOB: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={names.LABEL_TRAINJOB: kopf.PRESENT})
async def worker_event(memo: kopf.Memo, meta: Mapping[str, Any], namespace: str, **_: Any) -> None:
    owner = _owner(meta)
    if owner:
        await trigger(memo, namespace, owner)


@kopf.on.event("batch", "v1", "jobs", labels={names.LABEL_TRAINJOB: kopf.PRESENT}, id="job_owner")
def job_owner(event: Mapping[str, Any], memo: kopf.Memo, meta: Mapping[str, Any], uid: str, **_: Any) -> None:
    """Remember which TrainJob each worker Job belongs to, for the Workload events."""
    if event.get("type") == "DELETED":
        memo.job_owners.pop(uid, None)
    elif _owner(meta):
        memo.job_owners[uid] = _owner(meta)


@kopf.on.event(*WORKLOADS, labels={kueue.JOB_UID_LABEL: kopf.PRESENT})
async def workload_event(memo: kopf.Memo, labels: Mapping[str, str], namespace: str, **_: Any) -> None:
    """Kueue queued, admitted or evicted a worker Job: its TrainJob says so. (Without Kueue's
    CRDs at start, kopf only warns that it cannot watch Workloads.)"""
    owner = memo.job_owners.get(labels.get(kueue.JOB_UID_LABEL, ""))
    if owner:
        await trigger(memo, namespace, owner)


def _base_child_handler(kind: str):
    async def base_child_event(event: Mapping[str, Any], memo: kopf.Memo, meta: Mapping[str, Any],
                               namespace: str, name: str, **_: Any) -> None:
        """Track which base children exist; one that disappears is created again at once."""
        uid, owner = controller_uid({"metadata": meta}), _owner(meta)
        if not uid or not owner:
            return
        kids = memo.children.get(uid, frozenset())
        if event.get("type") == "DELETED":
            memo.children[uid] = kids - {(kind, name)}
            await trigger(memo, namespace, owner)
        elif (kind, name) not in kids:
            memo.children[uid] = kids | {(kind, name)}
    base_child_event.__name__ = base_child_event.__qualname__ = f"{kind.lower()}_event"
    return base_child_event


for (_group, _version, _plural), _kind in BASE_CHILDREN.items():
    kopf.on.event(_group, _version, _plural, labels={names.LABEL_TRAINJOB: kopf.PRESENT},
                  id=f"{_kind.lower()}_event")(_base_child_handler(_kind))
