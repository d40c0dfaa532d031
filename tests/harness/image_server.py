"""An image server on loopback that misbehaves on request (tests of data/images.py and the
fault matrix): a real ``http.server`` in a thread, HTTP/1.1 with kept-alive connections.

It serves a folder, counts requests per path (``hits``) and connections, and ``fail[path]``
lists what the next requests of that path get instead of the file:

- an HTTP status (404, 503, ...), or ``"drop"`` (the connection is closed, no response);
- ``"html"``: an HTML error page with status 200 (what some CDNs do);
- ``"truncate"``: the full Content-Length announced, half the body sent, then the
  connection closed;
- ``"trickle"``: the body one byte every ``trickle_s`` seconds;
- ``"endless"``: a body with no Content-Length that does not end (zeros until the client
  hangs up, or ENDLESS_CAP bytes).

``/moved/<path>`` redirects to ``/<path>``; ``/loop/<path>`` redirects to itself forever.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ENDLESS_CAP = 1 << 30
HTML = b"<!DOCTYPE html><html><body><h1>Service temporarily unavailable</h1></body></html>"


class ImageServer:
    def __init__(self, folder: Path, trickle_s: float = 0.05):
        self.folder, self.hits, self.fail = folder, Counter(), defaultdict(list)
        self.connections, self.trickle_s = 0, trickle_s
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                server.connections += 1
                super().setup()

            def do_GET(self):
                server.hits[self.path] += 1
                for prefix, target in (("/moved/", self.path[len("/moved"):]), ("/loop/", self.path)):
                    if self.path.startswith(prefix):
                        return self.send_body(302, b"", Location=target)
                what = server.fail[self.path].pop(0) if server.fail[self.path] else None
                if what == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if what == "endless":
                    return self.endless()
                if what == "html":
                    return self.send_body(200, HTML, **{"Content-Type": "text/html"})
                if isinstance(what, int):
                    return self.send_error(what)
                file = server.folder / self.path.lstrip("/")
                if not file.is_file():
                    return self.send_error(404, "File not found")
                body = file.read_bytes()
                if what == "truncate":
                    self.send_body(200, body[: len(body) // 2], length=len(body))
                    self.close_connection = True
                    return
                if what == "trickle":
                    return self.trickle(body)
                self.send_body(200, body)

            def send_body(self, status: int, body: bytes, length: int | None = None, **headers: str) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def trickle(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(server.trickle_s)
                except OSError:        # the client gave up
                    self.close_connection = True

            def endless(self) -> None:
                self.send_response(200)
                self.send_header("Connection", "close")     # the body ends when the connection does
                self.end_headers()
                self.close_connection = True
                chunk = bytes(1 << 16)
                try:
                    for _ in range(ENDLESS_CAP // len(chunk)):
                        self.wfile.write(chunk)
                except OSError:        # the client gave up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
