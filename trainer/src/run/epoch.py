"""One epoch of a run: its optimizer steps (saving when the save policy says so), then the
epoch's end (evaluating when due, saving every saveFrequency epochs and at a new best)."""

from __future__ import annotations

import time
from typing import Any, Optional

from ..distributed import broadcast_object
from ..errors import Interrupted
from ..report.reporters import Reporters, utc_now
from ..step.train_step import optimizer_step, seed_everything, step_seed, to_device
from . import checkpoint as ckpt
from .evaluations import SetMetrics, is_new_best, measure, note_eval, report_eval
from .save import save
from .save_policy import SavePolicy
from .setup import Run
from .state import Progress


def train_epoch(run: Run, progress: Progress, report: Reporters, policy: SavePolicy) -> None:
    """The rest of the current epoch (all of it unless resumed in its middle), one optimizer
    step at a time; saves when ``policy`` says so, and after saving raises ``Interrupted``
    when it says stop."""
    epoch = progress.epoch
    run.train_ds.set_epoch(epoch)
    run.sampler.set_epoch(epoch, progress.epoch_step)
    it = run.loader.epoch(epoch, run.sampler)
    for _ in range(progress.epoch_step, run.plan.steps_per_epoch):
        seed_everything(step_seed(run.params.seed, progress.step, run.world.rank))
        t0 = time.monotonic()
        micro_batches = [to_device(next(it), run.world.device) for _ in range(run.plan.micro_steps)]
        progress.last_data_wait = time.monotonic() - t0
        lr = run.plan.schedule.lr(progress.step)
        progress.last_loss, progress.last_grad_norm = _step(run, micro_batches, lr, progress.step)
        progress.advance(run.plan.steps_per_epoch)
        progress.last_step_seconds = time.monotonic() - t0
        progress.meter.add(progress.last_step_seconds)
        if run.world.is_main:
            report.on_step(step_info(run, progress, epoch, lr))
        _save_when_asked(run, progress, report, policy)


def _step(run: Run, micro_batches, lr: float, step: int) -> tuple[float, Optional[float]]:
    params = run.params
    return optimizer_step(run.net, run.optimizer, micro_batches, lr=lr, step=step, kind=params.weighted_loss,
                          local_loss=params.local_loss, grad_clip_norm=params.grad_clip_norm,
                          precision=run.precision, scaler=run.scaler, known=run.known_pairs,
                          logit_scale=run.clip.logit_scale, dims=params.matryoshka_dims or ())


def _save_when_asked(run: Run, progress: Progress, report: Reporters, policy: SavePolicy,
                     decision: Optional[tuple[bool, bool]] = None) -> None:
    save_now, stop = decision or policy.poll(progress.step)
    if save_now:
        save(run.checkpoint, progress, report, world=run.world, output=run.params.output,
             keep=run.params.keep_checkpoints, model_file=False)
        policy.saved()
        # a SIGTERM during the save: stop on it rather than spend the grace period on
        # another step and another save
        stop = stop or policy.stop_wanted()
    if stop:
        raise Interrupted(f"stopped after optimizer step {progress.step}, saved to "
                          f"{ckpt.resumable_location(run.params.output, progress.step)}")


def stop_at_epoch_end(run: Run, progress: Progress, report: Reporters, policy: SavePolicy) -> None:
    """A SIGTERM that arrived during the epoch's end (its evaluation, its save) stops the run
    there, saved, rather than after the next epoch's first step."""
    if policy.stop_wanted():
        _save_when_asked(run, progress, report, policy, (True, True))


def step_info(run: Run, progress: Progress, epoch: int, lr: float) -> dict[str, Any]:
    """The progress line of the step just done (progress.jsonl, the terminal, status.progress)."""
    step, total = progress.step, run.plan.schedule.total_steps
    mean = progress.meter.mean()
    global_rows = run.plan.step_rows * run.world.world_size
    return {
        "epoch": epoch + 1, "epochs": run.params.epochs, "step": step, "totalSteps": total,
        "percent": round(100.0 * step / total, 2) if total else 100.0,
        "samplesPerSecond": round(global_rows / mean, 2) if mean else None,
        "etaSeconds": round(mean * (total - step), 1) if mean else None,
        "loss": progress.last_loss, "lr": lr, "microBatchSize": run.plan.micro,
        "gradNorm": progress.last_grad_norm, "logitScale": round(float(run.clip.logit_scale.detach().exp()), 4),
        "dataWaitSeconds": round(progress.last_data_wait, 4),
        "computeSeconds": round(progress.last_step_seconds - progress.last_data_wait, 4),
        "updatedAt": utc_now(),
    }


def end_epoch(run: Run, progress: Progress, report: Reporters) -> bool:
    """Evaluate every evalEvery epochs (the last epoch's evaluation is the final one), then
    checkpoint every saveFrequency epochs, after the last, and whenever the evaluation found a
    new best model (so status.checkpoints.best always names a saved model file). Returns
    whether it saved.

    ``save`` is collective (rank 0 writes, the others wait for it), so every rank must take
    the same decision: rank 0 takes it and broadcasts it (a rank that saved while rank 0
    trained on would wait in ``save``'s barrier until the process-group timeout)."""
    params = run.params
    last = progress.epoch == params.epochs
    due = params.eval_every > 0 and progress.epoch % params.eval_every == 0 and not last
    sets = measure_run(run) if due else None
    saving = last or progress.epoch % params.save_frequency == 0 or is_new_best(progress, sets)
    if run.world.distributed:
        saving = bool(broadcast_object(saving))
    if sets is not None:
        note_eval(progress, "epoch", sets, ckpt.model_location(params.output, progress.epoch) if saving else None)
    if saving:
        save(run.checkpoint, progress, report, world=run.world, output=params.output,
             keep=params.keep_checkpoints, model_file=True)
    report_eval(progress, report, "epoch", sets, is_main=run.world.is_main)
    return saving


def measure_run(run: Run, gallery_phase: Optional[str] = None) -> Optional[SetMetrics]:
    """``measure`` with this run's model, eval sets, batch size, device and precision."""
    return measure(run.net, run.evaluations, batch_size=run.params.batch_size, device=run.world.device,
                   precision=run.precision, workers=run.params.workers, gallery_phase=gallery_phase,
                   dims=run.params.matryoshka_dims or ())
