"""TensorBoard scalars in ``<output>/tensorboard/`` (the optional ``kontrast[tensorboard]`` extra).

When the ``tensorboard`` package is installed, rank 0 logs every step's loss, lr, logit
scale, gradient norm, samples/s, data-wait and compute time, and every evaluation's metrics
(at the step it ran after). Without it nothing is logged and nothing fails. Event files are
written locally, so an object-store output gets none (a warning says so).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

from ..locations import has_scheme
from .reporters import Reporter, eval_scalars

log = logging.getLogger(__name__)

#: progress.jsonl step key -> TensorBoard tag.
STEP_SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "logitScale": "train/logit_scale",
    "gradNorm": "train/grad_norm",
    "samplesPerSecond": "perf/samples_per_second",
    "dataWaitSeconds": "perf/data_wait_seconds",
    "computeSeconds": "perf/compute_seconds",
}


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_reporter(logdir: str) -> Optional[Reporter]:
    """A reporter writing to ``logdir``, or None when TensorBoard is not installed or cannot write there."""
    if not available():
        return None
    if has_scheme(logdir):
        log.warning("TensorBoard logs are written only to a local or mounted output, not to %s", logdir)
        return None
    return TensorBoardReporter(logdir)


class TensorBoardReporter(Reporter):
    def __init__(self, logdir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=logdir)
        self.step = 0

    def on_start(self, info):
        self.step = int(info.get("startStep") or 0)

    def on_step(self, p):
        self.step = int(p["step"])
        for key, tag in STEP_SCALARS.items():
            value = p.get(key)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(tag, value, self.step)

    def on_eval(self, e):
        for name, value in eval_scalars(e).items():
            self.writer.add_scalar(f"eval/{name}", value, self.step)
        self.writer.flush()

    def close(self):
        self.writer.close()
