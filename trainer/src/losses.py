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
Every pair (query i, document j) whose relevance is known is a positive with its weight (the
highest, if several rows give it); every other pair is a negative. Known means: some row of
the batch pairs query i's identity with document j's identity, or, given ``known``
(``KnownPairs``, built from the whole training table), some row of the table does. The
second matters in catalogues, where one product is relevant to many queries: the batch
brings it in for one of them, and without the table it would be a negative for the others
(a false negative, pushed away from a query it answers). Identities are ``left_ids`` /
``right_ids`` (absent: every row is its own query / document; ``known`` is then unused).

Kinds:

* ``ce``: symmetric soft-target InfoNCE. Row i's left->right term is the cross-entropy of its
  logits against targets proportional to the relevance of its query to each column's
  document (split evenly over columns holding the same document, whose logits are equal), and
  likewise right->left. Each row's two terms are multiplied by the row weight, reduced as
  1/2 (sum w_i CE_i + sum w_i CE'_i) / sum w_i. With one document per query the targets are
  one-hot and this is open_clip's ClipLoss with weighted rows; equal weights give exactly
  ``open_clip.loss.ClipLoss``. Targets in proportion to the grades make the optimum rank a
  grade-3 document above a grade-1 one for the same query; masking the other document out
  (the previous behaviour) left their order free. A row of weight 0 adds no term but still
  serves as a negative for the others. All-zero weights give loss 0.
* ``siglip``: sigmoid (binary cross-entropy) loss over all pairs. A known pair is a positive
  weighted by relevance / mean(w), with the graded label relevance / (the best relevance of
  its query in the batch): 1 for the best document, 2/3 for a grade 2 beside a grade 3. The
  optimal sigmoid equals the label, so grades stay ordered (hard +1 labels would push every
  relevant document to the same saturated score). Other pairs are negatives (label 0,
  weight 1), and the sum is divided by the global batch size, as in
  ``open_clip.loss.SigLipLoss``; one document per query and equal weights give exactly
  SigLipLoss.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["weighted_contrastive_loss", "KnownPairs", "gather_with_grad", "scale_grad", "KINDS"]

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


def _compact(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Ids renumbered 0..u-1 (same order of identity), and u."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse, uniq.numel()


class KnownPairs:
    """The relevant (query, document) pairs of a whole training table, for lookups by the loss.

    Only pairs that a batch could hold without their own row are kept: the query has another
    relevant document and the document another query (each is then brought into a batch by
    another row). A table with one document per query, or one query per document, keeps
    nothing. Pairs of weight 0 are left out: they stay negatives. Held as sorted int64 keys
    (query id x documents + document id) and float32 weights: 12 bytes a kept pair, in one
    array each, never a Python object per row.
    """

    def __init__(self, keys: torch.Tensor, rel: torch.Tensor, n_docs: int):
        self.keys, self.rel, self.n_docs = keys, rel, n_docs

    @classmethod
    def of_table(cls, left_ids: np.ndarray, right_ids: np.ndarray, weights: np.ndarray) -> "KnownPairs":
        positive = np.asarray(weights) > 0
        q = np.asarray(left_ids, dtype=np.int64)[positive]
        d = np.asarray(right_ids, dtype=np.int64)[positive]
        w = np.asarray(weights, dtype=np.float32)[positive]
        n_docs = int(d.max()) + 1 if d.size else 1
        keys, inverse = np.unique(q * n_docs + d, return_inverse=True)
        rel = np.zeros(keys.size, dtype=np.float32)
        np.maximum.at(rel, inverse, w)
        uq, ud = keys // n_docs, keys % n_docs
        shared = (np.bincount(uq)[uq] > 1) & (np.bincount(ud)[ud] > 1)
        return cls(torch.from_numpy(keys[shared]), torch.from_numpy(rel[shared]), n_docs)

    def __len__(self) -> int:
        return self.keys.numel()

    def to(self, device: torch.device) -> "KnownPairs":
        return KnownPairs(self.keys.to(device), self.rel.to(device), self.n_docs)

    def pairs(self, q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The known pairs among queries ``q`` [r] x documents ``d`` [c] (table ids), sparse:
        (row, column, relevance), one entry a pair.

        Not one search per pair (r x c binary searches cost several times the logits): each
        distinct query's pairs are a contiguous range of the sorted keys, so two searches per
        query find them, and only those candidates are matched against the block's documents.
        """
        if self.keys.numel() == 0 or q.numel() == 0 or d.numel() == 0:
            none = torch.zeros(0, dtype=torch.long, device=q.device)
            return none, none, torch.zeros(0, dtype=self.rel.dtype, device=q.device)
        uq, q_of = torch.unique(q, return_inverse=True)
        ud, d_of = torch.unique(d, return_inverse=True)
        lo = torch.searchsorted(self.keys, uq * self.n_docs)
        counts = torch.searchsorted(self.keys, (uq + 1) * self.n_docs) - lo
        owner, offset = _ranges(counts)
        pos = lo[owner] + offset
        cand = self.keys[pos] % self.n_docs
        col = torch.searchsorted(ud, cand).clamp_max(ud.numel() - 1)
        hit = ud[col] == cand
        return _expand(owner[hit], col[hit], self.rel[pos[hit]], q_of, d_of, uq.numel(), ud.numel())


def _max_per_key(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct keys, sorted, and the highest value given for each."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    top = torch.zeros(uniq.numel(), dtype=values.dtype, device=values.device).scatter_reduce(
        0, inverse, values, reduce="amax", include_self=False)
    return uniq, top


def _ranges(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ranges of the given lengths laid end to end: each element's range and its offset in it."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(owner.numel(), device=counts.device) - first[owner]


def _expand(u: torch.Tensor, v: torch.Tensor, rel: torch.Tensor, u_of: torch.Tensor, v_of: torch.Tensor,
            n_u: int, n_v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs of distinct ids (u, v) -> every (row, column) whose ids they are (rows with id
    u_of, columns with id v_of): a batch can hold a query or document more than once."""
    def members(of: torch.Tensor, n: int):
        count = torch.bincount(of, minlength=n)
        return torch.argsort(of, stable=True), count, torch.cumsum(count, 0) - count

    row_order, row_count, row_first = members(u_of, n_u)
    col_order, col_count, col_first = members(v_of, n_v)
    owner, offset = _ranges(row_count[u] * col_count[v])
    width = col_count[v][owner]
    rows = row_order[row_first[u][owner] + offset // width]
    cols = col_order[col_first[v][owner] + offset % width]
    return rows, cols, rel[owner]


class _PairRelevance:
    """Relevance of (query identity, document identity) pairs known from the batch's rows, and
    from the table's ``known`` pairs when given.

    The batch's pairs are a ``KnownPairs`` of their own over compacted ids. A block's known
    pairs come back sparse (one entry a pair), so the targets add no [rows, n] tensor beside
    the logits.
    """

    def __init__(self, q: torch.Tensor, d: torch.Tensor, w: torch.Tensor, known: Optional[KnownPairs] = None):
        self.raw_q, self.raw_d, self.known = q, d, known
        self.q, n_q = _compact(q)
        self.d, n_d = _compact(d)
        self.batch = KnownPairs(*_max_per_key(self.q * n_d + self.d, w), n_d)
        self.q_count = torch.bincount(self.q, minlength=n_q)[self.q]
        self.d_count = torch.bincount(self.d, minlength=n_d)[self.d]

    def pairs(self, rows: slice, *, queries_are_rows: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Known pairs of [rows x all columns] as (row, column, relevance): the rows' queries
        against every column's document, or (``queries_are_rows=False``) the rows' documents
        against every column's query."""
        q, d, raw_q, raw_d = ((self.q[rows], self.d, self.raw_q[rows], self.raw_d) if queries_are_rows
                              else (self.q, self.d[rows], self.raw_q, self.raw_d[rows]))
        r, c, rel = self.batch.pairs(q, d)
        if self.known is not None and len(self.known):
            tr, tc, trel = self.known.pairs(raw_q, raw_d)
            # A pair both in the batch and in the table: its highest weight.
            keys, rel = _max_per_key(torch.cat([r, tr]) * d.numel() + torch.cat([c, tc]),
                                     torch.cat([rel, trel.to(rel.dtype)]))
            r, c = keys // d.numel(), keys % d.numel()
        return (r, c, rel) if queries_are_rows else (c, r, rel)


def _soft_ce(logits: torch.Tensor, r: torch.Tensor, c: torch.Tensor, rel: torch.Tensor,
             multiplicity: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against targets proportional to relevance / column multiplicity,
    the targets given sparse as (row, column, relevance): lse_i - sum_j t_ij logit_ij."""
    rows = logits.shape[0]
    t = rel / multiplicity[c].to(rel.dtype)
    total = torch.zeros(rows, dtype=t.dtype, device=t.device).index_add(0, r, t)
    picked = torch.zeros(rows, dtype=logits.dtype, device=t.device).index_add(0, r, t * logits[r, c])
    ce = torch.logsumexp(logits, dim=1) - picked / total.clamp_min(torch.finfo(t.dtype).tiny)
    return torch.where(total > 0, ce, torch.zeros_like(ce))


def _logits(rows: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]):
    logits = scale * (rows @ columns.T)
    return logits if bias is None else logits + bias


def _ce_part(logits_lr, known_lr, logits_rl, known_rl, pairs: _PairRelevance, w, all_w) -> torch.Tensor:
    """These rows' share of the symmetric soft-target InfoNCE (the whole loss without split)."""
    ce_lr = _soft_ce(logits_lr, *known_lr, pairs.d_count)
    ce_rl = _soft_ce(logits_rl, *known_rl, pairs.q_count)
    total_w = all_w.sum()
    part = 0.5 * ((w * ce_lr).sum() + (w * ce_rl).sum())
    return torch.where(total_w > 0, part / total_w.clamp_min(torch.finfo(torch.float32).tiny), part * 0)


def _siglip_part(logits_lr, known_lr, all_w, n: int) -> torch.Tensor:
    """These rows' share of the sigmoid loss. Only one direction: the N x N sigmoid terms are
    symmetric in left and right. Every pair is a negative, log sigmoid(-x), except the known
    ones, whose term is their weight x the binary cross-entropy with their graded label:
    relevance over the best of its query in the batch (1 for the best; the optimum sigmoid
    equals the label, so grades stay ordered)."""
    r, c, rel = known_lr
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
) -> torch.Tensor:
    """Weighted contrastive loss of this process's rows against the global batch.

    left, right: [b, d] L2-normalised embeddings of this process's (micro-)batch; weights:
    [b] non-negative row weights; logit_scale: already exponentiated; logit_bias: raw or
    None (siglip treats None as 0); left_ids / right_ids: [b] int64 query / document
    identities for the graded targets (see the module docstring); known: the training table's
    relevant pairs, by the same (table) identities, on ``left``'s device. Returns a scalar: the
    full-batch loss.
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
        index = torch.arange(n, device=device)
        with_ids = all_lid is not None and all_rid is not None
        pairs = _PairRelevance(index if all_lid is None else all_lid, index if all_rid is None else all_rid, all_w,
                               known if with_ids else None)

        split = local_loss and world > 1
        offset = rank * b if split else 0
        q, d, w = (left, right, weights) if split else (all_left, all_right, all_w)
        rows = q.shape[0]
        mine = slice(offset, offset + rows)
        # Known pairs of each row's query with a column's document (and of each row's
        # document with a column's query, for the right->left direction), sparse.
        known_lr = pairs.pairs(mine, queries_are_rows=True)

        # Rows are this process's (or all) queries/documents, columns the global batch.
        logits_lr = _logits(q, all_right, scale, bias)
        if kind == "ce":
            # Without split the rows are all columns: the reverse logits are the transpose and
            # the reverse pairs the same, swapped.
            if split:
                logits_rl, known_rl = _logits(d, all_left, scale, bias), pairs.pairs(mine, queries_are_rows=False)
            else:
                r, c, rel = known_lr
                logits_rl, known_rl = logits_lr.T, (c, r, rel)
            part = _ce_part(logits_lr, known_lr, logits_rl, known_rl, pairs, w, all_w)
        else:
            part = _siglip_part(logits_lr, known_lr, all_w, n)

        if not split:
            return part
        # Rank r holds 1/world of the full loss: scale it so DDP's average is the full
        # gradient, and report the full value (sum of all ranks' parts) on every rank.
        scaled = part * world
        total = part.detach().clone()
        dist.all_reduce(total)
        return scaled + (total - scaled).detach()
