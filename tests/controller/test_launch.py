"""trainer/src/launch.py: the pod command (torchrun from PET_*, permanent exit code kept)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from kontrast.contract import EXIT_PERMANENT
from kontrast.trainer.launch import exit_code_of, torchrun_args

VENV_BIN = Path(sys.executable).parent


def test_torchrun_args_from_pod_env():
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "clip-0-0.clip-workers", "PET_MASTER_PORT": "29500"}
    assert torchrun_args("/etc/kontrast/trainjob.yaml", ["--no-progress"], env) == [
        "--nnodes", "2", "--nproc-per-node", "4", "--max-restarts", "0",
        "--node-rank", "1", "--master-addr", "clip-0-0.clip-workers", "--master-port", "29500",
        "-m", "kontrast.trainer", "/etc/kontrast/trainjob.yaml", "--no-progress"]


def test_torchrun_args_standalone_outside_a_pod():
    assert torchrun_args("tj.yaml", [], {}) == [
        "--nnodes", "1", "--nproc-per-node", "1", "--max-restarts", "0", "--standalone",
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
