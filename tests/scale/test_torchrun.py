"""The real entry point under torchrun: 2 gloo processes x batch B train like 1 process x 2B,
rank 0 alone reports and checkpoints, and a checkpoint written by either world size resumes
under the other (with feature-caching accumulation and DDP no_sync in the resumed run).

Runs (each 2 epochs x 4 optimizer steps of 16 rows in total, on the tiny model):
  A  1 process,  batchSize 16                      (in-process `kontrast train`)
  B  2 processes, batchSize 8                      (torchrun -m kontrast.trainer)
  C  2 processes, batchSize 4, accumFreq 2, resumed from A's step_4.pt (the end of epoch 1)
  D  1 process,  batchSize 16, resumed from B's step_4.pt (written by B's rank 0)
A, B, C and D see the same global batches, so all must end with the same weights.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from numeric import assert_all_rel_close, assert_detects, worst_rel_err


TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
ROWS = 64


def write_job(folder: Path, name: str, **overrides) -> Path:
    spec = {
        "model": str(folder / "tiny-vit.json"), "trainData": str(folder / "data" / "train.csv"),
        "output": str(folder / name),
        "leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"], "rightWeights": [0.7, 0.3],
        "weightKey": "score", "batchSize": 16, "epochs": 2, "warmup": 2, "lr": 2e-3, "contextLength": 8,
        "gradCheckpointing": False, "precision": "fp32", "workers": 0, "seed": 5,
        **overrides,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
                                    "metadata": {"name": name.lower()}, "spec": spec}))
    return path


def run_local(job: Path) -> None:
    from kontrast.trainer.cli.train import main

    assert main([str(job), "--device", "cpu", "--no-progress"]) == 0


def run_torchrun(job: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "kontrast.trainer", str(job), "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines() if line.strip()]


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in events(out) if e["event"] == "step"]


def weights(out: Path, epoch: int = 2) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / f"epoch_{epoch}.pt", weights_only=True)["state_dict"]


def seed_checkpoint(src: Path, dst: Path) -> None:
    """The resumable checkpoint of the end of epoch 1 (step 4), as if ``dst`` had written it."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copy(src / "checkpoints" / "step_4.pt", dst / "checkpoints" / "step_4.pt")


def tiny_example(folder: Path) -> Path:
    """The tiny model and the example's first ROWS training rows with their images, in ``folder``."""
    from kontrast.trainer.data.example_data import generate

    (folder / "tiny-vit.json").write_text(json.dumps(TINY))
    full = generate(folder / "example")
    with open(full / "train.csv", newline="") as f:
        rows = list(csv.reader(f))[: ROWS + 1]
    (folder / "data").mkdir()
    shutil.copytree(full / "images", folder / "data" / "images")
    with open(folder / "data" / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tiny_example(tmp_path_factory.mktemp("torchrun"))

    run_local(write_job(folder, "A"))
    b = run_torchrun(write_job(folder, "B", batchSize=8))
    seed_checkpoint(folder / "A", folder / "C")
    c = run_torchrun(write_job(folder, "C", batchSize=4, accumFreq=2))
    seed_checkpoint(folder / "B", folder / "D")
    run_local(write_job(folder, "D"))
    return {"folder": folder, "B": b, "C": c}


def comparable(state: dict) -> dict:
    """The key third of each attention in_proj_bias has an exactly-zero true gradient (adding
    a constant to every key shifts all of a query's scores equally, which softmax ignores).
    Its computed gradient is rounding noise, which AdamW normalises to +-lr steps, so it
    differs between any two summation orders; every other parameter must match."""
    out = {}
    for k, v in state.items():
        v = v.float().clone()
        if k.endswith("attn.in_proj_bias"):
            w = v.numel() // 3
            v[w:2 * w] = 0
        out[k] = v
    return out


def assert_same_weights(a: dict, b: dict) -> None:
    """Every parameter within EXACT (relative norm error, tests/numeric.py) of the other run's."""
    assert_all_rel_close(comparable(a), comparable(b))


@pytest.mark.distributed
def test_two_processes_train_like_one_with_the_double_batch(runs):
    out = runs["folder"]
    assert len(losses(out / "A")) == len(losses(out / "B")) == 8
    assert losses(out / "B") == pytest.approx(losses(out / "A"), rel=1e-4, abs=1e-5)
    assert_same_weights(weights(out / "A"), weights(out / "B"))
    assert_same_weights(weights(out / "A", 1), weights(out / "B", 1))
    # The tolerance is far tighter than what one epoch of training moves (here 4 steps).
    assert_detects(worst_rel_err(comparable(weights(out / "A", 1)), comparable(weights(out / "A")))[0])


@pytest.mark.distributed
def test_rank_zero_alone_reports_and_checkpoints(runs):
    out = runs["folder"] / "B"
    log = events(out)
    assert [e["event"] for e in log].count("start") == 1 and [e["event"] for e in log].count("end") == 1
    assert [e["step"] for e in log if e["event"] == "step"] == list(range(1, 9))  # once per step, not per rank
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1.pt", "epoch_2.pt", "step_4.pt",
                                                                       "step_8.pt"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resolved"]["worldSize"] == 2 and summary["resolved"]["globalBatchSize"] == 16
    assert summary["resolved"]["device"] == "cpu"


@pytest.mark.distributed
def test_one_process_checkpoint_resumes_on_two_with_accumulation(runs):
    out = runs["folder"]
    starts = [e for e in events(out / "C") if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["startEpoch"] == 1 and starts[0]["resumedFrom"].endswith("step_4.pt")
    resolved = starts[0]["resolved"]
    assert (resolved["microBatchSize"], resolved["accumSteps"], resolved["worldSize"]) == (4, 2, 2)
    assert [e["step"] for e in events(out / "C") if e["event"] == "step"] == [5, 6, 7, 8]
    assert losses(out / "C") == pytest.approx(losses(out / "A")[4:], rel=1e-4, abs=1e-5)
    assert_same_weights(weights(out / "A"), weights(out / "C"))


@pytest.mark.distributed
def test_two_process_checkpoint_resumes_on_one(runs):
    out = runs["folder"]
    starts = [e for e in events(out / "D") if e["event"] == "start"]
    assert starts[0]["startEpoch"] == 1 and starts[0]["resumedFrom"].endswith("step_4.pt")
    assert losses(out / "D") == pytest.approx(losses(out / "A")[4:], rel=1e-4, abs=1e-5)
    assert_same_weights(weights(out / "A"), weights(out / "D"))
