"""The thin edge to the API server: a few REST calls on plain dicts.

Uses the ``kubernetes`` client's transport (auth, TLS, token refresh) with its own
Configuration object, so the operator never touches the process-wide default client (tests run
the operator in-process beside admin clients).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from typing import Any, Iterable, Mapping, Optional, Sequence

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from kontrast.api import GROUP, PLURAL, VERSION

from .children import names
from .lifecycle import kueue

log = logging.getLogger(__name__)

# kind -> (api prefix, plural)
_PATHS = {
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    (f"{GROUP}/{VERSION}", "TrainJob"): (f"/apis/{GROUP}/{VERSION}", PLURAL),
}


#: The base children's (apiVersion, kind), as :data:`.children.base.BASE_KINDS` names them.
BASE_CHILD_TYPES = (("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
                    ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("v1", "Service"), ("v1", "ConfigMap"))


class ChildConflict(RuntimeError):
    """A child's deterministic name is taken by an object this TrainJob does not control."""


def load_configuration(kubeconfig: Optional[str] = None) -> k8s.Configuration:
    """In-cluster config when running in a pod, else the kubeconfig (explicit, or $KUBECONFIG)."""
    cfg = k8s.Configuration()
    if kubeconfig:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    elif os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        k8s_config.load_incluster_config(client_configuration=cfg)
    else:
        k8s_config.load_kube_config(client_configuration=cfg)
    return cfg


def _path(api_version: str, kind: str, namespace: str, name: Optional[str] = None, sub: str = "") -> str:
    prefix, plural = _PATHS[(api_version, kind)]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


class Kube:
    def __init__(self, configuration: k8s.Configuration):
        self.configuration = configuration
        self.api = k8s.ApiClient(configuration)

    def close(self) -> None:
        self.api.close()

    def request(self, method: str, path: str, body: Any = None, query: Optional[Mapping[str, Any]] = None,
                content_type: str = "application/json") -> Any:
        """One REST call through the client's urllib3 pool (its TLS settings, and its
        Configuration's bearer token, refreshed by the in-cluster hook). Plain urllib3, because
        the generated client's internals (``param_serialize``, ``call_api``, ``RESTResponse``)
        differ between kubernetes 36 and 37."""
        url = self.configuration.host.rstrip("/") + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        auth = self.configuration.auth_settings().get("BearerToken")
        if auth and auth.get("value"):
            headers[auth["key"]] = auth["value"]
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        resp = self.api.rest_client.pool_manager.request(method, url, headers=headers, body=data, timeout=30.0)
        if not 200 <= resp.status <= 299:
            exc = ApiException(status=resp.status, reason=resp.reason)
            exc.body = resp.data.decode(errors="replace")
            raise exc
        return json.loads(resp.data) if resp.data else None

    def get_trainjob(self, namespace: str, name: str) -> Optional[dict]:
        try:
            return self.request("GET", _path(f"{GROUP}/{VERSION}", "TrainJob", namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch_trainjob_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict:
        return self.request("PATCH", _path(f"{GROUP}/{VERSION}", "TrainJob", namespace, name, "status"),
                            body={"status": dict(patch)}, content_type="application/merge-patch+json")

    def annotate_trainjob(self, namespace: str, name: str, annotations: Mapping[str, str]) -> dict:
        return self.request("PATCH", _path(f"{GROUP}/{VERSION}", "TrainJob", namespace, name),
                            body={"metadata": {"annotations": dict(annotations)}},
                            content_type="application/merge-patch+json")

    def _list(self, api_version: str, kind: str, namespace: str, tj: Mapping[str, Any]) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in names.selector_labels(tj).items())
        items = self.request("GET", _path(api_version, kind, namespace), query={"labelSelector": selector})["items"]
        uid = tj["metadata"].get("uid")
        if api_version == "v1" and kind == "Pod":
            # Pods belong to Jobs; the annotation carries the full TrainJob name.
            name = tj["metadata"]["name"]
            return [p for p in items
                    if (p["metadata"].get("annotations") or {}).get(names.ANNOTATION_TRAINJOB) == name]
        return [i for i in items if _controlled_by(i, uid)]

    def base_children_seen(self, namespaces: Sequence[str] = ()) -> dict[str, set[tuple[str, str]]]:
        """Every TrainJob's base children as the API server lists them now: TrainJob uid ->
        {(kind, name)}. One LIST per kind (per watched namespace), filtered by our label, so it
        costs the same for any number of TrainJobs."""
        seen: dict[str, set[tuple[str, str]]] = {}
        for api_version, kind in BASE_CHILD_TYPES:
            prefix, plural = _PATHS[(api_version, kind)]
            paths = [f"{prefix}/namespaces/{ns}/{plural}" for ns in namespaces] or [f"{prefix}/{plural}"]
            for path in paths:
                for item in self.request("GET", path, query={"labelSelector": names.LABEL_TRAINJOB})["items"]:
                    owner = next((o.get("uid") for o in item["metadata"].get("ownerReferences") or []
                                  if o.get("controller")), None)
                    if owner:
                        seen.setdefault(owner, set()).add((kind, item["metadata"]["name"]))
        return seen

    def list_jobs(self, tj: Mapping[str, Any]) -> list[dict]:
        return self._list("batch/v1", "Job", tj["metadata"]["namespace"], tj)

    def list_pods(self, tj: Mapping[str, Any]) -> list[dict]:
        return self._list("v1", "Pod", tj["metadata"]["namespace"], tj)

    def create(self, obj: Mapping[str, Any]) -> bool:
        """Create ``obj``; True if created, False if it already exists (and is ours)."""
        meta = obj["metadata"]
        path = _path(obj["apiVersion"], obj["kind"], meta["namespace"])
        try:
            self.request("POST", path, body=obj)
            return True
        except ApiException as e:
            if e.status != 409:
                raise
        existing = self.request("GET", _path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"]))
        owner_uids = {o["uid"] for o in meta.get("ownerReferences", [])}
        if not any(_controlled_by(existing, uid) for uid in owner_uids):
            raise ChildConflict(
                f"{obj['kind']} {meta['namespace']}/{meta['name']} exists and is not controlled by this TrainJob")
        return False

    def release_job(self, namespace: str, name: str, queue: Optional[str] = None, unpark: bool = False) -> None:
        """Hand a held worker Job on: to Kueue (its queue label; Kueue unsuspends it when it
        admits it), or, without a queue, unsuspend it, first taking it out of the parking queue
        when ``unpark`` (Kueue lets a Job's queue label change only while it is suspended)."""
        path = _path("batch/v1", "Job", namespace, name)
        released = {names.ANNOTATION_HOLD: "false"}
        if queue:
            body: dict[str, Any] = {"metadata": {"labels": {names.KUEUE_QUEUE_LABEL: queue}, "annotations": released}}
        else:
            if unpark:
                self.request("PATCH", path, body={"metadata": {"labels": {names.KUEUE_QUEUE_LABEL: None}}},
                             content_type="application/merge-patch+json")
            body = {"metadata": {"annotations": released}, "spec": {"suspend": False}}
        self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def workload(self, job: Mapping[str, Any]) -> Optional[dict]:
        """Kueue's Workload of a Job (found by the job-uid label Kueue puts on it), or None,
        also when Kueue is not installed."""
        meta = job["metadata"]
        path = f"/apis/{kueue.GROUP}/{kueue.VERSION}/namespaces/{meta['namespace']}/{kueue.PLURAL}"
        try:
            items = self.request("GET", path, query={"labelSelector": f"{kueue.JOB_UID_LABEL}={meta['uid']}"})["items"]
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return kueue.workload_of(job, items)

    def failed_creates(self, job: Mapping[str, Any]) -> list[str]:
        """Why a Job could not create its pods, newest first: its FailedCreate events
        (ResourceQuota, PodSecurity, LimitRange... reject pods only there)."""
        meta = job["metadata"]
        selector = f"involvedObject.uid={meta['uid']},reason=FailedCreate"
        items = self.request("GET", f"/api/v1/namespaces/{meta['namespace']}/events",
                             query={"fieldSelector": selector})["items"]
        items.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "", reverse=True)
        return [e.get("message") or "" for e in items]

    def delete(self, api_version: str, kind: str, namespace: str, name: str, foreground: bool = False,
               uid: Optional[str] = None) -> bool:
        """Delete (NotFound is fine); ``uid``: only that object, never a successor of the same name."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1",
                "propagationPolicy": "Foreground" if foreground else "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", _path(api_version, kind, namespace, name), body=body)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def delete_trainjob(self, tj: Mapping[str, Any]) -> bool:
        """Delete this TrainJob (by uid); garbage collection removes its children afterwards."""
        meta = tj["metadata"]
        return self.delete(f"{GROUP}/{VERSION}", "TrainJob", meta["namespace"], meta["name"], uid=meta.get("uid"))

    def delete_job(self, namespace: str, name: str) -> bool:
        """Foreground: the Job stays visible until its pods are gone, so attempt numbers only grow
        and a new attempt never shares pod hostnames with a terminating one."""
        return self.delete("batch/v1", "Job", namespace, name, foreground=True)

    def delete_children(self, objs: Iterable[Mapping[str, Any]]) -> None:
        for obj in objs:
            self.delete(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])


def _controlled_by(obj: Mapping[str, Any], uid: Optional[str]) -> bool:
    return any(o.get("controller") and o.get("uid") == uid for o in (obj.get("metadata") or {}).get("ownerReferences") or [])


def api_error_message(exc: BaseException) -> str:
    """The API server's own message (e.g. a forbidden or invalid field), else the exception."""
    if isinstance(exc, ApiException) and exc.body:
        try:
            return json.loads(exc.body).get("message") or str(exc.body)
        except (ValueError, AttributeError):
            return str(exc.body)
    return str(exc)
