"""Learning-rate schedules, as pure functions of the optimizer step.

Same shapes as open_clip's (so results carry over): linear warmup ``lr * (step + 1) /
warmup`` for step < warmup, then cosine decay to 0 at ``total_steps``, a constant, or a
constant followed by a polynomial cooldown over the last ``cooldown_steps``. Warmup wins
where it overlaps the cooldown. ``skipScheduler`` means a constant lr with no warmup.

Being stateless, a resumed run gets exactly the lr of the uninterrupted run at each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..params import Params


@dataclass(frozen=True)
class Schedule:
    kind: str                 #: cosine | const | const-cooldown
    base_lr: float
    warmup: int
    total_steps: int
    cooldown_steps: int = 0
    cooldown_power: float = 1.0
    skip: bool = False

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if self.skip:
            return self.base_lr
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.kind == "const":
            return self.base_lr
        if self.kind == "cosine":
            span = self.total_steps - self.warmup
            e = step - self.warmup
            return 0.5 * (1.0 + math.cos(math.pi * e / span)) * self.base_lr
        if self.kind == "const-cooldown":
            start = self.total_steps - self.cooldown_steps
            if step < start:
                return self.base_lr
            decay = (1.0 - (step - start) / self.cooldown_steps) ** self.cooldown_power
            return decay * self.base_lr
        raise ValueError(f"unknown lrScheduler {self.kind!r}")

    def peak_lr(self) -> float:
        """The highest lr any step of this run reaches (below base_lr when warmup is longer
        than the run)."""
        if self.skip or self.total_steps <= 0:
            return self.base_lr
        if self.warmup > self.total_steps:
            return self.base_lr * self.total_steps / self.warmup
        return self.base_lr

    def warning(self) -> Optional[str]:
        """A message when warmup is longer than the run, else None."""
        if self.skip or self.warmup <= self.total_steps:
            return None
        return (f"warmup ({self.warmup} steps) is longer than the whole run ({self.total_steps} "
                f"optimizer steps): the learning rate never reaches lr={self.base_lr:g}; its peak "
                f"is {self.peak_lr():.4g}. Lower warmup (or raise epochs) to train at the set lr.")


def make_schedule(params: Params, steps_per_epoch: int) -> Schedule:
    """The schedule of a TrainJob's parameters, for ``steps_per_epoch`` optimizer steps per epoch."""
    cooldown = 0
    if params.lr_scheduler == "const-cooldown":
        cooldown = steps_per_epoch * (params.epochs_cooldown or 0)
    return Schedule(
        kind=params.lr_scheduler,
        base_lr=params.lr,
        warmup=params.warmup,
        total_steps=steps_per_epoch * params.epochs,
        cooldown_steps=cooldown,
        cooldown_power=params.lr_cooldown_power,
        skip=params.skip_scheduler,
    )
