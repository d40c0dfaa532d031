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

Graded multi-positive targets. Graded-relevance data has several documents per query, so a
random batch often holds the same query twice, or a document relevant to another row's query.
Every pair (query i, document j) whose relevance is known has a grade, its weight (the
highest, if several rows give it); every other pair is a negative. Known means: some row of
the batch pairs query i's identity with document j's identity, or, given ``known``
(``KnownPairs``, built from the whole training table), some row of the table does. The
second matters in catalogues, where one product is relevant to many queries: the batch
brings it in for one of them, and without the table it would be a negative for the others
(a false negative, pushed away from a query it answers). Identities are ``left_ids`` /
``right_ids`` (absent: every row is its own query / document; ``known`` is then unused).

Mined hard negatives (``negatives``, ``negative_ids``: spec.hardNegatives). Extra documents
with no row of their own: columns of the left->right direction only, gathered from every
rank like the rows. They only ever count as negatives: no row's own pair is one of them, so
they are never pulled towards a query, and a query they are known to answer (a table pair of
weight above 0, through ``known`` or a row of the batch) leaves them out of its terms, so
they are never pushed from it either. A negative id below 0 is an empty slot (a query with
fewer negatives), left out everywhere. In ``ce`` they join each row's softmax as unknown
pairs; in ``siglip`` each adds the negative term log sigmoid(-x) for each row.

Kinds:

* ``ce``: symmetric graded InfoNCE. Row i's left->right term is the cross-entropy of its
  own pair (its query with its document, the target split evenly over columns holding a copy
  of the document) against every column it must outrank: the unknown pairs and the known
  pairs of a lower grade than its own. Known pairs of its grade or higher (another document
  as relevant to its query, or more) are left out of its softmax: they are not below it, so
  they are neither pushed away nor pulled. Likewise right->left with the row's document
  against the columns' queries. Each row's two terms are multiplied by the row weight,
  reduced as 1/2 (sum w_i CE_i + sum w_i CE'_i) / sum w_i. The optimum ranks every query's
  documents by grade, and the gap between grades keeps widening as plain CE's gap to its
  one positive does. Soft targets in proportion to the grades (the version before issue
  #25) had their optimum at a logit gap of ln(3/1) between grades 3 and 1, 0.08 in cosine
  at a logit scale of 14, so the order of a new query's grades was left to the seed; masking
  every other relevant document (the version before that) left the order free. With one
  document per query nothing is left out and this is open_clip's ClipLoss with weighted rows;
  equal weights give exactly ``open_clip.loss.ClipLoss``. A row of weight 0 adds no term but
  still serves as a negative for the others (a pair known only at weight 0 is below every
  grade). All-zero weights give loss 0.
* ``siglip``: sigmoid (binary cross-entropy) loss over all pairs. A known pair is a positive
  weighted by relevance / mean(w), with the graded label relevance / (the best relevance of
  its query in the batch): 1 for the best document, 2/3 for a grade 2 beside a grade 3. The
  optimal sigmoid equals the label, so grades stay ordered (hard +1 labels would push every
  relevant document to the same saturated score). Other pairs, those known only at weight 0
  among them, are negatives (label 0, weight 1), and the sum is divided by the global batch size, as in
  ``open_clip.loss.SigLipLoss``; one document per query and equal weights give exactly
  SigLipLoss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..distributed import all_gather, gather_with_grad, sum_over_ranks, world_and_rank
from .known_pairs import KnownPairs, PairRelevance, max_per_key

__all__ = ["weighted_contrastive_loss", "scale_grad", "KINDS"]

KINDS = ("ce", "siglip")


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


def _ranked_ce(logits: torch.Tensor, r: torch.Tensor, c: torch.Tensor, rel: torch.Tensor,
               own: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of each row's own pair against the columns it must outrank.

    The known pairs come sparse as (row, column, relevance); ``own`` marks the entries that are
    the row's own pair (its document, or its query, in every column that holds a copy; the
    target is split evenly over the copies). A row of grade g leaves out of its softmax the
    other known pairs of grade g or more (they are not below it) and keeps those of a lower
    grade as negatives, with every unknown pair: lse_i(kept) - mean_own logit_ij.
    """
    rows = logits.shape[0]
    grade = torch.zeros(rows, dtype=rel.dtype, device=rel.device).scatter_reduce(
        0, r[own], rel[own], reduce="amax", include_self=False)
    above = ~own & (rel >= grade[r])
    kept = logits.index_put((r[above], c[above]), torch.tensor(float("-inf"), dtype=logits.dtype,
                                                                device=logits.device))
    copies = torch.zeros(rows, dtype=logits.dtype, device=logits.device).index_add(
        0, r[own], torch.ones_like(rel[own], dtype=logits.dtype))
    picked = torch.zeros(rows, dtype=logits.dtype, device=logits.device).index_add(0, r[own], logits[r[own], c[own]])
    ce = torch.logsumexp(kept, dim=1) - picked / copies.clamp_min(1)
    return torch.where(copies > 0, ce, torch.zeros_like(ce))


def _logits(rows: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]):
    logits = scale * (rows @ columns.T)
    return logits if bias is None else logits + bias


def _ce_part(logits_lr, known_lr, logits_rl, known_rl, pairs: PairRelevance, mine: slice, w,
             all_w) -> torch.Tensor:
    """These rows' share of the symmetric graded InfoNCE (the whole loss without split)."""
    r, c, _ = known_lr
    ce_lr = _ranked_ce(logits_lr, *known_lr, own=pairs.d[mine][r] == pairs.d[c])
    r, c, _ = known_rl
    ce_rl = _ranked_ce(logits_rl, *known_rl, own=pairs.q[mine][r] == pairs.q[c])
    total_w = all_w.sum()
    part = 0.5 * ((w * ce_lr).sum() + (w * ce_rl).sum())
    return torch.where(total_w > 0, part / total_w.clamp_min(torch.finfo(torch.float32).tiny), part * 0)


def _negatives_part(neg_logits: torch.Tensor) -> torch.Tensor:
    """siglip's terms of the mined negatives: log sigmoid(-x) each (left-out pairs are -inf,
    whose term is exactly 0)."""
    return -F.logsigmoid(-neg_logits).sum()


def _siglip_part(logits_lr, known_lr, all_w, n: int) -> torch.Tensor:
    """These rows' share of the sigmoid loss. Only one direction: the N x N sigmoid terms are
    symmetric in left and right. Every pair is a negative, log sigmoid(-x), except the known
    ones, whose term is their weight x the binary cross-entropy with their graded label:
    relevance over the best of its query in the batch (1 for the best; the optimum sigmoid
    equals the label, so grades stay ordered)."""
    r, c, rel = known_lr
    # A pair known only at weight 0 (a stated negative) is a plain negative, as in ce: with
    # its label 0 and weight 0 its terms would cancel the negative term to exactly nothing.
    stated = rel > 0
    r, c, rel = r[stated], c[stated], rel[stated]
    tiny = torch.finfo(torch.float32).tiny
    best = torch.zeros(logits_lr.shape[0], dtype=rel.dtype, device=rel.device).scatter_reduce(
        0, r, rel, reduce="amax")[r]
    label = torch.where(best > 0, rel / best.clamp_min(tiny), torch.zeros_like(rel))
    mean_w = all_w.mean()
    pos_w = torch.where(mean_w > 0, rel / mean_w.clamp_min(tiny), rel * 0)
    x = logits_lr[r, c]
    positives = pos_w * (label * F.logsigmoid(x) + (1 - label) * F.logsigmoid(-x)) - F.logsigmoid(-x)
    return -(F.logsigmoid(-logits_lr).sum() + positives.sum()) / n


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
    known: Optional[KnownPairs] = None,
    negatives: Optional[torch.Tensor] = None,
    negative_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Weighted contrastive loss of this process's rows against the global batch.

    left, right: [b, d] L2-normalised embeddings of this process's (micro-)batch; weights:
    [b] non-negative row weights; logit_scale: already exponentiated; logit_bias: raw or
    None (siglip treats None as 0); left_ids / right_ids: [b] int64 query / document
    identities for the graded targets (see the module docstring); known: the training table's
    relevant pairs, by the same (table) identities, on ``left``'s device; negatives: [m, d]
    mined hard negatives of this process's rows with their document identities negative_ids
    [m] (-1: an empty slot), see the module docstring. Returns a scalar: the full-batch loss.
    """
    _check_inputs(left, right, weights, kind)
    world, rank = world_and_rank()
    with torch.autocast(device_type=left.device.type, enabled=False):
        scale = logit_scale.float()
        bias = logit_bias.float() if logit_bias is not None else None
        own = _float_rows(left, right, weights, left_ids, right_ids)
        every = _gather_rows(own) if world > 1 else own
        pairs = _pair_relevance(every, known)
        split = local_loss and world > 1
        rows = own if split else every
        offset = rank * own.left.shape[0] if split else 0
        mine = slice(offset, offset + rows.left.shape[0])
        mined = _mined(negatives, negative_ids, world, rows, every, known, mine, scale, bias)
        part = _loss_part(kind, rows, every, pairs, mine, scale, bias, split, mined)
        return _full_batch(part, world) if split else part


def _check_inputs(left: torch.Tensor, right: torch.Tensor, weights: torch.Tensor, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    if left.shape != right.shape or left.dim() != 2:
        raise ValueError(f"left and right must both be [b, d]; got {tuple(left.shape)} and {tuple(right.shape)}")
    b = left.shape[0]
    if weights.shape != (b,):
        raise ValueError(f"weights must be [b]={b}; got {tuple(weights.shape)}")


@dataclass(frozen=True)
class _Rows:
    """The rows of a batch as the loss reads them: float32 features, weights and identities."""

    left: torch.Tensor
    right: torch.Tensor
    w: torch.Tensor
    lid: Optional[torch.Tensor]
    rid: Optional[torch.Tensor]


def _float_rows(left, right, weights, left_ids, right_ids) -> _Rows:
    device = left.device
    return _Rows(left.float(), right.float(), weights.to(device=device, dtype=torch.float32),
                 left_ids.to(device) if left_ids is not None else None,
                 right_ids.to(device) if right_ids is not None else None)


def _gather_rows(own: _Rows) -> _Rows:
    """The global batch. Two collectives per call (each one is a synchronisation point between
    ranks): the features together, with gradients, and the row metadata together (float64
    holds ids exactly up to 2**53)."""
    d_left = own.left.shape[1]
    both = gather_with_grad(torch.cat([own.left, own.right], dim=1))
    zeros = torch.zeros_like(own.w, dtype=torch.float64)
    meta = all_gather(torch.stack([own.w.double(), zeros if own.lid is None else own.lid.double(),
                                   zeros if own.rid is None else own.rid.double()], dim=1))
    return _Rows(both[:, :d_left], both[:, d_left:], meta[:, 0].float(),
                 meta[:, 1].long() if own.lid is not None else None,
                 meta[:, 2].long() if own.rid is not None else None)


def _pair_relevance(every: _Rows, known: Optional[KnownPairs]) -> PairRelevance:
    """The known pairs of the global batch (and of the table, when both sides have identities);
    without identities every row is its own query and document."""
    index = torch.arange(every.left.shape[0], device=every.left.device)
    with_ids = every.lid is not None and every.rid is not None
    return PairRelevance(index if every.lid is None else every.lid, index if every.rid is None else every.rid,
                         every.w, known if with_ids else None)


def _mined(negatives: Optional[torch.Tensor], negative_ids: Optional[torch.Tensor], world: int, rows: _Rows,
           every: _Rows, known: Optional[KnownPairs], mine: slice, scale, bias) -> Optional[torch.Tensor]:
    """[rows, M] logits of ``rows`` against the global batch's mined negatives, -inf where a
    pair is left out (an empty slot, or a negative known to answer the row's query); None
    without negatives."""
    if negatives is None:
        return None
    neg, ids = negatives.float(), negative_ids.to(device=negatives.device, dtype=torch.long)
    if world > 1:
        neg, ids = gather_with_grad(neg), all_gather(ids)
    logits = _logits(rows.left, neg, scale, bias)
    out = (ids < 0).unsqueeze(0).expand_as(logits).clone()
    if every.lid is not None and every.rid is not None:
        for table in (_batch_positives(every, ids), known):
            if table is not None and len(table):
                r, c, _ = table.pairs(every.lid[mine], ids.clamp_min(0))
                out[r, c] = True
    return logits.masked_fill(out, float("-inf"))


def _batch_positives(every: _Rows, ids: torch.Tensor) -> KnownPairs:
    """The batch's rows of weight above 0 as known pairs, by their (table) identities."""
    n_docs = int(max(every.rid.max(), ids.max(), 0)) + 1
    positive = every.w > 0
    return KnownPairs(*max_per_key(every.lid[positive] * n_docs + every.rid[positive], every.w[positive]), n_docs)


def _loss_part(kind: str, rows: _Rows, every: _Rows, pairs: PairRelevance, mine: slice, scale, bias,
               split: bool, mined: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The share of the loss of ``rows`` (this process's with split, else all) against the
    global batch's columns. Known pairs come sparse: each row's query with a column's
    document, and each row's document with a column's query for the right->left direction."""
    known_lr = pairs.pairs(mine, queries_are_rows=True)
    logits_lr = _logits(rows.left, every.right, scale, bias)
    if kind != "ce":
        part = _siglip_part(logits_lr, known_lr, every.w, every.left.shape[0])
        return part if mined is None else part + _negatives_part(mined) / every.left.shape[0]
    if split:
        logits_rl, known_rl = _logits(rows.right, every.left, scale, bias), pairs.pairs(mine, queries_are_rows=False)
    else:
        # Without split the rows are all columns: the reverse logits are the transpose and
        # the reverse pairs the same, swapped.
        r, c, rel = known_lr
        logits_rl, known_rl = logits_lr.T, (c, r, rel)
    if mined is not None:   # extra columns of the left->right softmax only: they have no rows
        logits_lr = torch.cat([logits_lr, mined], dim=1)
    return _ce_part(logits_lr, known_lr, logits_rl, known_rl, pairs, mine, rows.w, every.w)


def _full_batch(part: torch.Tensor, world: int) -> torch.Tensor:
    """Rank r holds 1/world of the full loss: scale it so DDP's average is the full
    gradient, and report the full value (sum of all ranks' parts) on every rank."""
    scaled = part * world
    total = sum_over_ranks(part.detach().clone())
    return scaled + (total - scaled).detach()
