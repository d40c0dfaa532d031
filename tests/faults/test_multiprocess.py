"""The two multi-process blockers of issue #22, on the production command (2 torchrun
processes, ``workers: 2``, ``evalEvery: 1``)."""

from __future__ import annotations

import pytest
import torch

from faults.launched import events, running_threads, steps

pytestmark = [pytest.mark.faults, pytest.mark.distributed]


def test_an_evaluation_that_does_not_improve_does_not_hang_the_run(production_job):
    """Every rank takes rank 0's save decision: with evalEvery 1, saveFrequency 4 and nothing
    learnt (lr 1e-12), epoch 2's evaluation is no new best, so no rank saves there (before the
    fix rank 1, which never learnt of epoch 1's best, saved alone and waited in a barrier
    until the process-group timeout)."""
    job = production_job(lr=1e-12, epochs=3, saveFrequency=4, checkpointEvery=None)
    run = job.launch()
    code = run.finish(timeout=180)
    assert code == 0, run.output()[-4000:]
    evals = [e for e in events(job.out) if e["event"] == "eval"]
    assert [(e["phase"], e["epoch"]) for e in evals] == [("before", 0), ("epoch", 1), ("epoch", 2), ("after", 3)]
    ndcg = [e["metrics"]["ndcg@10"] for e in evals]
    assert ndcg[2] <= ndcg[1], "the test needs an evaluation that does not improve"
    assert sorted(p.name for p in (job.out / "checkpoints").iterdir()) == [
        "epoch_1.pt", "epoch_3.pt", "step_24.pt", "step_8.pt"]     # nothing at epoch 2 (step 16)
    assert run.leftovers() == [] and job.temp_files() == []


def test_sigterm_mid_step_with_dataloader_workers_saves_that_step_and_resumes(production_job):
    """torchrun sends SIGTERM to each trainer's whole process group, DataLoader workers
    included: they ignore it, the trainer finishes the step it is in (step 5 of 8 in epoch 1),
    saves it and exits 143 (before the fix the workers died and the trainer with them: no
    checkpoint of step 5). The next launch resumes there and loses nothing."""
    job = production_job()
    run = job.launch(pause_step=5)
    run.stop_while_paused("step")
    assert run.finish(timeout=120) == 143, run.output()[-4000:]
    assert "killed by signal" not in run.output()
    assert job.checkpoints() == [3, 5], run.output()[-4000:]    # checkpointEvery 3, then the stop
    state = torch.load(job.out / "checkpoints" / "step_5.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"]) == (0, 5)
    assert run.leftovers() == [] and job.temp_files() == []

    again = job.launch()
    assert again.finish() == 0, again.output()[-4000:]
    starts = [e for e in events(job.out) if e["event"] == "start"]
    assert starts[-1]["startStep"] == 5
    assert steps(job.out) == list(range(1, 17))       # every step once, none lost
    assert again.leftovers() == [] and job.temp_files() == []


def test_sigusr1_prints_where_every_process_is_and_the_run_goes_on(production_job):
    """A run that seems stuck (here rank 0 held mid-step, rank 1 waiting for it): SIGUSR1 to
    the pod's command prints every thread's stack of both trainers and their four DataLoader
    workers, one process after another, each named, and nothing stops."""
    job = production_job()
    run = job.launch(pause_step=5)
    run.wait_for(run.paused("step"), "rank 0 paused at step 5")
    dump = run.stacks()
    assert dump.count("Current thread 0x") == 6, dump            # 2 trainers + 2 x 2 workers
    assert "_pause" in dump and dump.count("_worker_loop") >= 4, dump
    named = sorted(line.split("(", 1)[1].split(")")[0] for line in dump.splitlines() if "SIGUSR1: the stacks of" in line)
    assert named == ["a DataLoader worker of rank 0"] * 2 + ["a DataLoader worker of rank 1"] * 2 + ["rank 0", "rank 1"], dump
    running = running_threads(dump)     # what a stuck test's failure shows
    assert running.count("SIGUSR1: the stacks of") == 6 and "inject/sitecustomize.py" in running, running
    assert "run/epoch.py" in running and "_worker_loop" in running, running
    run.release()
    assert run.finish(timeout=180) == 0, run.output()[-4000:]
    assert steps(job.out) == list(range(1, 17))
    assert run.leftovers() == [] and job.temp_files() == []
