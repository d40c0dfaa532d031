"""Raw JSON requests to the API server, reusing a kubernetes.client.ApiClient's TLS and auth.

Why: the harness handles whole objects as plain dicts (status patches, watches, token
requests), which the typed client makes awkward; this keeps those calls short and explicit.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any, Iterator

import urllib3
from kubernetes import client as k8s_client


class ApiError(Exception):
    """A non-2xx answer from the API server; `status` is the HTTP code, `body` the Status object."""

    def __init__(self, method: str, path: str, status: int, body: Any):
        self.status = status
        self.body = body
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        self.message = body.get("message", str(body)) if isinstance(body, dict) else str(body)
        super().__init__(f"{method} {path}: HTTP {status} {self.reason}: {self.message}")


class Kube:
    """Minimal JSON client: request/get/post/patch/delete/watch on API paths."""

    MERGE = "application/merge-patch+json"
    STRATEGIC = "application/strategic-merge-patch+json"

    def __init__(self, api_client: k8s_client.ApiClient):
        self.api_client = api_client
        self.host = api_client.configuration.host.rstrip("/")

    def _send(self, method: str, path: str, body: Any, query: dict | None,
              content_type: str | None, timeout: float | tuple | None):
        """A raw urllib3 response (not preloaded, so a watch can stream it), sent through the
        client's pool with its bearer token; plain urllib3 because the generated client's
        internals differ between kubernetes 36 and 37."""
        url = self.host + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        auth = self.api_client.configuration.auth_settings().get("BearerToken")
        if auth and auth.get("value"):
            headers[auth["key"]] = auth["value"]
        data = None
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
            data = body if isinstance(body, (bytes, str)) else json.dumps(body).encode()
        if isinstance(timeout, tuple):
            timeout = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        return self.api_client.rest_client.pool_manager.request(
            method, url, headers=headers, body=data, timeout=timeout, preload_content=False)

    def request(self, method: str, path: str, body: Any = None, *, query: dict | None = None,
                content_type: str | None = None, timeout: float = 30) -> Any:
        resp = self._send(method, path, body, query, content_type, timeout)
        raw = resp.read()
        resp.release_conn()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        if not 200 <= resp.status < 300:
            raise ApiError(method, path, resp.status, parsed)
        return parsed

    def get(self, path: str, **query) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any, **query) -> Any:
        return self.request("POST", path, body, query=query or None)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any, content_type: str = MERGE) -> Any:
        return self.request("PATCH", path, body, content_type=content_type)

    def delete(self, path: str, body: Any = None) -> Any:
        return self.request("DELETE", path, body)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 30) -> Iterator[dict]:
        """Yield watch events ({type, object}) until the server closes the stream.

        An ERROR event (e.g. 410 Gone) is raised as ApiError so the caller re-lists.
        """
        query = {"watch": "true", "resourceVersion": resource_version,
                 "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        resp = self._send("GET", path, None, query, None, (10, timeout_seconds + 15))
        if resp.status != 200:
            raise ApiError("WATCH", path, resp.status, resp.read().decode(errors="replace"))
        raw = resp
        buf = b""
        try:
            for chunk in raw.stream(65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        obj = event.get("object") or {}
                        raise ApiError("WATCH", path, obj.get("code", 500), obj)
                    yield event
        finally:
            raw.release_conn()
