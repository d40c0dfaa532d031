"""Fixtures of the fault matrix: the tiny model and data, and the production TrainJob (faults/launched.py
launches and watches it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from faults.launched import TINY, Job, pids_with


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory) -> Path:
    """64 training rows and 40 evaluation rows of the example data set, 16-pixel images, and the tiny model."""
    import csv

    from PIL import Image

    from kontrast.trainer.data.example_data import generate

    example = generate(tmp_path_factory.mktemp("fault-example") / "data")
    folder = tmp_path_factory.mktemp("fault-data")
    (folder / "tiny-vit.json").write_text(json.dumps(TINY))
    for name, n in (("train.csv", 64), ("eval.csv", 40)):
        with open(example / name, newline="") as f:
            rows = list(csv.reader(f))
        for _, img, _, _ in rows[1:n + 1]:
            if not (folder / img).exists():
                (folder / img).parent.mkdir(parents=True, exist_ok=True)
                Image.open(example / img).resize((16, 16)).save(folder / img)
        with open(folder / name, "w", newline="") as f:
            csv.writer(f).writerows(rows[:n + 1])
    return folder


@pytest.fixture
def production_job(fault_data, tmp_path) -> Callable[..., Job]:
    """The production configuration on the tiny model: 2 processes x batch 4 (8 steps an
    epoch of 64 rows), ``workers: 2``, ``evalEvery: 1``, ``checkpointEvery`` mid-epoch."""
    made = []

    def make(name: str = "prod", **overrides: Any) -> Job:
        spec = {
            "model": str(fault_data / "tiny-vit.json"), "trainData": str(fault_data / "train.csv"),
            "evalData": str(fault_data / "eval.csv"), "output": str(tmp_path / "out"),
            "leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"],
            "rightWeights": [0.5, 0.5], "weightKey": "score", "batchSize": 4, "epochs": 2, "warmup": 2,
            "lr": 1e-3, "contextLength": 8, "gradCheckpointing": False, "precision": "fp32", "workers": 2,
            "evalEvery": 1, "checkpointEvery": {"steps": 3}, "keepCheckpoints": 2, "seed": 3,
            **overrides,
        }
        job = Job(tmp_path, {k: v for k, v in spec.items() if v is not None}, name)
        made.append(job)
        return job

    yield make
    for job in made:
        for launched in job.launches:
            if launched.proc.poll() is None or pids_with(launched.token):
                launched.kill()
