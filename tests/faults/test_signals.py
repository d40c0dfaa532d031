"""The production configuration (2 torchrun processes, ``workers: 2``, ``evalEvery: 1``,
``checkpointEvery: {steps: 3}``; 8 steps an epoch, 2 epochs) stopped by the kubelet at the
awkward moments: SIGTERM in the middle of a save or of an evaluation, SIGKILL (a grace period
too short) in the middle of a save. SIGTERM mid-step is in test_multiprocess.py."""

from __future__ import annotations

import json

import pytest
import torch

from faults.launched import events, steps

pytestmark = [pytest.mark.faults, pytest.mark.distributed]


def test_sigterm_mid_save_stops_on_that_checkpoint(production_job):
    """SIGTERM while rank 0 writes step_6.pt (checkpointEvery): the save completes and is
    the stop's checkpoint (before, the run took another step and saved again inside the
    grace period)."""
    job = production_job()
    run = job.launch(pause_save=2)       # step_3.pt, then step_6.pt
    run.stop_while_paused("save")
    assert run.finish(timeout=120) == 143, run.output()[-4000:]
    assert job.checkpoints() == [3, 6] and steps(job.out) == list(range(1, 7)), run.output()[-4000:]
    assert run.leftovers() == [] and job.temp_files() == []

    again = job.launch()
    assert again.finish() == 0, again.output()[-4000:]
    assert [e["startStep"] for e in events(job.out) if e["event"] == "start"] == [0, 6]
    assert steps(job.out) == list(range(1, 17))
    assert again.leftovers() == [] and job.temp_files() == []


def test_sigterm_mid_evaluation_saves_the_epoch_and_keeps_its_evaluation(production_job):
    """SIGTERM while the epoch-1 evaluation runs: it completes, the epoch's checkpoint (a new
    best) is written with that evaluation in it, and the run stops there; the resumed run
    still knows epoch 1's evaluation and best checkpoint."""
    job = production_job()
    run = job.launch(pause_eval=2)       # the starting model's evaluation, then epoch 1's
    run.stop_while_paused("eval")
    assert run.finish(timeout=120) == 143, run.output()[-4000:]
    assert job.checkpoints() == [6, 8], run.output()[-4000:]
    assert (job.out / "checkpoints" / "epoch_1.pt").exists()
    assert run.leftovers() == [] and job.temp_files() == []

    again = job.launch()
    assert again.finish() == 0, again.output()[-4000:]
    assert [e["startStep"] for e in events(job.out) if e["event"] == "start"] == [0, 8]
    assert steps(job.out) == list(range(1, 17))
    summary = json.loads((job.out / "summary.json").read_text())
    assert [(h["phase"], h["epoch"]) for h in summary["evalHistory"]] == [("before", 0), ("epoch", 1), ("after", 2)]
    assert summary["best"]["epoch"] in (1, 2) and summary["best"]["uri"].endswith(f"epoch_{summary['best']['epoch']}.pt")
    assert again.leftovers() == [] and job.temp_files() == []


def test_sigkill_mid_save_resumes_from_the_previous_checkpoint_and_removes_the_orphan(production_job):
    """SIGKILL (a grace period too short for the save) while step_6.pt is being written:
    nothing half-written is published, the next run resumes from step_3.pt (losing one
    checkpointEvery interval) and removes the orphan temporary file."""
    job = production_job()
    run = job.launch(pause_save=2)
    run.wait_for(run.paused("save"), "rank 0 paused mid-save")
    run.kill()
    assert job.checkpoints() == [3]
    assert [p.name.startswith(".step_6.pt.") for p in job.temp_files()] == [True]
    assert run.leftovers() == []

    again = job.launch()
    assert again.finish() == 0, again.output()[-4000:]
    assert [e["startStep"] for e in events(job.out) if e["event"] == "start"] == [0, 3]
    assert steps(job.out)[-13:] == list(range(4, 17))
    state = torch.load(job.out / "checkpoints" / "step_16.pt", weights_only=True)
    assert state["step"] == 16
    assert again.leftovers() == [] and job.temp_files() == []
