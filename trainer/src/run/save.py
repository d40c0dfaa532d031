"""Saving a run: a resumable checkpoint of the progress so far and, at the epoch ends that
ask for one, the model-only epoch file; then retention (keepCheckpoints)."""

from __future__ import annotations

from typing import Any

from ..distributed import World, broadcast_object
from ..report.reporters import Reporters, utc_now
from ..ship.export import CONFIG_KEY
from . import checkpoint as ckpt
from .setup import CheckpointParts
from .state import Progress


def save(parts: CheckpointParts, progress: Progress, report: Reporters, *, world: World, output: str,
         keep: int, model_file: bool) -> None:
    """Publish a resumable checkpoint of the progress so far (unless one exists for this
    step) and, with ``model_file``, the model-only epoch file; then drop resumable
    checkpoints beyond ``keep`` (rank 0; the others wait for it). Every rank then holds rank
    0's list of checkpoints, so ``progress.best`` (which names one of them) and every later
    save decision are the same on all ranks."""
    if world.is_main:
        _publish(parts, progress, report, output, keep, model_file)
    progress.saved_step = progress.step
    if world.distributed:
        progress.checkpoints = broadcast_object(progress.checkpoints)
    world.barrier()


def _publish(parts: CheckpointParts, progress: Progress, report: Reporters, output: str, keep: int,
             model_file: bool) -> None:
    now = utc_now()
    resumable = progress.saved_step != progress.step
    new = []
    if resumable:
        new.append({"uri": ckpt.resumable_location(output, progress.step), "epoch": progress.epoch,
                    "step": progress.step, "time": now})
    if model_file:   # last, so the epoch's evaluation names the file that is kept (best)
        new.append({"uri": ckpt.model_location(output, progress.epoch), "epoch": progress.epoch,
                    "step": progress.step, "time": now})
    progress.checkpoints = progress.checkpoints + new
    model = {"epoch": progress.epoch, "step": progress.step, "name": parts.name, "model": parts.model_name,
             "state_dict": parts.clip.state_dict(), "run": parts.identity, "kontrast_version": _version(),
             CONFIG_KEY: parts.export_config}
    if resumable:
        ckpt.save_resumable(output, {**model, **_resumable_state(parts, progress)})
    if model_file:
        ckpt.save_model(output, model)
    deleted = set(ckpt.prune(output, keep))
    progress.checkpoints = [c for c in progress.checkpoints if c["uri"] not in deleted]
    for entry in new:
        report.on_checkpoint(entry)


def _resumable_state(parts: CheckpointParts, progress: Progress) -> dict[str, Any]:
    """What a resumable checkpoint holds beside the model: the optimizer, scaler and progress."""
    return {"epoch_step": progress.epoch_step, "optimizer": parts.optimizer.state_dict(),
            **({"scaler": parts.scaler.state_dict()} if parts.scaler is not None else {}),
            "eval_before": progress.eval_before, "checkpoints": progress.checkpoints,
            "eval_history": progress.history, "best": progress.best, "seconds": progress.seconds()}


def _version() -> str:
    try:
        from kontrast import __version__

        return __version__
    except Exception:  # noqa: BLE001
        return "unknown"
