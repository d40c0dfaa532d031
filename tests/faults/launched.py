"""The fault matrix's harness (conftest.py has its fixtures): the production command (``kontrast launch``: torchrun, 2
processes on the CPU), faults delivered on conditions, and the checks that nothing is left.

Every process of a launched run carries a unique token in its environment (DataLoader
workers and torchrun's workers too, whatever session they start), so a test can find and
signal all of them, and assert that none outlives the run. ``inject/sitecustomize.py`` holds
rank 0 at a chosen point (mid-step, mid-save, mid-evaluation) until the test releases it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytest
import yaml

from kontrast.api import apply_defaults, validate
from kontrast.trainer.cli.stack_dumps import descendants, handles, stack_printers

VENV_BIN = Path(sys.executable).parent
INJECT = Path(__file__).parent / "inject"
TOKEN_ENV = "KONTRAST_FAULT_TOKEN"

#: The tiny model of tests/trainer/conftest.py (about 0.9M parameters).
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def pids_with(token: str) -> list[int]:
    """Live processes (zombies excluded) whose environment holds ``token``."""
    found = []
    needle = f"{TOKEN_ENV}={token}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def running_threads(dump: str) -> str:
    """A stack dump cut to the launcher's line naming each process and the thread that was
    running in it, each frame as ``file:line in function`` (the CI log shows little of a failure)."""
    keep, current = [], False
    for line in dump.splitlines():
        if "SIGUSR1: the stacks of" in line:
            keep.append(line.split("kontrast.launch: ", 1)[-1])
        elif line.startswith("Current thread"):
            current = True
        elif line.startswith("Thread 0x") or not line.strip():
            current = False
        elif current and line.strip().startswith("File "):
            m = re.match(r'\s*File "(.*)", line (\d+) in (.*)', line)
            keep.append(f"  {'/'.join(m.group(1).rsplit('/', 2)[-2:])}:{m.group(2)} in {m.group(3)}" if m else line)
            # a DataLoader worker's frames below here are its parent's at the fork
            current = not line.rstrip().endswith("in _bootstrap") or "multiprocessing/process.py" not in line
    return "\n".join(keep)


def temp_files(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if ".tmp" in p.name]


def events(out: Path) -> list[dict[str, Any]]:
    path = out / "progress.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def steps(out: Path) -> list[int]:
    return [e["step"] for e in events(out) if e["event"] == "step"]


class Launched:
    """One ``kontrast launch`` of a TrainJob (all its processes) under the test's control."""

    def __init__(self, job: "Job", nproc: int, env: dict[str, str], prefix: Sequence[str] = ()):
        self.job, self.token = job, uuid.uuid4().hex
        #: What else a stuck run's failure shows (a server's log, a proxy's requests in flight).
        self.diagnostics: list[Callable[[], str]] = []
        self.log = job.folder / f"launch-{self.token[:8]}.log"
        full = {**os.environ, **env, TOKEN_ENV: self.token, "OMP_NUM_THREADS": "1",
                "PET_NPROC_PER_NODE": str(nproc), "KONTRAST_TERMINATION_LOG": str(job.termination_log),
                "KONTRAST_CACHE": str(job.folder / "cache"),
                "PYTHONPATH": os.pathsep.join([str(INJECT), os.environ.get("PYTHONPATH", "")]),
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        for k in ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT", "RANK", "WORLD_SIZE",
                  "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            full.pop(k, None)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([*prefix, str(VENV_BIN / "kontrast"), "launch", str(job.path), "--",
                                          "--device", "cpu", "--no-progress"], env=full, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """Until ``condition()`` holds; fails when the run ends first or the time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                self.fail_stuck(f"no {what} within {timeout} s")
            time.sleep(0.1)

    def fail_stuck(self, why: str) -> None:
        """Fail with the log's end, the diagnostics and where each trainer process is (the
        threads that were running when SIGUSR1 came), then kill the run."""
        log = self.output()
        stacks = running_threads(self.stacks())
        self.kill()
        more = "".join(f"\n--- {describe()}" for describe in self.diagnostics)
        pytest.fail(f"{why}:\n{log[-3000:]}{more}\n--- stacks (SIGUSR1; the running thread of each process) ---\n"
                    f"{stacks[-9000:]}")

    def stacks(self, timeout: float = 30) -> str:
        """What a user sees after ``kill -USR1`` to the pod's command: every thread's stack of
        each trainer process and DataLoader worker, in the log (the run goes on)."""
        launcher = next((p for p in [self.proc.pid, *descendants(self.proc.pid)] if handles(p, signal.SIGUSR1)), None)
        if launcher is None:
            return "no kontrast launch process to signal"
        printers = stack_printers(launcher)
        start = len(self.output())
        os.kill(launcher, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while self.output()[start:].count("Current thread 0x") < len(printers) and time.monotonic() < deadline:
            time.sleep(0.1)
        return f"{len(printers)} processes: {printers}\n{self.output()[start:]}"

    def paused(self, point: str) -> Callable[[], bool]:
        return lambda: (self.job.fault_dir / f"paused-{point}").exists()

    def release(self) -> None:
        (self.job.fault_dir / "release").touch()

    def rank0_asked_to_stop(self) -> bool:
        """Rank 0's SIGTERM handler has run (its log line; other ranks' lines carry ``rank N``)."""
        return any("received SIGTERM" in line and " rank " not in line for line in self.output().splitlines())

    def stop_while_paused(self, point: str) -> None:
        """SIGTERM while rank 0 is held at ``point``; released once rank 0 has seen it."""
        self.wait_for(self.paused(point), f"rank 0 paused at {point}")
        self.terminate()
        self.wait_for(self.rank0_asked_to_stop, "rank 0's SIGTERM handler")
        self.release()

    def terminate(self) -> None:
        """What the kubelet does first: SIGTERM to the pod's command."""
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """What the kubelet does after the grace period: SIGKILL to every process of the pod."""
        for pid in pids_with(self.token):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def finish(self, timeout: float = 300) -> int:
        """The run's exit code; a run that does not end in time (a hang) is killed and fails the test."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail_stuck(f"the run did not end within {timeout} s (a hang)")
        return self.proc.returncode

    def leftovers(self, grace: float = 30) -> list[int]:
        """Processes of this run still alive ``grace`` seconds after it ended (none expected)."""
        deadline = time.monotonic() + grace
        while pids_with(self.token) and time.monotonic() < deadline:
            time.sleep(0.2)
        return pids_with(self.token)


def on_small_volume(folder: Path, size: str) -> list[str]:
    """A command prefix: the rest runs with a tmpfs of ``size`` mounted at ``folder``, in a
    mount namespace of its own (as root, like the test node agent; otherwise in a user
    namespace too, where the kernel allows one). The tmpfs goes with the namespace, so what
    it held at the end is copied to ``<folder>.after``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = (f'mount -t tmpfs -o size={size} kontrast-faults "{folder}" || exit 1; "$@"; code=$?; '
              f'cp -a "{folder}" "{folder}.after"; exit $code')
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


class Job:
    """A TrainJob file for the tiny model and small data, and the runs launched from it."""

    def __init__(self, folder: Path, spec: dict[str, Any], name: str):
        self.folder, self.name = folder, name
        self.out = Path(spec["output"])
        self.path = folder / f"{name}.yaml"
        self.termination_log = folder / "termination-log"
        self.fault_dir = folder / "faults"
        obj = apply_defaults({"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
                              "metadata": {"name": name}, "spec": spec})
        problems = validate(obj)
        assert not problems, problems
        self.path.write_text(yaml.safe_dump(obj))
        self.launches: list[Launched] = []

    def launch(self, nproc: int = 2, prefix: Sequence[str] = (), env: Optional[dict[str, str]] = None,
               **faults: Any) -> Launched:
        """Start the run (``prefix``: a command that execs the rest; ``env``: more variables);
        ``faults``: pause_step=N, pause_save=N, pause_eval=N, constants="..." (see
        inject/sitecustomize.py)."""
        import shutil

        shutil.rmtree(self.fault_dir, ignore_errors=True)
        self.fault_dir.mkdir()
        env = {**(env or {}), "KONTRAST_FAULT_DIR": str(self.fault_dir)}
        for key, value in faults.items():
            env[f"KONTRAST_FAULT_{key.upper()}"] = str(value)
        self.termination_log.unlink(missing_ok=True)
        launched = Launched(self, nproc, env, prefix)
        self.launches.append(launched)
        return launched

    def checkpoints(self) -> list[int]:
        folder = self.out / "checkpoints"
        return sorted(int(p.name[5:-3]) for p in folder.glob("step_*.pt")) if folder.exists() else []

    def temp_files(self) -> list[Path]:
        return temp_files(self.out, self.folder / "cache")


