"""A real MLflow tracking server on loopback: ``mlflow server`` (the full ``mlflow`` from PyPI)
with a SQLite backend and a local artifact store, started like the S3 server.

Why a virtual environment of its own: the server package pins ``pyarrow<26`` and the trainer
pins pyarrow 26.0.1, so both cannot share the dev venv; the trainer only needs the client
(``mlflow-skinny``, the ``mlflow`` extra) of the same version, which the dev venv holds. The
server's environment is built once under ``~/.cache/kontrast/mlflow-<version>/`` (about 70 s
and 850 MB from a warm pip cache), under a lock, and reused; a failed build raises (the
tests never skip).

One server per test session (``mlflow_server``); each test gets its own experiment name
(``mlflow``). ``MlflowServer.stop()`` and ``start()`` on the same port let a test take the
server away mid-run and bring it back.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.controlplane import _die_with_parent, free_port

#: The server's version: the same as the client (mlflow-skinny) pinned in pyproject's mlflow extra.
MLFLOW_VERSION = "3.17.2"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kontrast" / f"mlflow-{MLFLOW_VERSION}"


def ensure_server_env() -> Path:
    """The ``mlflow`` executable of the server's virtual environment (built when missing)."""
    venv = CACHE / "venv"
    exe, done = venv / "bin" / "mlflow", CACHE / "installed"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists() and exe.exists():
            return exe
        # Built where it stays: a venv's scripts hold its absolute path.
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                               "--disable-pip-version-check", f"mlflow=={MLFLOW_VERSION}"],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not exe.exists():
            raise RuntimeError(f"installing mlflow=={MLFLOW_VERSION} for the test server failed:\n{proc.stderr[-3000:]}")
        done.write_text(MLFLOW_VERSION + "\n")
    return exe


class MlflowServer:
    """``mlflow server``: SQLite tracking and registry store, artifacts served from a local folder."""

    def __init__(self, exe: Path, workdir: Path):
        self.exe, self.workdir = exe, workdir
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "MlflowServer":
        args = [str(self.exe), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
                "--artifacts-destination", str(self.workdir / "artifacts")]
        self.log = open(self.workdir / "server.log", "ab")
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
                                     preexec_fn=_die_with_parent, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return
            except OSError as exc:  # not up yet
                last = exc
                time.sleep(0.3)
        tail = (self.workdir / "server.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"mlflow server not ready after {timeout}s (last: {last!r}); log:\n{tail}")

    def stop(self) -> None:
        """Stop the server and every worker it started (its own process group); killed when it
        does not stop at once (uvicorn waits for idle keep-alive connections)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        if self.proc is not None:
            self.log.close()
        self.proc = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


@dataclass
class Mlflow:
    """One test's view: the server and an experiment name of its own."""

    server: MlflowServer
    experiment: str

    @property
    def uri(self) -> str:
        return self.server.uri

    def spec(self, **more: str) -> dict:
        """spec.tracking for this test."""
        return {"mlflow": {"uri": self.uri, "experiment": self.experiment, **more}}


def own_server(start: bool = True) -> MlflowServer:
    """A server of the test's own (its port is chosen now; ``start=False``: not running yet)."""
    made = MlflowServer(ensure_server_env(), Path(tempfile.mkdtemp(prefix="kontrast-mlflow-")))
    return made.start() if start else made


@pytest.fixture(scope="session")
def mlflow_server():
    """``mlflow server`` on loopback for the whole session."""
    running = own_server()
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(running.workdir, ignore_errors=True)


@pytest.fixture
def mlflow(mlflow_server, monkeypatch):
    """A fresh experiment name; the client's default tracking URI points at the server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    yield Mlflow(mlflow_server, f"t-{uuid.uuid4().hex[:12]}")
