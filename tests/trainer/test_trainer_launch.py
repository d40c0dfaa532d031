"""trainer/src/cli/launch.py: the pod command (torchrun from PET_*, permanent exit code kept, SIGTERM saves)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from kontrast.contract import EXIT_PERMANENT
from kontrast.trainer.run import checkpoint as ckpt
from kontrast.trainer.cli.launch import exit_code_of, torchrun_args

VENV_BIN = Path(sys.executable).parent


def test_torchrun_args_from_pod_env():
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "clip-0-0.clip-workers", "PET_MASTER_PORT": "29500"}
    assert torchrun_args("/etc/kontrast/trainjob.yaml", ["--no-progress"], env) == [
        "--nnodes", "2", "--nproc-per-node", "4", "--max-restarts", "0", "--shutdown-timeout", "86400",
        "--node-rank", "1", "--master-addr", "clip-0-0.clip-workers", "--master-port", "29500",
        "-m", "kontrast.trainer", "/etc/kontrast/trainjob.yaml", "--no-progress"]


def test_torchrun_args_standalone_outside_a_pod():
    assert torchrun_args("tj.yaml", [], {}) == [
        "--nnodes", "1", "--nproc-per-node", "1", "--max-restarts", "0", "--shutdown-timeout", "86400",
        "--standalone",
        "-m", "kontrast.trainer", "tj.yaml"]


def test_missing_node_rank_is_an_error():
    with pytest.raises(SystemExit):
        torchrun_args("tj.yaml", [], {"PET_NNODES": "2", "PET_MASTER_ADDR": "x"})


def fail(code):
    return SimpleNamespace(exitcode=code)


def test_exit_code_prefers_the_permanent_one():
    assert exit_code_of({0: fail(1), 1: fail(EXIT_PERMANENT)}) == (EXIT_PERMANENT, 1)
    assert exit_code_of({3: fail(2)}) == (2, 3)
    assert exit_code_of({0: fail(-9)}) == (137, 0)
    assert exit_code_of({}) == (1, None)


@pytest.mark.distributed
def test_bad_data_exits_permanent_with_the_message(tmp_path):
    """The real command, two local workers: the trainer's message reaches the termination log."""
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 0, 0)).save(img)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "image", "title", "score"])
        w.writerow(["red", str(img), "red thing", "1"])
        w.writerow(["blue", str(img), "blue thing", "not-a-number"])
    (tmp_path / "tiny.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}))
    tj = {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob", "metadata": {"name": "bad"},
          "spec": {"model": str(tmp_path / "tiny.json"), "trainData": str(tmp_path / "train.csv"),
                   "output": str(tmp_path / "out"), "leftKeys": ["query"], "leftWeights": [1.0],
                   "rightKeys": ["image", "title"], "rightWeights": [1.0, 1.0], "weightKey": "score",
                   "batchSize": 2, "epochs": 1, "workers": 0, "precision": "fp32",
                   "gradCheckpointing": False, "contextLength": 8}}
    (tmp_path / "tj.yaml").write_text(yaml.safe_dump(tj))
    term = tmp_path / "termination-log"
    env = {**os.environ, "KONTRAST_TERMINATION_LOG": str(term), "PET_NPROC_PER_NODE": "2",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for k in ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([str(VENV_BIN / "kontrast"), "launch", str(tmp_path / "tj.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_PERMANENT, proc.stderr[-3000:]
    message = term.read_text()
    assert "score" in message, message


def launch_env(tmp_path: Path, nproc: int) -> dict:
    env = {**os.environ, "KONTRAST_TERMINATION_LOG": str(tmp_path / "termination-log"),
           "PET_NPROC_PER_NODE": str(nproc), "OMP_NUM_THREADS": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for k in ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"):
        env.pop(k, None)
    return env


def step_events(out: Path) -> list[dict]:
    path = out / "progress.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] in ("start", "step")]


def sigterm_after_steps(proc: subprocess.Popen, out: Path, steps: int) -> str:
    """SIGTERM the launcher once ``steps`` optimizer steps are in the progress log; its output."""
    try:
        deadline = time.monotonic() + 300
        while sum(e["event"] == "step" for e in step_events(out)) < steps:
            assert proc.poll() is None and time.monotonic() < deadline, "training never got going"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.distributed
def test_sigterm_saves_mid_epoch_and_the_next_run_resumes_there(tmp_path, small_data, tiny_model_json, h):
    """Preemption or `kubectl delete pod`: SIGTERM reaches the pod's command, torchrun forwards
    it to both workers, they agree on a step, rank 0 saves it, and the pod exits 143. Running
    the same TrainJob again resumes at that step, in the middle of the epoch."""
    out = tmp_path / "out"
    spec = {"model": str(tiny_model_json), "trainData": str(small_data / "train.csv"), "output": str(out),
            "leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"],
            "rightWeights": [0.5, 0.5], "weightKey": "score", "batchSize": 1, "epochs": 1, "warmup": 2,
            "contextLength": 8, "gradCheckpointing": False, "precision": "fp32", "workers": 0}
    (tmp_path / "tj.yaml").write_text(yaml.safe_dump(h.trainjob(spec, name="preempted")))
    command = [str(VENV_BIN / "kontrast"), "launch", str(tmp_path / "tj.yaml"), "--", "--device", "cpu",
               "--no-progress"]
    env = launch_env(tmp_path, nproc=2)              # 64 rows / (1 x 2 processes): 32 steps in the epoch

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = sigterm_after_steps(proc, out, 3)
    assert proc.returncode == 143, logs[-3000:]
    saved = ckpt.list_resumable(str(out))
    assert len(saved) == 1, logs[-3000:]
    step, location = saved[0]
    state = torch.load(location, weights_only=True)
    assert 3 <= step < 32 and (state["epoch"], state["epoch_step"]) == (0, step)      # mid-epoch
    assert not (out / "summary.json").exists()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    events = step_events(out)
    second = max(i for i, e in enumerate(events) if e["event"] == "start")
    assert events[second]["startStep"] == step and events[second]["resumedFrom"] == location
    assert [e["step"] for e in events[second + 1:]] == list(range(step + 1, 33))
    assert json.loads((out / "summary.json").read_text())["step"] == 32


#: `kontrast launch` with a rendezvous keep-alive always in flight: torchrun's heartbeat thread
#: calls the store every 5 s, this one without a pause, so that finalizing the interpreter always
#: meets a call in flight (one CI run in many met torchrun's own).
LAUNCH_WITH_KEEP_ALIVE_IN_FLIGHT = """
import sys, threading
import torch.distributed as dist
from kontrast.trainer.cli.launch import main

server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
client = dist.TCPStore("127.0.0.1", server.port, is_master=False)

def keep_alive():
    while True:
        client.compare_set("heartbeat", "", "alive")

threading.Thread(target=keep_alive, daemon=True).start()
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.distributed
def test_sigterm_exits_143_while_the_rendezvous_keep_alive_calls_the_store(tmp_path, small_data, tiny_model_json, h):
    """After a signal torchrun leaves its rendezvous open and its keep-alive thread running. A
    keep-alive call in flight while the interpreter finalized aborted the launcher ('terminate
    called without an active exception', -6): the pod exited 134 after a clean save, which
    Kubernetes counts as a failure, not a preemption."""
    out = tmp_path / "out"
    spec = {"model": str(tiny_model_json), "trainData": str(small_data / "train.csv"), "output": str(out),
            "leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"],
            "rightWeights": [0.5, 0.5], "weightKey": "score", "batchSize": 1, "epochs": 1,
            "contextLength": 8, "gradCheckpointing": False, "precision": "fp32", "workers": 0}
    (tmp_path / "tj.yaml").write_text(yaml.safe_dump(h.trainjob(spec, name="heartbeat")))
    command = [sys.executable, "-c", LAUNCH_WITH_KEEP_ALIVE_IN_FLIGHT, str(tmp_path / "tj.yaml"), "--",
               "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(command, env=launch_env(tmp_path, nproc=1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    logs = sigterm_after_steps(proc, out, 1)
    assert proc.returncode == 143, logs[-3000:]
    assert "terminate called" not in logs and "stopped by a signal" in logs, logs[-3000:]
    assert len(ckpt.list_resumable(str(out))) == 1, logs[-3000:]


@pytest.mark.distributed
def test_check_under_torchrun_applies_the_bad_fraction_to_the_whole_file(tmp_path, small_data, tiny_model_json, h):
    """``--check`` on 2 processes: each prefetches half the images, and the bad ones of both
    count against maxBadFraction together (3 of 58, 5.2%, against 5%), as on one process."""
    with open(small_data / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    for row in rows[1:]:
        row[1] = str(small_data / row[1])
    for i in (1, 2, 3):
        rows[i][1] = str(small_data / f"gone-{i}.png")
    h.write_csv(tmp_path / "train.csv", rows)
    spec = {"model": str(tiny_model_json), "trainData": str(tmp_path / "train.csv"), "output": str(tmp_path / "out"),
            "leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"], "rightWeights": [0.5, 0.5],
            "weightKey": "score", "batchSize": 2, "epochs": 1, "contextLength": 8, "workers": 0,
            "data": {"onBadImage": "skip", "maxBadFraction": 0.05}}
    (tmp_path / "tj.yaml").write_text(yaml.safe_dump(h.trainjob(spec, name="checked")))
    env = launch_env(tmp_path, nproc=2)
    proc = subprocess.run([str(VENV_BIN / "kontrast"), "launch", str(tmp_path / "tj.yaml"), "--", "--check",
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_PERMANENT, proc.stdout[-3000:] + proc.stderr[-3000:]
    message = (tmp_path / "termination-log").read_text()
    assert "3 of " in message and "data.maxBadFraction (5.00%)" in message, message


def test_sigusr1_reaches_the_processes_that_print_stacks_and_says_so_when_there_are_none(caplog):
    """``kontrast launch``'s SIGUSR1 forwarding (cli/stack_dumps.py) without torchrun: a child
    with the trainer's handler prints its stacks, named by its RANK; with none, the log says so."""
    from kontrast.trainer.cli.stack_dumps import print_stacks_below

    caplog.set_level("WARNING", logger="kontrast.launch")
    print_stacks_below(os.getpid())
    assert "SIGUSR1: no training process below this one to print its stacks" in caplog.text

    code = ("import sys; from kontrast.trainer.cli.stack_dumps import print_stacks_on_sigusr1; "
            "print_stacks_on_sigusr1(); print('ready', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "RANK": "3"})
    try:
        assert child.stdout.readline() == "ready\n"        # the handler is registered
        caplog.clear()
        print_stacks_below(os.getpid())
        assert f"SIGUSR1: the stacks of process {child.pid} (rank 3), 1 of 1" in caplog.text
        child.stdin.close()                                  # the child reads to the end, then exits
        assert child.wait(timeout=60) == 0                   # SIGUSR1 did not end it
        assert "Current thread 0x" in child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
