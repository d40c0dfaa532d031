"""A real S3 server on loopback: SeaweedFS (`weed server -s3`), built from Go modules by
tools/k8s-testbin/build.sh like the control-plane binaries.

Why: fsspec's memory:// shares no code with the path that runs against object stores (s3fs
over aiobotocore: signed requests, listings, whole-object PUTs, deletes, range reads). The
tests give the trainer only what a pod gets from a storageSecretRef Secret: AWS_* variables
in the environment (keys and AWS_ENDPOINT_URL), never anything in the TrainJob.

One server per test session (``s3_server``); each test gets its own bucket and the variables
(``s3``). Everything binds 127.0.0.1, and SeaweedFS's telemetry is switched off.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.controlplane import _die_with_parent, ensure_binaries


def _free_ports(n: int) -> list[int]:
    """n distinct loopback ports that are free right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """``weed server`` with its master, volume, filer and S3 gateway, one admin identity."""

    def __init__(self, weed: Path, workdir: Path):
        self.weed, self.workdir = weed, workdir
        self.access_key = "kontrast-test"
        self.secret_key = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout: float = 120) -> "S3Server":
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        # Each test's bucket is a SeaweedFS collection, which grows 7 volumes on its first write by
        # default: 16 volume slots ran out at the third bucket ("No writable volumes and no free
        # volumes left", an InternalError to the client). One volume per collection, and slots
        # enough for every bucket of a session (volumes are sparse files: no disk until written).
        (self.workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        ports = _free_ports(9)
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, metrics = ports
        args = [str(self.weed), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
                "-master.telemetry=false", f"-master.port={master}", f"-master.port.grpc={master_grpc}",
                "-master.volumeSizeLimitMB=64", "-volume.max=1000",
                f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
                "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-metricsPort={metrics}",
                f"-s3.localSocket={self.workdir / 's3.sock'}"]
        self.log = open(self.workdir / "weed.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     preexec_fn=_die_with_parent)
        self.endpoint = f"http://127.0.0.1:{s3}"
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until the gateway answers and a bucket can be created (the filer and a volume are up)."""
        deadline = time.monotonic() + timeout
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                self.filesystem().mkdir(probe)
                self.filesystem().rmdir(probe)
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS S3 gateway not ready after {timeout}s (last: {last!r}); {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        """The end of SeaweedFS's log (for a failure that may be the server's)."""
        return "SeaweedFS log:\n" + (self.workdir / "weed.log").read_text(errors="replace")[-chars:]

    def env(self) -> dict[str, str]:
        """What a storageSecretRef Secret would put into a training pod's environment."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self):
        """An s3fs filesystem for the test's own setup and checks (explicit credentials)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@dataclass
class S3:
    """One test's view: its bucket, the server, and helpers."""

    server: S3Server
    bucket: str

    def url(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}".rstrip("/")

    @property
    def fs(self):
        return self.server.filesystem()


@pytest.fixture(scope="session")
def s3_server():
    """SeaweedFS on loopback for the whole session (built by build.sh if missing; never skipped)."""
    weed = ensure_binaries() / "weed"
    if not os.access(weed, os.X_OK):
        raise RuntimeError(f"missing test binary {weed} (tools/k8s-testbin/build.sh builds it)")
    workdir = Path(tempfile.mkdtemp(prefix="kontrast-s3-"))
    server = S3Server(weed, workdir).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket, and the server's credentials and endpoint in the environment only."""
    import s3fs

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.filesystem().mkdir(bucket)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # s3fs keeps clients made with older variables
    yield S3(s3_server, bucket)
    s3fs.S3FileSystem.clear_instance_cache()
