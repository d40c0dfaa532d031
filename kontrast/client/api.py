"""The client proper: create, get, follow and wait for TrainJobs, and read worker logs.

It talks to the API server of the current kube context (``KUBECONFIG`` or ``~/.kube/config``,
else the in-cluster ServiceAccount) through the ``kubernetes`` package, imported only when a
:class:`Client` is made, so ``kontrast validate`` and the pure parts of this package work
without it. Following a TrainJob uses a watch (one long request, events pushed by the server),
never polling; a watch the server ends (its timeout) resumes from the last resourceVersion,
and one that expired (410 Gone) lists the object again and continues from there.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import yaml

from ..api import API_VERSION, GROUP, KIND, PLURAL, VERSION, TrainJobInvalid, apply_defaults, validate
from .follow import Event, Follower
from .pods import TRAINER_CONTAINER, select_worker_pod, worker_selector
from .status import Metrics, Snapshot

Source = Union[str, os.PathLike, Mapping[str, Any]]


class ClientError(Exception):
    """A request that did not work (no kubeconfig, server unreachable, refused)."""


class ApiRejected(ClientError):
    """The API server answered with an error Status: ``message`` and ``causes`` are its own."""

    def __init__(self, status: int, reason: str, message: str, causes: list[dict[str, str]] | None = None):
        self.status = status
        self.reason = reason
        self.message = message
        self.causes = causes or []
        lines = [message or f"HTTP {status} {reason}"]
        for c in self.causes:
            field = c.get("field")
            text = c.get("message") or c.get("reason") or ""
            # the Status message usually repeats every cause: add only what it does not say
            if text and text not in (message or ""):
                lines.append(f"  - {field}: {text}" if field else f"  - {text}")
        super().__init__("\n".join(lines))

    @property
    def not_found(self) -> bool:
        return self.status == 404


class TrainJobDeleted(ClientError):
    """The TrainJob was deleted while it was being followed."""


class WaitTimeout(ClientError):
    """No terminal phase within the time given; ``snapshot`` is the last state seen."""

    def __init__(self, message: str, snapshot: Optional[Snapshot]):
        self.snapshot = snapshot
        super().__init__(message)


class _Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


def _kubernetes():
    try:
        import kubernetes  # noqa: F401
        import kubernetes.client
        import kubernetes.config
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ClientError("the kubernetes package is needed to talk to a cluster: "
                          "pip install 'kontrast[client]'") from exc
    return kubernetes


def _rejected(exc: Exception) -> ClientError:
    """An ApiException as ApiRejected with the server's Status message and causes."""
    status = getattr(exc, "status", 0) or 0
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    parsed: Any = None
    if isinstance(body, str) and body:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
    if isinstance(parsed, dict):
        causes = [{k: str(v) for k, v in c.items()} for c in (parsed.get("details") or {}).get("causes") or []
                  if isinstance(c, dict)]
        return ApiRejected(int(parsed.get("code") or status), str(parsed.get("reason") or getattr(exc, "reason", "")),
                           str(parsed.get("message") or ""), causes)
    if status == 0:  # no HTTP answer at all
        return ClientError(f"cannot reach the API server: {getattr(exc, 'reason', None) or exc}")
    return ApiRejected(int(status), str(getattr(exc, "reason", "") or ""), str(body or getattr(exc, "reason", "")))


def _call(fn, *args, **kwargs):
    """Call a kubernetes API method; its errors become ApiRejected / ClientError."""
    kubernetes = _kubernetes()
    import urllib3

    try:
        return fn(*args, **kwargs)
    except kubernetes.client.exceptions.ApiException as exc:
        raise _rejected(exc) from None
    except urllib3.exceptions.HTTPError as exc:
        raise ClientError(f"cannot reach the API server: {exc}") from None


def read_documents(path: Union[str, os.PathLike]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The file's TrainJob (validated as ``kontrast validate`` does, else TrainJobInvalid) and
    the other objects beside it (e.g. the PersistentVolumeClaim of examples/cluster-cpu.yaml)."""
    from ..api import load_trainjob

    path = Path(path)
    load_trainjob(path)  # every local problem at once, naming the field
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    trainjob = next(d for d in docs if isinstance(d, dict) and d.get("kind") == KIND) if len(docs) > 1 else docs[0]
    others = [d for d in docs if d is not trainjob]
    bad = [d for d in others if not (isinstance(d, dict) and d.get("apiVersion") and d.get("kind")
                                      and (d.get("metadata") or {}).get("name"))]
    if bad:
        raise TrainJobInvalid(["every other document must be a Kubernetes object with apiVersion, kind "
                               "and metadata.name"], str(path))
    return trainjob, others


def check_trainjob(obj: Any, source: str | None = None) -> dict[str, Any]:
    """Validate a TrainJob dict the way ``kontrast validate`` does; raise TrainJobInvalid."""
    defaulted = apply_defaults(obj) if isinstance(obj, dict) else obj
    problems = validate(defaulted)
    if problems:
        raise TrainJobInvalid(problems, source)
    return dict(obj)


def _default_namespace(config_file: Optional[str], context: Optional[str]) -> Optional[str]:
    kubernetes = _kubernetes()
    try:
        contexts, current = kubernetes.config.list_kube_config_contexts(config_file=config_file)
    except Exception:
        return None
    chosen = current
    if context:
        chosen = next((c for c in contexts if c.get("name") == context), None)
    return ((chosen or {}).get("context") or {}).get("namespace")


class Client:
    """TrainJobs in a cluster, for notebooks and scripts.

    >>> from kontrast.client import Client
    >>> tj = Client().create("examples/cluster-cpu.yaml")
    >>> for snap in Client().stream(tj.name):
    ...     print(snap.phase, snap.progress)
    >>> result = Client().wait(tj.name, timeout=3600)
    >>> result.succeeded, result.metrics.after.get("ndcg@10")
    """

    def __init__(self, namespace: Optional[str] = None, *, context: Optional[str] = None,
                 config_file: Optional[str] = None, api_client: Any = None):
        kubernetes = _kubernetes()
        default_ns = None
        if api_client is None:
            config_file = config_file or os.environ.get("KUBECONFIG") or None
            try:
                api_client = kubernetes.config.new_client_from_config(
                    config_file=config_file, context=context, persist_config=False)
                default_ns = _default_namespace(config_file, context)
            except (kubernetes.config.ConfigException, OSError) as exc:
                if context or config_file or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                    raise ClientError(f"no usable kubeconfig: {exc}") from None
                conf = kubernetes.client.Configuration()
                kubernetes.config.load_incluster_config(client_configuration=conf)
                api_client = kubernetes.client.ApiClient(conf)
                try:
                    default_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
                except OSError:
                    default_ns = None
        self.api_client = api_client
        self.namespace = namespace or default_ns or "default"
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)

    def _ns(self, namespace: Optional[str]) -> str:
        return namespace or self.namespace

    # -- create ----------------------------------------------------------------------------
    def create(self, source: Source, *, namespace: Optional[str] = None, dry_run: bool = False) -> Snapshot:
        """Create a TrainJob from a dict or a YAML file and return it as the server stored it.

        It is validated locally first, as ``kontrast validate`` does (TrainJobInvalid lists
        every problem; nothing is sent). A file's other objects (a PersistentVolumeClaim
        beside the TrainJob) are created first when they do not exist yet, after the server
        accepted the TrainJob in a dry run. The server's refusal raises ApiRejected with its
        own message and causes.
        """
        others: list[dict[str, Any]] = []
        if isinstance(source, Mapping):
            obj = check_trainjob(dict(source))
        else:
            obj, others = read_documents(source)
        ns = self._namespace_of(obj, namespace)
        obj = {**obj, "metadata": {**(obj.get("metadata") or {}), "namespace": ns}}
        if others and not dry_run:
            # the server's checks first, so a TrainJob it refuses leaves nothing behind
            _call(self._custom.create_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, obj, dry_run="All")
        for other in others:
            self._create_if_absent(other, ns, dry_run)
        created = _call(self._custom.create_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, obj,
                        **({"dry_run": "All"} if dry_run else {}))
        return Snapshot.from_object(created)

    def _namespace_of(self, obj: Mapping[str, Any], namespace: Optional[str]) -> str:
        in_file = (obj.get("metadata") or {}).get("namespace")
        if in_file and namespace and in_file != namespace:
            raise TrainJobInvalid([f"metadata.namespace: the file says {in_file!r} but the namespace "
                                   f"asked for is {namespace!r}"])
        return in_file or self._ns(namespace)

    def _create_if_absent(self, obj: dict[str, Any], namespace: str, dry_run: bool) -> bool:
        """Create another object of a TrainJob file unless it exists; True when created."""
        from kubernetes import dynamic

        try:
            resource = dynamic.DynamicClient(self.api_client).resources.get(
                api_version=obj["apiVersion"], kind=obj["kind"])
        except Exception as exc:
            raise ClientError(f"{obj['kind']} {obj['metadata']['name']}: the cluster does not serve "
                              f"{obj['apiVersion']} {obj['kind']} ({exc})") from None
        kwargs: dict[str, Any] = {"body": obj}
        if resource.namespaced:
            kwargs["namespace"] = (obj.get("metadata") or {}).get("namespace") or namespace
        if dry_run:
            kwargs["query_params"] = [("dryRun", "All")]
        try:
            _call(resource.create, **kwargs)
        except ApiRejected as exc:
            if exc.status == 409:  # AlreadyExists: keep the one there (e.g. the data volume)
                return False
            raise ApiRejected(exc.status, exc.reason, f"{obj['kind']} {obj['metadata']['name']}: {exc.message}",
                              exc.causes) from None
        return True

    # -- read ------------------------------------------------------------------------------
    def get(self, name: str, namespace: Optional[str] = None) -> Snapshot:
        obj = _call(self._custom.get_namespaced_custom_object, GROUP, VERSION, self._ns(namespace), PLURAL, name)
        return Snapshot.from_object(obj)

    def metrics(self, name: str, namespace: Optional[str] = None) -> Metrics:
        """The evaluation metrics the trainer reported so far (``status.metrics``)."""
        return self.get(name, namespace).metrics

    def delete(self, name: str, namespace: Optional[str] = None) -> None:
        _call(self._custom.delete_namespaced_custom_object, GROUP, VERSION, self._ns(namespace), PLURAL, name)

    # -- follow ----------------------------------------------------------------------------
    def _list(self, name: str, ns: str) -> tuple[Optional[Snapshot], str]:
        """The object (None when absent) and the collection's resourceVersion to watch from."""
        out = _call(self._custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                    field_selector=f"metadata.name={name}")
        items = out.get("items") or []
        rv = str((out.get("metadata") or {}).get("resourceVersion") or "")
        if not items:
            return None, rv
        obj = items[0]
        obj.setdefault("apiVersion", API_VERSION)
        obj.setdefault("kind", KIND)
        return Snapshot.from_object(obj), rv

    def _watch(self, name: str, ns: str, rv: str, seconds: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """The events of one watch request; raises _Gone when ``rv`` expired."""
        try:
            resp = _call(self._custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                         field_selector=f"metadata.name={name}", watch=True, resource_version=rv,
                         allow_watch_bookmarks=True, timeout_seconds=seconds,
                         _preload_content=False, _request_timeout=(10, seconds + 30))
        except ApiRejected as exc:
            if exc.status == 410:
                raise _Gone() from None
            raise
        buf = b""
        try:
            for chunk in resp.stream(65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            raise _Gone()
                        raise ApiRejected(int(obj.get("code") or 500), str(obj.get("reason") or ""),
                                          str(obj.get("message") or obj))
                    yield str(event.get("type")), obj
        finally:
            resp.release_conn()

    def stream(self, name: str, namespace: Optional[str] = None, *, timeout: Optional[float] = None,
               until_done: bool = True, watch_seconds: int = 300) -> Iterator[Snapshot]:
        """Snapshots of a TrainJob as it changes: the current one first, then one per change.

        Ends after the first snapshot in a terminal phase (Succeeded, Failed) unless
        ``until_done`` is false. Raises ApiRejected (404) when there is no such TrainJob,
        TrainJobDeleted when it is deleted meanwhile and WaitTimeout after ``timeout`` seconds.
        ``watch_seconds`` bounds each watch request; the next one resumes where it ended.
        """
        ns = self._ns(namespace)
        deadline = time.monotonic() + timeout if timeout is not None else None
        snap, rv = self._list(name, ns)
        if snap is None:
            self.get(name, ns)  # the server's own "not found" message
            snap, rv = self._list(name, ns)
            if snap is None:
                raise TrainJobDeleted(f"TrainJob {ns}/{name} was deleted")
        yield snap
        if until_done and snap.done:
            return
        while True:
            seconds = watch_seconds
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"TrainJob {ns}/{name} is still {snap.phase or 'without a phase'} "
                                      f"after {timeout:g}s", snap)
                seconds = max(1, min(watch_seconds, math.ceil(left)))
            try:
                for etype, obj in self._watch(name, ns, rv, seconds):
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if etype == "BOOKMARK":
                        continue
                    if etype == "DELETED":
                        raise TrainJobDeleted(f"TrainJob {ns}/{name} was deleted")
                    new = Snapshot.from_object(obj)
                    if new.resource_version == snap.resource_version:
                        continue
                    snap = new
                    yield snap
                    if until_done and snap.done:
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        break
            except _Gone:
                new, rv = self._list(name, ns)
                if new is None:
                    raise TrainJobDeleted(f"TrainJob {ns}/{name} was deleted") from None
                if new.resource_version != snap.resource_version:
                    snap = new
                    yield snap
                    if until_done and snap.done:
                        return

    def events(self, name: str, namespace: Optional[str] = None, *, timeout: Optional[float] = None) -> Iterator[Event]:
        """What changes as the TrainJob runs: PhaseChanged, ConditionChanged, ProgressUpdated,
        EvaluationLanded and, last, Finished (see kontrast.client.follow)."""
        follower = Follower()
        for snap in self.stream(name, namespace, timeout=timeout):
            yield from follower.update(snap)

    def wait(self, name: str, namespace: Optional[str] = None, *, timeout: Optional[float] = None) -> Snapshot:
        """Block until the TrainJob is Succeeded or Failed and return that final snapshot
        (``.succeeded``, ``.reason``, ``.outcome_message``, ``.metrics``, ``.outputs``, ``.raw``).
        Raises WaitTimeout after ``timeout`` seconds and TrainJobDeleted if it is deleted."""
        snap = None
        for snap in self.stream(name, namespace, timeout=timeout):
            pass
        assert snap is not None
        return snap

    # -- pods and logs ---------------------------------------------------------------------
    def worker_pods(self, name: str, namespace: Optional[str] = None) -> list[dict[str, Any]]:
        """Every worker pod of the TrainJob (all attempts), as plain dicts."""
        out = _call(self._core.list_namespaced_pod, self._ns(namespace),
                    label_selector=worker_selector(name), _preload_content=False)
        data = json.loads(out.data)
        return data.get("items") or []

    def worker_pod(self, name: str, worker: int = 0, namespace: Optional[str] = None,
                   attempt: Optional[int] = None) -> dict[str, Any]:
        """The pod of worker ``worker`` in the newest attempt (raises pods.NoWorkerPod)."""
        return dict(select_worker_pod(self.worker_pods(name, namespace), name, worker, attempt))

    def logs(self, name: str, worker: int = 0, namespace: Optional[str] = None, *, follow: bool = False,
             attempt: Optional[int] = None, tail_lines: Optional[int] = None,
             pod: Optional[Mapping[str, Any]] = None) -> Iterator[str]:
        """The log of a worker's trainer container as text chunks; with ``follow`` until it ends.
        ``pod``: one :meth:`worker_pod` already chose (else it is looked up)."""
        if pod is None:
            pod = self.worker_pod(name, worker, namespace, attempt)
        kwargs: dict[str, Any] = {"container": TRAINER_CONTAINER, "follow": follow, "_preload_content": False}
        if tail_lines is not None:
            kwargs["tail_lines"] = tail_lines
        resp = _call(self._core.read_namespaced_pod_log, pod["metadata"]["name"], self._ns(namespace), **kwargs)
        try:
            for chunk in resp.stream(4096, decode_content=True):
                yield chunk.decode(errors="replace")
        finally:
            resp.release_conn()
