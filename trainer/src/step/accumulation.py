"""How one optimizer step is computed over several micro-batches without changing the maths:
feature-caching accumulation (accumFreq; the micro-batch search of dynamicBatchSize that
chooses the micro-batch is in ``micro_batch.py``).

Feature-caching accumulation (``contrastive_step``). A contrastive loss is not a sum of
per-sample terms, so plain gradient accumulation would shrink the batch of negatives. We
instead (1) encode every micro-batch without gradients and cache the embeddings, then (2)
re-encode each micro-batch j with gradients and evaluate the *full* loss on the cached
embeddings with micro-batch j's live ones in place, and backpropagate. Summed over j, the
tower gradients are exactly the full batch's. The full loss is evaluated k times, so the
logit scale and bias would collect k times their gradient (open_clip 3.3.0 does this); here
each micro-step passes them through ``scale_grad(., 1/k)``, which makes their gradient exact
as well. Micro-steps 0..k-2 run under DDP's ``no_sync`` (one all-reduce per optimizer step).
The RNG state of each micro-batch's caching pass is replayed for its gradient pass, so
dropout / patch dropout draw the same masks in both and the cached embeddings are the ones
the gradient pass differentiates. Cost: one extra no-grad forward per sample (about 4/3 of
the compute) and the memory of the cached embeddings (k * B * d floats). BatchNorm towers
(ResNet/timm) update their running statistics in both passes, as in open_clip.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .known_pairs import KnownPairs
from .losses import scale_grad, weighted_contrastive_loss

__all__ = ["contrastive_step", "matryoshka_loss", "split_micro_batches", "ROW_KEYS"]

#: Keys of the forward output that hold one row per sample (concatenated across micro-batches):
#: the embeddings (live in their own micro-step, cached in the others), then the metadata.
#: "negatives" / "negative_ids": the rows' mined hard negatives (hardNegatives), perQuery each.
EMBEDDING_KEYS = ("left", "right", "negatives")
ROW_KEYS = (*EMBEDDING_KEYS, "weights", "left_ids", "right_ids", "negative_ids")


def split_micro_batches(batch_size: int, micro_batch: int) -> list[int]:
    """Sizes of ceil(B/m) near-equal micro-batches covering B rows (e.g. 10, 4 -> [4, 3, 3])."""
    if micro_batch <= 0 or batch_size <= 0:
        raise ValueError("batch sizes must be positive")
    k = math.ceil(batch_size / micro_batch)
    base, extra = divmod(batch_size, k)
    return [base + 1] * extra + [base] * (k - extra)


def _rng_state(device: torch.device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def contrastive_step(
    forward: Callable[[Any], Mapping[str, Any]],
    micro_batches: Sequence[Any],
    *,
    kind: str = "ce",
    local_loss: bool = False,
    model: Optional[nn.Module] = None,
    backward: Optional[Callable[[torch.Tensor], None]] = None,
    known: Optional[KnownPairs] = None,
    dims: Sequence[int] = (),
) -> torch.Tensor:
    """Forward and backward of one optimizer step over ``micro_batches`` (gradients accumulate
    in ``.grad``; the caller zeroes them before and steps the optimizer after).

    ``forward(mb)`` returns a mapping with "left", "right" ([b, d] normalised embeddings),
    "weights" ([b]), optional "left_ids" / "right_ids" ([b]), "logit_scale" (exponentiated)
    and optional "logit_bias". It must call the DDP-wrapped model once (DDP needs one forward
    per backward). ``model``: the (possibly DDP-wrapped) model, for ``no_sync``.
    ``backward``: e.g. ``lambda l: scaler.scale(l).backward()`` for fp16 AMP.
    ``known``: the training table's relevant pairs (``known_pairs.KnownPairs``), for the targets.
    ``dims``: Matryoshka widths; the loss adds the loss at each (``matryoshka_loss``).
    Returns the full-batch loss (detached).
    """
    backward = backward or (lambda loss: loss.backward())
    if not micro_batches:
        raise ValueError("no micro-batches")
    settings = {"kind": kind, "local_loss": local_loss, "known": known, "dims": tuple(dims)}
    if len(micro_batches) == 1:
        out = forward(micro_batches[0])
        loss = _loss_of(out, out["logit_scale"], out.get("logit_bias"), **settings)
        backward(loss)
        return loss.detach()
    return _cached_step(forward, micro_batches, settings, model, backward)


def _loss_of(rows: Mapping[str, Any], scale, bias, *, kind: str, local_loss: bool,
             known: Optional[KnownPairs], dims: tuple[int, ...]) -> torch.Tensor:
    def loss(left, right, negatives=None):
        return weighted_contrastive_loss(
            left, right, rows["weights"], scale, bias, kind=kind,
            left_ids=rows.get("left_ids"), right_ids=rows.get("right_ids"), local_loss=local_loss, known=known,
            negatives=negatives, negative_ids=rows.get("negative_ids"))

    return matryoshka_loss(loss, rows["left"], rows["right"], dims, negatives=rows.get("negatives"))


def matryoshka_loss(loss: Callable[..., torch.Tensor], left: torch.Tensor, right: torch.Tensor,
                    dims: Sequence[int], negatives: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``loss`` at full width plus ``loss`` at each Matryoshka width, on the embeddings cut to
    that width and renormalised (so the first ``d`` coordinates alone are a usable embedding).
    Sums, unweighted, as sentence-transformers' MatryoshkaLoss does by default. Each term is a
    full-batch loss with exact gradients (logit scale and bias included), so the sum is too.
    ``negatives`` (mined hard negatives) are cut like the documents and passed as a third
    argument when given."""
    def at(*embeddings):
        return loss(*embeddings) if negatives is not None else loss(*embeddings[:2])

    total = at(left, right, negatives)
    width = left.shape[1]
    for d in dims:
        if not 0 < d < width:
            raise ValueError(f"Matryoshka width {d} is not below the embedding width {width}")
        total = total + at(*(None if x is None else F.normalize(x[:, :d], dim=-1) for x in (left, right, negatives)))
    return total


def _cached_step(forward, micro_batches: Sequence[Any], settings: dict[str, Any], model: Optional[nn.Module],
                 backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Feature caching over k > 1 micro-batches: cache every micro-batch's rows without
    gradients, then one gradient pass per micro-batch against the cached rest (DDP's no_sync
    on all but the last), each replaying its caching pass's RNG state."""
    k = len(micro_batches)
    state_device = (torch.device("cuda", torch.cuda.current_device())
                    if torch.cuda.is_available() and torch.cuda.is_initialized() else torch.device("cpu"))
    cached, states = _cache_rows(forward, micro_batches, state_device)
    after = _rng_state(state_device)
    sync_off = getattr(model, "no_sync", None)
    loss = None
    for j, mb in enumerate(micro_batches):
        ctx = sync_off() if (sync_off is not None and j < k - 1) else contextlib.nullcontext()
        with ctx:
            _set_rng_state(states[j], state_device)
            out = forward(mb)
            bias = out.get("logit_bias")
            loss = _loss_of(_rows_with(out, j, cached), scale_grad(out["logit_scale"], 1.0 / k),
                            None if bias is None else scale_grad(bias, 1.0 / k), **settings)
            backward(loss)
    _set_rng_state(after, state_device)
    return loss.detach()


def _cache_rows(forward, micro_batches: Sequence[Any], state_device: torch.device) -> tuple[list[dict], list]:
    """Every micro-batch's rows, detached, and the RNG state before each one's forward."""
    cached: list[dict] = []
    states = []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(_rng_state(state_device))
            out = forward(mb)
            cached.append({key: out[key].detach() for key in ROW_KEYS if out.get(key) is not None})
    return cached, states


def _rows_with(out: Mapping[str, Any], j: int, cached: list[dict]) -> dict[str, torch.Tensor]:
    """The full batch's rows with micro-batch j's live embeddings in place of its cached ones."""
    rows = {key: torch.cat([out[key] if i == j else cached[i][key] for i in range(len(cached))])
            for key in EMBEDDING_KEYS if key in cached[0]}
    for key in ROW_KEYS[len(EMBEDDING_KEYS):]:
        if key in cached[0]:
            rows[key] = torch.cat([c[key] for c in cached])
    return rows
