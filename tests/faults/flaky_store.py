"""An object store that returns 503 for a while: a reverse proxy in front of the real S3
server (SeaweedFS, harness/s3.py) that answers the next ``fail(n)`` requests with S3's
``503 SlowDown`` and relays every other request unchanged (the Host header included, so
SigV4 signatures made for the proxy's address stay valid)."""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FlakyStore:
    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.to_fail, self.failed, self.relayed = 0, 0, 0
        self.in_flight: dict[int, tuple[str, str, float]] = {}   #: relayed requests not answered yet
        lock = threading.Lock()
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with lock:
                    failing = store.to_fail > 0
                    store.to_fail -= failing
                    store.failed += failing
                    store.relayed += not failing
                if failing:
                    return self.answer(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                store.in_flight[id(self)] = (self.command, self.path, time.monotonic())
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    upstream_conn.request(self.command, self.path, body=body, headers=headers)
                    resp = upstream_conn.getresponse()
                    data = resp.read()
                    dropped = HOP_BY_HOP | ({"content-length"} if self.command != "HEAD" else set())
                    self.answer(resp.status, {k: v for k, v in resp.getheaders() if k.lower() not in dropped}, data)
                finally:
                    store.in_flight.pop(id(self), None)
                    upstream_conn.close()

            def answer(self, status: int, headers: dict, body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if self.command != "HEAD" or "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))   # HEAD: the object's, as relayed
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def describe(self) -> str:
        """Counts, and the requests waiting on the upstream server (for a stuck run's failure)."""
        now = time.monotonic()
        waiting = [f"{method} {path} for {now - since:.0f} s" for method, path, since in list(self.in_flight.values())]
        return f"proxy: {self.relayed} relayed, {self.failed} failed, waiting on SeaweedFS: {waiting or 'none'}"

    def fail(self, n: int) -> None:
        """Answer the next ``n`` requests with 503 SlowDown."""
        self.to_fail = n

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
