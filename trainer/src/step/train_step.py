"""One optimizer step: forward and backward over its micro-batches, clipping, the update.

Randomness is re-seeded from (seed, step, rank) before every optimizer step
(``step_seed``), so a run resumed at any step draws what the uninterrupted run drew.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Optional

import numpy as np
import torch

from ..data.with_negatives import with_negatives_joined
from ..distributed import World
from ..precision import Precision
from .accumulation import contrastive_step
from .known_pairs import KnownPairs

log = logging.getLogger(__name__)

LOGIT_SCALE_MAX = math.log(100.0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of optimizer step ``step`` on ``rank``: re-seeding every step makes a run
    resumed at any step draw what the uninterrupted run drew (dropout, patch dropout)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank]).generate_state(1)[0])


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward(net, batch):
    """(left, right, logit scale, logit bias) of a batch through the fused model. With mined
    hard negatives in the batch, ``right`` holds the rows' documents, then the negatives."""
    return net(batch["left_tokens"], batch["left_weights"], *with_negatives_joined(batch))


def train_step(net, micro_batches: list[dict[str, torch.Tensor]], *, kind: str, local_loss: bool,
               precision: Precision, scaler, world: Optional[World] = None,
               known: Optional[KnownPairs] = None, dims: tuple[int, ...] = ()) -> torch.Tensor:
    """Forward and backward of one optimizer step (gradients accumulate in .grad).

    One micro-batch: a plain step. Several: ``accumulation.contrastive_step``'s feature caching
    (exact full-batch gradients, logit scale/bias included; DDP no_sync between micro-steps).
    Returns the full-batch loss, detached.
    """
    siglip = kind == "siglip"

    def rows_of(batch):
        with precision.autocast():
            left, right, scale, bias = forward(net, batch)
        b = left.shape[0]
        return {"left": left, "right": right[:b], "weights": batch["weight"], "left_ids": batch["left_id"],
                "right_ids": batch["right_id"], "logit_scale": scale, "logit_bias": bias if siglip else None,
                **({"negatives": right[b:], "negative_ids": batch["neg_id"].flatten()} if "neg_id" in batch else {})}

    backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else None
    return contrastive_step(rows_of, micro_batches, kind=kind, local_loss=local_loss, model=net, backward=backward,
                            known=known, dims=dims)


def optimizer_step(net, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, torch.Tensor]], *,
                   lr: float, step: int, kind: str, local_loss: bool, grad_clip_norm: Optional[float],
                   precision: Precision, scaler, known: Optional[KnownPairs],
                   logit_scale: torch.Tensor, dims: tuple[int, ...] = ()) -> tuple[float, Optional[float]]:
    """One optimizer step at learning rate ``lr``: forward and backward over the micro-batches,
    unscale, clip, step (skipped on a non-finite loss without a scaler, which skips by itself),
    clamp ``logit_scale`` to [0, ln 100]. Returns the loss and the gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss = float(train_step(net, micro_batches, kind=kind, local_loss=local_loss, precision=precision,
                            scaler=scaler, known=known, dims=dims))
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = grad_norm(trainable_of(optimizer), grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif math.isfinite(loss):
        optimizer.step()
    else:
        log.warning("step %d: non-finite loss %s; skipping the update", step + 1, loss)
    with torch.no_grad():
        logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return loss, norm


def trainable_of(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: the trainable ones."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def grad_norm(params: list[torch.Tensor], clip_norm: Optional[float]) -> Optional[float]:
    """The global gradient L2 norm before clipping (and the clipping to ``clip_norm`` when set):
    the first number to check when a run misbehaves. None when it is not finite."""
    if clip_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm, norm_type=2.0)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros(())
    value = float(norm)
    return round(value, 6) if math.isfinite(value) else None
