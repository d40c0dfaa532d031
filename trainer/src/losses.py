"""Weighted contrastive losses that give the same answer on 1 process or N.

``weighted_contrastive_loss`` scores the left (query) embeddings against the right (document)
embeddings of the *global* batch: every process's features are all-gathered **with
gradients**, so N processes x batch B train exactly like 1 process x N*B.

Conventions (the caller relies on them):

* Loss value: the full-batch loss on every rank (also with ``local_loss``).
* Gradients: DDP averages parameter gradients over ranks. Each rank's loss is built so that
  this average is the exact full-batch gradient. The gradient that reaches rank r's own
  feature rows is therefore ``world_size x dL/dx_r`` (every rank's loss sees those rows,
  and the gather's backward sums over ranks, as open_clip's gather_with_grad does). The
  logit scale and bias are replicated parameters: each rank's gradient equals dL/ds.
* ``local_loss``: rank r computes only its own rows (local x global logits, memory
  O(B x N) instead of O(N^2)). The rows of all ranks together partition the full loss, so
  rank r's part is multiplied by world_size before DDP's averaging. open_clip's local_loss
  without gather_with_grad leaves the other ranks' feature gradients out; this never does.
* Numerics: the logits and the loss are computed in float32 with autocast off (they are a
  tiny share of the FLOPs and bf16 logits lose ranking precision).

Kinds:

* ``ce``: symmetric InfoNCE. Each row's left->right and right->left cross-entropy terms are
  multiplied by the row weight, reduced as 1/2 (sum w_i CE_i + sum w_i CE'_i) / sum w_i.
  Equal weights give exactly ``open_clip.loss.ClipLoss``; a row of weight 0 adds no term
  but still serves as a negative for the others. All-zero weights give loss 0.
* ``siglip``: sigmoid loss over all pairs. Positive (diagonal) terms are weighted by
  w_i / mean(w), negatives by 1, and the sum is divided by the global batch size, as in
  ``open_clip.loss.SigLipLoss``; equal weights give exactly SigLipLoss.

Duplicates (``left_ids`` / ``right_ids``): graded-relevance data has many documents per
query, so a random batch often holds the same query text (or the same document) twice.
Treating the duplicate's partner as a negative punishes the model for ranking a relevant
document high, which is what makes GCL-style losses plateau. When ids are given, a pair
(i, j != i) whose left ids are equal, or whose right ids are equal, is removed from the
negatives of both directions (CE: logit -> -inf; siglip: the term is dropped). The
positive pair (i, i) is always kept, so every row keeps a target.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["weighted_contrastive_loss", "gather_with_grad", "scale_grad", "KINDS"]

KINDS = ("ce", "siglip")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient for our rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = _world()
        ctx.world, ctx.rank, ctx.n = world, rank, x.shape[0]
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((ctx.n,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        grad = grad.clone()  # all_reduce is in place; the incoming grad may be shared
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks (rank order); gradients flow back to each owner.

    All ranks must pass the same number of rows (the sharding guarantees it).
    """
    world, _ = _world()
    if world == 1:
        return x
    if not x.requires_grad:
        return _gather_no_grad(x)
    return _GatherWithGrad.apply(x)


def _gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    world, _ = _world()
    if world == 1:
        return x
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return torch.cat(out)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor``.

    Feature-caching accumulation evaluates the same full-batch loss once per micro-step,
    so the logit scale and bias would collect k times their gradient (open_clip's bug).
    Passing ``scale_grad(logit_scale, 1/k)`` in each micro-step keeps the value exact and
    makes the sum over micro-steps the full-batch gradient, while the parameter still takes
    part in every backward (DDP needs that).
    """
    return _ScaleGrad.apply(x, factor)


def _negatives_mask(row_lid, row_rid, col_lid, col_rid, row_offset: int, device):
    """True where pair (row, col) is a duplicate (same left or right id) but not the positive."""
    mask = None
    if row_lid is not None:
        mask = row_lid[:, None] == col_lid[None, :]
    if row_rid is not None:
        same = row_rid[:, None] == col_rid[None, :]
        mask = same if mask is None else (mask | same)
    if mask is None:
        return None
    rows = torch.arange(mask.shape[0], device=device)
    mask[rows, rows + row_offset] = False
    return mask


def weighted_contrastive_loss(
    left: torch.Tensor,
    right: torch.Tensor,
    weights: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: Optional[torch.Tensor] = None,
    kind: str = "ce",
    left_ids: Optional[torch.Tensor] = None,
    right_ids: Optional[torch.Tensor] = None,
    local_loss: bool = False,
) -> torch.Tensor:
    """Weighted contrastive loss of this process's rows against the global batch.

    left, right: [b, d] L2-normalised embeddings of this process's (micro-)batch; weights:
    [b] non-negative row weights; logit_scale: already exponentiated; logit_bias: raw or
    None (siglip treats None as 0); left_ids / right_ids: [b] int64 ids for the duplicate
    mask (see the module docstring). Returns a scalar: the full-batch loss.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    if left.shape != right.shape or left.dim() != 2:
        raise ValueError(f"left and right must both be [b, d]; got {tuple(left.shape)} and {tuple(right.shape)}")
    b = left.shape[0]
    if weights.shape != (b,):
        raise ValueError(f"weights must be [b]={b}; got {tuple(weights.shape)}")
    world, rank = _world()
    device = left.device

    with torch.autocast(device_type=device.type, enabled=False):
        left = left.float()
        right = right.float()
        weights = weights.to(device=device, dtype=torch.float32)
        scale = logit_scale.float()
        bias = logit_bias.float() if logit_bias is not None else None
        lid = left_ids.to(device) if left_ids is not None else None
        rid = right_ids.to(device) if right_ids is not None else None

        if world > 1:
            # Two collectives per call (each one is a synchronisation point between ranks):
            # the features together, with gradients, and the row metadata together (float64
            # holds ids exactly up to 2**53).
            d_left = left.shape[1]
            both = gather_with_grad(torch.cat([left, right], dim=1))
            all_left, all_right = both[:, :d_left], both[:, d_left:]
            zeros = torch.zeros_like(weights, dtype=torch.float64)
            meta = _gather_no_grad(torch.stack([weights.double(), zeros if lid is None else lid.double(),
                                                zeros if rid is None else rid.double()], dim=1))
            all_w = meta[:, 0].float()
            all_lid = meta[:, 1].long() if lid is not None else None
            all_rid = meta[:, 2].long() if rid is not None else None
        else:
            all_left, all_right, all_w, all_lid, all_rid = left, right, weights, lid, rid
        n = all_left.shape[0]

        split = local_loss and world > 1
        if split:
            offset = rank * b
            q, d, w, q_lid, q_rid = left, right, weights, lid, rid
        else:
            offset = 0
            q, d, w, q_lid, q_rid = all_left, all_right, all_w, all_lid, all_rid
        rows = q.shape[0]
        labels = torch.arange(rows, device=device) + offset
        mask = _negatives_mask(q_lid, q_rid, all_lid, all_rid, offset, device)

        # Rows are this process's (or all) queries/documents, columns the global batch.
        logits_lr = scale * (q @ all_right.T)
        if bias is not None:
            logits_lr = logits_lr + bias

        if kind == "ce":
            logits_rl = scale * (d @ all_left.T)
            if bias is not None:
                logits_rl = logits_rl + bias
            if mask is not None:
                logits_lr = logits_lr.masked_fill(mask, float("-inf"))
                logits_rl = logits_rl.masked_fill(mask, float("-inf"))
            ce_lr = F.cross_entropy(logits_lr, labels, reduction="none")
            ce_rl = F.cross_entropy(logits_rl, labels, reduction="none")
            total_w = all_w.sum()
            part = 0.5 * ((w * ce_lr).sum() + (w * ce_rl).sum())
            part = torch.where(total_w > 0, part / total_w.clamp_min(torch.finfo(torch.float32).tiny), part * 0)
        else:
            # Only one direction: the N x N sigmoid terms are symmetric in left and right.
            signs = -torch.ones_like(logits_lr)
            signs[torch.arange(rows, device=device), labels] = 1.0
            terms = F.logsigmoid(signs * logits_lr)
            mean_w = all_w.mean()
            pos_w = torch.where(mean_w > 0, w / mean_w.clamp_min(torch.finfo(torch.float32).tiny), w * 0)
            m = torch.ones_like(terms)
            if mask is not None:
                m = m.masked_fill(mask, 0.0)
            m[torch.arange(rows, device=device), labels] = pos_w
            part = -(m * terms).sum() / n

        if not split:
            return part
        # Rank r holds 1/world of the full loss: scale it so DDP's average is the full
        # gradient, and report the full value (sum of all ranks' parts) on every rank.
        scaled = part * world
        total = part.detach().clone()
        dist.all_reduce(total)
        return scaled + (total - scaled).detach()
