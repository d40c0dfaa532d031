"""Where a run stands (``Progress``), and resuming it from the newest complete checkpoint."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import storage
from ..distributed import World, broadcast_object
from ..errors import PermanentError
from . import checkpoint as ckpt

log = logging.getLogger(__name__)


class StepMeter:
    """Step time over the steps this process ran (the first one, with start-up, excluded)."""

    def __init__(self):
        self.times: list[float] = []

    def add(self, seconds: float) -> None:
        self.times.append(seconds)

    def mean(self) -> Optional[float]:
        t = self.times[1:] if len(self.times) > 1 else self.times
        recent = t[-50:]
        return sum(recent) / len(recent) if recent else None


@dataclass
class Progress:
    """Where the run stands: what a checkpoint records and a resumed run restores."""

    epoch: int = 0                  #: epochs completed
    epoch_step: int = 0             #: optimizer steps done in the current epoch
    step: int = 0                   #: optimizer steps completed
    eval_before: Optional[dict[str, dict[str, float]]] = None   #: each eval set's metrics before training
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)    #: evaluations so far, oldest first
    best: Optional[dict[str, Any]] = None   #: the saved checkpoint with the best nDCG@10 (first eval set) so far
    resumed_from: Optional[str] = None
    saved_step: Optional[int] = None  #: the step of the newest resumable checkpoint
    seconds_before: float = 0.0     #: the earlier invocations' time, up to the checkpoint resumed from
    started: float = field(default_factory=time.monotonic)   #: when this invocation started
    last_loss: Optional[float] = None
    last_grad_norm: Optional[float] = None
    last_data_wait: float = 0.0     #: seconds the last step waited for its batches
    last_step_seconds: float = 0.0
    meter: StepMeter = field(default_factory=StepMeter)

    def seconds(self) -> float:
        """The run's time so far, over every invocation (what its checkpoints kept of them)."""
        return self.seconds_before + time.monotonic() - self.started

    def advance(self, steps_per_epoch: int) -> None:
        """Count one optimizer step; the last step of an epoch completes it."""
        self.step += 1
        self.epoch_step += 1
        if self.epoch_step == steps_per_epoch:
            self.epoch, self.epoch_step = self.epoch + 1, 0


def resume(output: str, world: World, *, identity: dict[str, Any], clip, optimizer, scaler,
           steps_per_epoch: int) -> Progress:
    """The progress of the newest complete checkpoint in ``output`` (rank 0 finds it, every
    rank checks that this run wrote it and loads it into the model, optimizer and scaler), or
    a fresh start."""
    if world.is_main:   # before this run writes: the operator starts an attempt once the old pods are gone
        ckpt.remove_temporaries(output)
    found = ckpt.load_latest(output) if world.is_main else None
    location = broadcast_object(found[1] if found else None)
    if location is None:
        return Progress()
    state = found[0] if world.is_main else ckpt.load_checkpoint_file(location)
    ckpt.check_identity(state.get("run"), identity, location)
    _load_state(state, location, clip, optimizer, scaler)
    progress = _progress_of(state, steps_per_epoch, location)
    log.info("resuming from %s (epoch %d, step %d)", location, progress.epoch, progress.step)
    return progress


def _progress_of(state: dict[str, Any], steps_per_epoch: int, location: str) -> Progress:
    """Where a checkpoint's run stood, in this run's steps (the same unless the data changed)."""
    epoch, epoch_step = int(state["epoch"]), min(int(state.get("epoch_step", 0)), steps_per_epoch)
    if epoch_step == steps_per_epoch:
        epoch, epoch_step = epoch + 1, 0
    step = epoch * steps_per_epoch + epoch_step
    if int(state["step"]) != step:
        log.warning("checkpoint %s was written after step %s; with this data and world size that point of "
                    "epoch %d is step %d, which the schedule continues from", location, state["step"],
                    epoch + 1, step)
    # Retention deletes older files after a checkpoint is published: list what is left.
    kept = [c for c in state.get("checkpoints") or [] if storage.exists(c["uri"])]
    return Progress(epoch=epoch, epoch_step=epoch_step, step=step, eval_before=_by_set(state.get("eval_before")),
                    checkpoints=kept, history=list(state.get("eval_history") or []), best=state.get("best"),
                    resumed_from=location, saved_step=step, seconds_before=float(state.get("seconds") or 0.0))


def _by_set(eval_before: Optional[dict[str, Any]]) -> Optional[dict[str, dict[str, float]]]:
    """The checkpoint's per-set metrics before training; None for a checkpoint of a trainer that
    kept one flat table (its set's name is unknown here; its history still holds them)."""
    if not eval_before or not all(isinstance(v, dict) for v in eval_before.values()):
        return None
    return eval_before


def _load_state(state: dict[str, Any], location: str, clip, optimizer, scaler) -> None:
    try:
        clip.load_state_dict(ckpt.strip_module_prefix(state["state_dict"]))
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise PermanentError(
            f"cannot resume from {location}: it was written by a run with a different model or "
            f"parameters ({str(exc).strip().splitlines()[-1].strip()}). Training inputs are fixed for an "
            "output: use a new output (or a new TrainJob) to change them") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
