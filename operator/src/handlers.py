"""kopf handlers: thin triggers around :class:`reconcile.Reconciler`.

Run with ``python -m kontrast.operator`` (or ``kopf run -m kontrast.operator.handlers
--standalone``). One replica, standalone: nothing to elect, no peering CRDs to install.

Triggers:

- TrainJob created, updated (only ``spec.scheduling`` may change) or seen at operator start
  (resume): reconcile; on an error kopf retries with backoff.
- Child Jobs and Pods (kontrast labels) changed: reconcile their TrainJob. Bursts of pod
  events collapse into one follow-up reconcile instead of one each.
- The active deadline: a timer, only on TrainJobs that have a deadline and may be running,
  so it fires without any event arriving. (kopf puts a finalizer on exactly those while the
  timer applies and removes it when the job finishes or suspends.)

Handlers return None: kopf would store return values in status, which the CRD's schema
prunes. Handler progress and the diff base live in ``kontrast.dev/`` annotations.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Mapping, Optional

import kopf

from kontrast.api import GROUP, PLURAL, VERSION

from . import metrics as metrics_mod
from . import render
from .lifecycle import PENDING, is_active
from .config import ENV_DEADLINE_CHECK, ENV_KUBECONFIG, OperatorConfig
from .kube import Kube, load_configuration
from .metrics import Metrics
from .reconcile import Reconciler

log = logging.getLogger("kontrast.operator")

ANNOTATION_PREFIX = "kontrast.dev"
FINALIZER = "kontrast.dev/deadline-timer"
RETRY_DELAYS = (1, 2, 5, 10, 30)
#: How often the deadline timer looks (read at import: kopf registers handlers then).
DEADLINE_CHECK_SECONDS = float(os.environ.get(ENV_DEADLINE_CHECK) or 5.0)


class _State:
    """Per-operator-run state (rebuilt at each start, so an in-process restart starts clean)."""

    def __init__(self) -> None:
        self.config: OperatorConfig = OperatorConfig()
        self.kube: Optional[Kube] = None
        self.reconciler: Optional[Reconciler] = None
        self.metrics = Metrics()
        self.metrics_runner: Any = None
        self.running: set[tuple[str, str]] = set()
        self.dirty: set[tuple[str, str]] = set()


STATE = _State()


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


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = FINALIZER
    settings.peering.standalone = True
    # Strict mode: serve the TrainJob CRD found at startup and the namespaces named on the
    # command line; no cluster-wide list/watch of CRDs or namespaces (least privilege).
    settings.scanning.disabled = True
    # Only our explicit milestone/failure events become Kubernetes Events, not kopf's log lines.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 8
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330

    STATE.__init__()
    STATE.config = OperatorConfig.from_env()
    STATE.kube = Kube(load_configuration(_kubeconfig()))
    STATE.reconciler = Reconciler(STATE.kube, STATE.config, STATE.metrics, _post_event)
    if STATE.config.metrics_port:
        try:
            STATE.metrics_runner = await metrics_mod.serve(STATE.metrics, "0.0.0.0", STATE.config.metrics_port)
        except OSError as exc:
            log.warning("metrics endpoint disabled: %s", exc)
    log.info("kontrast operator started; trainer image %s", STATE.config.trainer_image)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if STATE.metrics_runner is not None:
        await STATE.metrics_runner.cleanup()
        STATE.metrics_runner = None
    if STATE.kube is not None:
        STATE.kube.close()


async def _reconcile_now(namespace: str, name: str) -> None:
    assert STATE.reconciler is not None
    plan = await asyncio.to_thread(STATE.reconciler.reconcile, namespace, name)
    if plan is not None and plan.requeue_after:
        # A time-based rule (e.g. waiting for old pods at most so long): an explicit wake-up,
        # not a hope that some event arrives.
        loop = asyncio.get_running_loop()
        loop.call_later(plan.requeue_after, lambda: asyncio.ensure_future(trigger(namespace, name)))


async def trigger(namespace: str, name: str) -> None:
    """Reconcile soon; events arriving meanwhile collapse into one more pass. Errors retry."""
    key = (namespace, name)
    if key in STATE.running:
        STATE.dirty.add(key)
        return
    STATE.running.add(key)
    try:
        attempt = 0
        while True:
            STATE.dirty.discard(key)
            try:
                await _reconcile_now(namespace, name)
                attempt = 0
            except Exception as exc:  # an event handler has no retries of its own
                if attempt >= len(RETRY_DELAYS):
                    log.error("giving up reconciling %s/%s after errors: %s", namespace, name, exc)
                    return
                log.warning("reconciling %s/%s failed (%s); retrying in %ss", namespace, name, exc,
                            RETRY_DELAYS[attempt])
                await asyncio.sleep(RETRY_DELAYS[attempt])
                attempt += 1
                STATE.dirty.add(key)
            if key not in STATE.dirty:
                return
    finally:
        STATE.running.discard(key)


# --- TrainJobs ----------------------------------------------------------------------------
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def trainjob_changed(namespace: str, name: str, **_: Any) -> None:
    try:
        await _reconcile_now(namespace, name)
    except Exception as exc:
        raise kopf.TemporaryError(f"reconcile failed: {exc}", delay=10) from exc


@kopf.on.event(GROUP, VERSION, PLURAL)
def trainjob_seen(event: Mapping[str, Any], namespace: str, name: str, status: Mapping[str, Any], **_: Any) -> None:
    """Keep the jobs-by-phase gauge current (cheap: no API call)."""
    if event.get("type") == "DELETED":
        if STATE.reconciler is not None:
            STATE.reconciler.forget(namespace, name)
        else:
            STATE.metrics.set_phase(namespace, name, None)
    else:
        STATE.metrics.set_phase(namespace, name, (status or {}).get("phase") or PENDING)


def _has_deadline(spec: Mapping[str, Any], status: Mapping[str, Any], meta: Mapping[str, Any], **_: Any) -> bool:
    return (bool((spec.get("scheduling") or {}).get("activeDeadlineSeconds"))
            and is_active({"status": dict(status or {})}) and not meta.get("deletionTimestamp"))


@kopf.timer(GROUP, VERSION, PLURAL, interval=DEADLINE_CHECK_SECONDS, initial_delay=1.0, when=_has_deadline)
async def deadline_timer(namespace: str, name: str, **_: Any) -> None:
    """Reconcile jobs with a deadline even when nothing else happens (kubeflow/trainer#3358)."""
    await trigger(namespace, name)


# --- children -----------------------------------------------------------------------------
def _owner(meta: Mapping[str, Any]) -> Optional[str]:
    return (meta.get("annotations") or {}).get(render.ANNOTATION_TRAINJOB)


@kopf.on.event("batch", "v1", "jobs", labels={render.LABEL_TRAINJOB: kopf.PRESENT})
async def job_event(meta: Mapping[str, Any], namespace: str, **_: Any) -> None:
    owner = _owner(meta)
    if owner:
        await trigger(namespace, owner)


@kopf.on.event("", "v1", "pods", labels={render.LABEL_TRAINJOB: kopf.PRESENT})
async def pod_event(meta: Mapping[str, Any], namespace: str, **_: Any) -> None:
    owner = _owner(meta)
    if owner:
        await trigger(namespace, owner)
