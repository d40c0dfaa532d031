"""The hang watchdog against the real control plane: a trainer that stops making progress (its
image server accepts connections and never answers, as a wedged NFS mount or a stuck
collective would leave it) is restarted with reason Hung, counted in the budget, and fails
with RestartLimitExceeded once the budget is spent, leaving no process of its pods behind."""

from __future__ import annotations

import csv
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from harness.waiting import wait_for

from e2e.support import StatusRecorder, trainjob

pytestmark = pytest.mark.e2e

#: Longer than a tiny trainer's start-up here (imports, model, data table: 10 to 20 s on two
#: busy cores), so the watchdog catches the stall, not a slow start.
HANG_SECONDS = 30


class StallingServer:
    """Accepts TCP connections and reads requests, but never answers."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def stalling():
    server = StallingServer()
    yield server
    server.close()


@pytest.fixture
def watchdog(operator):
    """The operator restarted with a short hang limit (the session's operator has it off)."""
    operator.stop()
    operator.extra_env["KONTRAST_HANG_SECONDS"] = str(HANG_SECONDS)
    operator.start()
    yield
    operator.stop()
    del operator.extra_env["KONTRAST_HANG_SECONDS"]
    operator.start()


def stalled_data(tiny: dict[str, Path], server: StallingServer, out: Path) -> Path:
    """The tiny train file with every image behind the stalling server."""
    with open(tiny["train"], newline="") as f:
        rows = list(csv.reader(f))
    for row in rows[1:]:
        row[1] = f"http://127.0.0.1:{server.port}/img/{Path(row[1]).name}"
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return out


def trainer_processes(name: str) -> list[int]:
    """Live processes (torchrun and its workers, in any session) of this TrainJob's pods."""
    marker = f"KONTRAST_TRAINJOB_NAME={name}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in env and state != "Z":
            found.append(int(pid))
    return found


def test_a_hung_trainer_is_restarted_as_hung_then_fails_past_its_budget(tjs, tiny, stalling, watchdog, tmp_path):
    data = stalled_data(tiny, stalling, tmp_path / "stalled.csv")
    tjs.create(trainjob("hung", tiny, nodes=1, trainData=str(data),
                        scheduling={"maxRestarts": 1, "terminationGracePeriodSeconds": 3}))

    with StatusRecorder(tjs.kube, tjs.ns, "hung") as recorder:
        # the first attempt runs, reports nothing more, and is restarted by the watchdog
        wait_for(lambda: tjs.status("hung").get("restarts") == 1, 120 + HANG_SECONDS, "a Hung restart")
        assert stalling.accepted >= 1      # the trainer really was waiting on the server
        # the second attempt hangs too: the budget (maxRestarts 1) is spent, the job fails and stops
        st = tjs.wait_phase("hung", "Failed", timeout=120 + 2 * HANG_SECONDS)
    phases = recorder.phases()
    assert phases[-1] == "Failed" and "Restarting" in phases and phases.count("Running") >= 2, phases
    restarting = next(c for s in recorder.statuses for c in s.get("conditions") or []
                      if c["type"] == "Restarting" and c["status"] == "True")
    assert restarting["reason"] == "Hung" and f"hang limit is {HANG_SECONDS}s" in restarting["message"]
    hung_events = [e for e in tjs.events("hung") if e["reason"] == "Hung"]
    assert len(hung_events) >= 1 and {e["type"] for e in hung_events} == {"Warning"}

    failed = tjs.cond("hung", "Failed")
    assert failed["reason"] == "RestartLimitExceeded" and st["restarts"] == 1
    assert "the trainer looks hung" in failed["message"] and "maxRestarts=1" in failed["message"]
    assert {j["metadata"]["labels"]["kontrast.dev/attempt"] for j in tjs.jobs("hung")} <= {"0", "1"}
    wait_for(lambda: not [p for p in tjs.pods("hung") if p["status"].get("phase") not in ("Succeeded", "Failed")],
             60, "the hung pods to stop")
    # every process of the pods is gone, torchrun's workers (their own sessions) included
    wait_for(lambda: not trainer_processes("hung"), 30, "no process of the hung pods left")


class SlowServer:
    """Serves the images one at a time, each after ``delay`` seconds: a catalogue whose fetch
    outlasts the hang limit while it moves on."""

    def __init__(self, files: dict[str, Path], delay: float):
        from http.server import BaseHTTPRequestHandler, HTTPServer

        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                time.sleep(delay)  # the slow store: the point of this server, not a wait in the test
                body = files[Path(self.path).name].read_bytes()
                server.times.append(time.monotonic())
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(HTTPServer):
            request_queue_size = 64  # every prefetch thread's connection waits its turn, none is dropped

        self.times: list[float] = []
        self.http = Server(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_a_long_set_up_that_moves_on_is_no_hang(tjs, tiny, watchdog, tmp_path):
    """Prefetching the images takes longer than the hang limit, one image every second or so:
    the trainer's heartbeat (status.progress.stage) shows it moving, so the watchdog waits."""
    with open(tiny["train"], newline="") as f:
        rows = list(csv.reader(f))
    files = {Path(row[1]).name: Path(row[1]) for row in rows[1:]}
    server = SlowServer(files, delay=1.6 * HANG_SECONDS / len(files))
    try:
        for row in rows[1:]:
            row[1] = f"http://127.0.0.1:{server.port}/img/{Path(row[1]).name}"
        data = tmp_path / "slow.csv"
        with open(data, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        tjs.create(trainjob("slow", tiny, nodes=1, epochs=1, trainData=str(data)))
        with StatusRecorder(tjs.kube, tjs.ns, "slow") as recorder:
            st = tjs.wait_phase("slow", "Succeeded", timeout=300)
    finally:
        server.close()
    assert server.times[-1] - server.times[0] > HANG_SECONDS  # the prefetch really outlasted the limit
    assert st["restarts"] == 0, st
    stages = [(s.get("progress") or {}).get("stageText") for s in recorder.statuses]
    assert any((t or "").startswith("Prefetching(") for t in stages), stages
    assert "STAGE" in tjs.cp.kubectl("get", "tj", "slow", "-n", tjs.ns).stdout
