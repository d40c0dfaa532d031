"""Single-process maths of weighted_contrastive_loss: open_clip equivalence, weights, graded targets."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numeric import assert_all_rel_close, assert_rel_close
from open_clip.loss import ClipLoss, SigLipLoss

from kontrast.trainer.step.known_pairs import KnownPairs
from kontrast.trainer.step.losses import scale_grad, weighted_contrastive_loss


def rel_err(a, b):
    return float(torch.linalg.vector_norm((a - b).detach().double()) / torch.linalg.vector_norm(b.detach().double()))


def feats(n=8, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    left = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).float()
    right = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).float()
    return left.requires_grad_(), right.requires_grad_()


def naive(left, right, w, s, b, kind, lid=None, rid=None, table=()):
    """Loop-by-loop reference of the graded multi-positive loss, written independently.
    ``table``: extra (query id, document id, weight) rows known from the training table."""
    n = left.shape[0]
    lid = list(range(n)) if lid is None else lid
    rid = list(range(n)) if rid is None else rid
    sim = [[float(s * left[i] @ right[j] + (b or 0.0)) for j in range(n)] for i in range(n)]
    known = {}
    for k in range(n):
        key = (lid[k], rid[k])
        known[key] = max(known.get(key, 0.0), float(w[k]))
    for q, d, weight in table:
        known[(q, d)] = max(known.get((q, d), 0.0), weight)

    def rel(i, j):  # query of row i, document of row j
        return known.get((lid[i], rid[j]))

    if kind == "ce":
        total = 0.0
        for i in range(n):
            for direction in ("lr", "rl"):
                if direction == "lr":
                    logits = sim[i]
                    t = [(rel(i, j) or 0.0) / rid.count(rid[j]) for j in range(n)]
                else:
                    logits = [sim[j][i] for j in range(n)]
                    t = [(rel(j, i) or 0.0) / lid.count(lid[j]) for j in range(n)]
                if sum(t) == 0:
                    continue
                lse = math.log(sum(math.exp(v) for v in logits))
                total += float(w[i]) * sum(tj / sum(t) * (lse - v) for tj, v in zip(t, logits))
        return 0.5 * total / float(sum(w))
    mean_w = float(sum(w)) / n
    total = 0.0
    for i in range(n):
        for j in range(n):
            r = rel(i, j)
            if r:  # known at weight 0: a plain negative
                best = max(rel(i, k) or 0.0 for k in range(n))
                y = r / best if best > 0 else 0.0
                total += r / mean_w * -(y * math.log(1 / (1 + math.exp(-sim[i][j])))
                                        + (1 - y) * math.log(1 / (1 + math.exp(sim[i][j]))))
            else:
                total += -math.log(1 / (1 + math.exp(sim[i][j])))
    return total / n


@pytest.mark.parametrize("with_bias", [False, True])
def test_ce_equal_weights_is_open_clip_cliploss(with_bias):
    left, right = feats()
    scale = torch.tensor(14.3, requires_grad=True)
    bias = torch.tensor(-1.5, requires_grad=True) if with_bias else None
    ours = weighted_contrastive_loss(left, right, torch.full((8,), 3.0), scale, bias, kind="ce")
    ours_grads = torch.autograd.grad(ours, [left, right, scale] + ([bias] if with_bias else []))
    ref = ClipLoss()(right, left, scale, bias)
    ref_grads = torch.autograd.grad(ref, [left, right, scale] + ([bias] if with_bias else []))
    assert_rel_close(ours, ref, msg="loss")
    # ce's bias gradient is 0 in theory: assert_all_rel_close judges it on the whole gradient's scale.
    assert_all_rel_close(dict(enumerate(ours_grads)), dict(enumerate(ref_grads)))


def test_siglip_equal_weights_is_open_clip_sigliploss():
    left, right = feats()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    ours = weighted_contrastive_loss(left, right, torch.full((8,), 0.25), scale, bias, kind="siglip")
    ours_grads = torch.autograd.grad(ours, [left, right, scale, bias])
    ref = SigLipLoss()(left, right, scale, bias)
    ref_grads = torch.autograd.grad(ref, [left, right, scale, bias])
    assert_rel_close(ours, ref, msg="loss")
    # ce's bias gradient is 0 in theory: assert_all_rel_close judges it on the whole gradient's scale.
    assert_all_rel_close(dict(enumerate(ours_grads)), dict(enumerate(ref_grads)))


@pytest.mark.parametrize("kind", ["ce", "siglip"])
@pytest.mark.parametrize("with_ids", [False, True])
def test_matches_loop_reference_with_weights_and_duplicates(kind, with_ids):
    left, right = feats(n=7, seed=3)
    w = torch.tensor([1.0, 0.2, 3.0, 0.0, 1.5, 0.7, 2.0])
    lid = torch.tensor([0, 1, 0, 2, 3, 1, 4]) if with_ids else None
    rid = torch.tensor([10, 11, 12, 13, 10, 14, 15]) if with_ids else None
    s, b = 12.0, (-2.0 if kind == "siglip" else None)
    ours = weighted_contrastive_loss(left, right, w, torch.tensor(s), None if b is None else torch.tensor(b),
                                     kind=kind, left_ids=lid, right_ids=rid)
    ref = naive(left.detach().double(), right.detach().double(), w.tolist(), s, b, kind,
                None if lid is None else lid.tolist(), None if rid is None else rid.tolist())
    assert ours.item() == pytest.approx(ref, rel=1e-5)


# A training table in which documents 12 and 13 answer several queries. Its batch (below) holds
# rows (0, 12) and (1, 13) but not (1, 12) or (0, 13); (2, 12) has weight 0 (a stated negative).
TABLE = [(0, 12, 3.0), (1, 13, 2.0), (1, 12, 1.0), (0, 13, 0.5), (2, 12, 0.0), (2, 14, 1.0), (3, 15, 2.0),
         (4, 12, 2.5), (4, 16, 1.0)]


def table_pairs(rows=TABLE):
    q, d, w = (np.array(col) for col in zip(*rows))
    return KnownPairs.of_table(q, d, w)


def test_known_pairs_keep_what_a_batch_can_meet_without_its_row():
    pairs = table_pairs()
    # (3, 15) is the only pair of both its query and its document: no batch holds one
    # without the other's row, so it is not kept; weight-0 (2, 12) stays a negative.
    kept = {(int(k) // pairs.n_docs, int(k) % pairs.n_docs): float(r) for k, r in zip(pairs.keys, pairs.rel)}
    assert kept == {(0, 12): 3.0, (0, 13): 0.5, (1, 12): 1.0, (1, 13): 2.0, (4, 12): 2.5}
    # Duplicate rows keep their highest weight.
    assert table_pairs(TABLE + [(1, 12, 4.0)]).pairs(torch.tensor([1]), torch.tensor([12]))[2].tolist() == [4.0]


def test_known_pairs_of_a_block_are_every_pairs_lookup():
    """The sparse block lookup (key ranges per query) against a plain lookup per pair, on a
    block with repeated ids and with queries/documents the table does not hold."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 40, (600,), generator=g)
    d = torch.randint(0, 90, (600,), generator=g)
    w = torch.randint(0, 4, (600,), generator=g).float()
    pairs = KnownPairs.of_table(q.numpy(), d.numpy(), w.numpy())
    assert 0 < len(pairs) < 600
    rows = torch.cat([q[:50], torch.tensor([45, 3, 3])])
    cols = torch.cat([d[100:170], torch.tensor([95, 7, 7])])
    r, c, found = pairs.pairs(rows, cols)
    assert len(set(zip(r.tolist(), c.tolist()))) == r.numel()       # each (row, column) once
    known = torch.zeros(rows.numel(), cols.numel(), dtype=torch.bool)
    rel = torch.zeros(known.shape)
    known[r, c], rel[r, c] = True, found
    kept = {(int(k) // pairs.n_docs, int(k) % pairs.n_docs): float(r) for k, r in zip(pairs.keys, pairs.rel)}
    expect = torch.tensor([[(int(a), int(b)) in kept for b in cols] for a in rows])
    assert torch.equal(known, expect) and expect.sum() > 20
    assert torch.equal(rel, torch.tensor([[kept.get((int(a), int(b)), 0.0) for b in cols] for a in rows]))
    # One document per query: nothing to keep.
    assert len(table_pairs([(0, 0, 1.0), (1, 1, 1.0), (2, 1, 1.0)])) == 0


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_table_pairs_match_loop_reference(kind):
    left, right = feats(n=6, seed=4)
    w = torch.tensor([3.0, 2.0, 1.0, 2.0, 2.5, 1.0])
    lid = torch.tensor([0, 1, 2, 3, 4, 4])
    rid = torch.tensor([12, 13, 14, 15, 12, 16])
    s, b = 12.0, (-2.0 if kind == "siglip" else None)
    ours = weighted_contrastive_loss(left, right, w, torch.tensor(s), None if b is None else torch.tensor(b),
                                     kind=kind, left_ids=lid, right_ids=rid, known=table_pairs())
    ref = naive(left.detach().double(), right.detach().double(), w.tolist(), s, b, kind, lid.tolist(),
                rid.tolist(), table=[row for row in TABLE if row[2] > 0])
    batch_only = naive(left.detach().double(), right.detach().double(), w.tolist(), s, b, kind, lid.tolist(),
                       rid.tolist())
    assert ours.item() == pytest.approx(ref, rel=1e-5)
    assert abs(ref - batch_only) > 1e-3 * abs(ref)   # the table's pairs changed the targets


@pytest.mark.parametrize("kind", ["ce", "siglip"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_batches_with_repeats_and_a_table_match_loop_reference(kind, seed):
    """Queries and documents repeated in the batch (a table pair then stands for several
    cells), zero weights, and a table that overlaps the batch's rows with other weights."""
    g = torch.Generator().manual_seed(seed)
    left, right = feats(n=12, seed=seed)
    lid, rid = torch.randint(0, 5, (12,), generator=g), torch.randint(0, 6, (12,), generator=g)
    w = torch.randint(0, 4, (12,), generator=g).float()
    w[0] = 2.0
    table = [(int(a), int(b), float(x)) for a, b, x in zip(torch.randint(0, 5, (30,), generator=g),
                                                          torch.randint(0, 6, (30,), generator=g),
                                                          torch.randint(0, 5, (30,), generator=g))]
    known = table_pairs(table + list(zip(lid.tolist(), rid.tolist(), w.tolist())))
    kept = [(int(k) // known.n_docs, int(k) % known.n_docs, float(x)) for k, x in zip(known.keys, known.rel)]
    s, b = 9.0, (-2.0 if kind == "siglip" else None)
    ours = weighted_contrastive_loss(left, right, w, torch.tensor(s), None if b is None else torch.tensor(b),
                                     kind=kind, left_ids=lid, right_ids=rid, known=known)
    ref = naive(left.detach().double(), right.detach().double(), w.tolist(), s, b, kind, lid.tolist(),
                rid.tolist(), table=kept)
    assert ours.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_table_pair_is_a_positive_not_a_false_negative(kind):
    """Row 0 is (query 0, doc 12), row 1 (query 1, doc 13); the table says doc 12 answers query 1
    too. With the table the loss pulls query 1 towards doc 12; from the batch alone it pushes."""
    left, right = feats(n=4, seed=6)
    lid, rid = torch.tensor([0, 1, 2, 3]), torch.tensor([12, 13, 14, 15])
    s = torch.tensor(10.0)
    b = torch.tensor(-3.0) if kind == "siglip" else None

    def logit_gradient(known):
        delta = torch.zeros((), requires_grad=True)
        q = torch.cat([left.detach(), torch.zeros(4, 1)], dim=1)
        d = torch.cat([right.detach(), torch.zeros(4, 1)], dim=1)
        d[0, -1] = 1.0
        onehot = torch.zeros(4, 7)
        onehot[1, -1] = 1.0   # delta moves exactly logit (row 1's query, row 0's document)
        moved = q + onehot * delta / s
        loss = weighted_contrastive_loss(moved, d, torch.ones(4), s, b, kind=kind, left_ids=lid, right_ids=rid,
                                         known=known)
        return torch.autograd.grad(loss, [delta])[0].item()

    assert logit_gradient(table_pairs()) < -1e-4
    assert logit_gradient(None) > 1e-4


# A click log: each query's clicked document at weight 1, the shown-but-not-clicked ones at 0.
CLICKS = [(0, 10, 1.0), (0, 11, 0.0), (1, 10, 1.0), (1, 12, 0.0), (2, 11, 1.0), (2, 13, 0.0),
          (3, 13, 1.0), (4, 14, 1.0)]


def pair_logit_gradient(kind, lid, rid, w, cells, known=None, seed=6):
    """dL/dlogit, the same shift added to every given (row, column) logit, which must all be
    one (query, document) pair."""
    n = len(lid)
    left, right = feats(n=n, seed=seed)
    s = torch.tensor(10.0)
    b = torch.tensor(-3.0) if kind == "siglip" else None
    delta = torch.zeros((), requires_grad=True)
    q = torch.cat([left.detach(), torch.zeros(n, 1)], dim=1)
    d = torch.cat([right.detach(), torch.zeros(n, 1)], dim=1)
    shift = torch.zeros_like(q)
    for i, j in cells:
        d[j, -1] = 1.0
        shift[i, -1] = 1.0
    loss = weighted_contrastive_loss(q + shift * delta / s, d, torch.tensor(w), s, b, kind=kind,
                                     left_ids=torch.tensor(lid), right_ids=torch.tensor(rid), known=known)
    return torch.autograd.grad(loss, [delta])[0].item()


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_click_log_pair_met_through_a_weight_0_row_is_a_positive(kind):
    """Query 0 (clicked document 10) enters the batch through its weight-0 row (0, 11) and
    document 10 through query 1's click: the table says they belong together, so the loss pulls
    them together. Counting only positive rows, the table kept no pair of a click log at all."""
    known = table_pairs(CLICKS)
    kept = {(int(k) // known.n_docs, int(k) % known.n_docs) for k in known.keys}
    assert {(0, 10), (1, 10)} <= kept and (4, 14) not in kept
    lid, rid, w = [0, 1, 3, 4], [11, 10, 13, 14], [0.0, 1.0, 1.0, 1.0]
    assert pair_logit_gradient(kind, lid, rid, w, [(0, 1)], known) < -1e-3
    assert pair_logit_gradient(kind, lid, rid, w, [(0, 1)], None) > 1e-4   # from the batch alone: pushed


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_a_weight_0_pair_is_pushed_apart_by_both_losses(kind):
    """Row 0 states (query 5, document 5) at weight 0 and row 1 holds query 5 with a clicked
    document: the stated pair is a negative for both losses (siglip's terms once cancelled)."""
    lid, rid, w = [5, 5, 6, 7], [5, 6, 7, 8], [0.0, 1.0, 1.0, 1.0]
    assert pair_logit_gradient(kind, lid, rid, w, [(0, 0), (1, 0)]) > 1e-3
    assert pair_logit_gradient(kind, lid, rid, w, [(0, 0)]) > (1e-3 if kind == "siglip" else -1e-9)


def test_table_pairs_need_ids():
    """Without ids every row is its own query and document: the table's ids mean nothing."""
    left, right = feats()
    s = torch.tensor(10.0)
    with_table = weighted_contrastive_loss(left, right, torch.ones(8), s, known=table_pairs())
    assert_rel_close(with_table, ClipLoss()(right, left, s))


def test_ce_weights_are_scale_free_and_select_rows():
    left, right = feats()
    s = torch.tensor(10.0)
    w = torch.rand(8, generator=torch.Generator().manual_seed(1))
    a = weighted_contrastive_loss(left, right, w, s)
    b = weighted_contrastive_loss(left, right, w * 7.0, s)
    assert_rel_close(a, b)
    # Only row 2 weighted: the loss is that row's two CE terms, still against all 8 columns.
    one_hot = torch.zeros(8)
    one_hot[2] = 5.0
    only = weighted_contrastive_loss(left, right, one_hot, s)
    logits = s * left @ right.T
    expect = 0.5 * (F.cross_entropy(logits[2:3], torch.tensor([2])) + F.cross_entropy(logits.T[2:3], torch.tensor([2])))
    assert_rel_close(only, expect)


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_zero_weight_row_adds_no_term_but_stays_a_negative(kind):
    left, right = feats()
    s = torch.tensor(10.0)
    b = torch.tensor(-3.0) if kind == "siglip" else None
    w = torch.ones(8)
    w[5] = 0.0
    loss = weighted_contrastive_loss(left, right, w, s, b, kind=kind)
    grad_left5, grad_right5 = torch.autograd.grad(loss, [left, right])
    # Still a negative: the other rows' terms depend on row 5's features.
    assert grad_left5[5].abs().sum() > 0 and grad_right5[5].abs().sum() > 0
    # But dropping the row entirely (no negative either) gives a different loss.
    keep = [i for i in range(8) if i != 5]
    dropped = weighted_contrastive_loss(left[keep], right[keep], torch.ones(7), s, b, kind=kind)
    assert abs(loss.item() - dropped.item()) > 1e-4
    if kind == "ce":
        # The row's own positive term is gone: moving right[5] towards left[5] changes nothing
        # through row 5's own CE terms, so the loss equals the hand-written sum over the others.
        logits = s * left @ right.T
        ce = F.cross_entropy(logits, torch.arange(8), reduction="none") + F.cross_entropy(
            logits.T, torch.arange(8), reduction="none")
        assert_rel_close(loss, 0.5 * ce[keep].sum() / 7)


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_all_zero_weights_give_zero_loss_not_nan(kind):
    left, right = feats()
    b = torch.tensor(-3.0) if kind == "siglip" else None
    loss = weighted_contrastive_loss(left, right, torch.zeros(8), torch.tensor(10.0), b, kind=kind)
    assert torch.isfinite(loss)
    gl, = torch.autograd.grad(loss, [left])
    assert torch.isfinite(gl).all()
    if kind == "ce":
        assert loss.item() == 0.0


@pytest.mark.parametrize("kind,cls", [("ce", ClipLoss), ("siglip", SigLipLoss)])
def test_distinct_ids_reduce_to_open_clip(kind, cls):
    """One document per query (ids given, all distinct): exactly open_clip's loss and gradients."""
    left, right = feats(n=12, d=8, seed=5)
    scale = torch.tensor(11.0, requires_grad=True)
    bias = torch.tensor(-4.0, requires_grad=True) if kind == "siglip" else None
    params = [left, right, scale] + ([bias] if bias is not None else [])
    ids = torch.arange(12) * 7 + 3
    ours = weighted_contrastive_loss(left, right, torch.full((12,), 2.0), scale, bias, kind=kind,
                                     left_ids=ids, right_ids=ids + 1000)
    ref = ClipLoss()(right, left, scale) if kind == "ce" else SigLipLoss()(left, right, scale, bias)
    assert rel_err(ours, ref) < 1e-6
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("kind", ["ce", "siglip"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_duplicate_partner_is_a_positive(kind, side):
    """Rows 0 and 1 share a query (or a document): pair (0, 1) is known relevant, so the loss
    pulls it together instead of pushing it apart."""
    left, right = feats()
    ids = torch.arange(8)
    ids[1] = 0
    s = torch.tensor(10.0)
    b = torch.tensor(-3.0) if kind == "siglip" else None
    kw = {"left_ids": ids} if side == "left" else {"right_ids": ids}

    # d loss / d logit[0, 1]: an extra feature coordinate moves exactly one logit by delta.
    def pair_gradient(i, j, **ids_kw):
        delta = torch.zeros((), requires_grad=True)
        q = torch.cat([left.detach(), torch.zeros(8, 1)], dim=1)
        d = torch.cat([right.detach(), torch.zeros(8, 1)], dim=1)
        onehot_q = torch.zeros(8, 7)
        onehot_q[i, -1] = 1.0
        d[j, -1] = 1.0
        loss = weighted_contrastive_loss(q + onehot_q * delta / s, d, torch.ones(8), s, b, kind=kind, **ids_kw)
        return torch.autograd.grad(loss, [delta])[0].item()

    for i, j in ((0, 1), (1, 0)):
        assert pair_gradient(i, j, **kw) < -1e-4   # raising the logit lowers the loss: a positive
        assert pair_gradient(i, j) > 1e-4          # without ids it is a negative
    assert pair_gradient(0, 0, **kw) < -1e-4


def _fit(loss_fn, queries, docs, steps=300, dim=8, seed=0):
    """Free embeddings trained to minimise loss_fn; returns the [queries, docs] similarities."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(queries, dim, generator=g).requires_grad_()
    d = torch.randn(docs, dim, generator=g).requires_grad_()
    opt = torch.optim.Adam([q, d], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(F.normalize(q, dim=-1), F.normalize(d, dim=-1)).backward()
        opt.step()
    with torch.no_grad():
        return F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T


def _masked_ce(left, right, w, s, lid):
    """The previous loss: a duplicate query's other documents are masked out of the negatives."""
    logits = s * left @ right.T
    same = (lid[:, None] == lid[None, :]) & ~torch.eye(len(lid), dtype=torch.bool)
    logits = logits.masked_fill(same, float("-inf"))
    ce = F.cross_entropy(logits, torch.arange(len(lid)), reduction="none") + F.cross_entropy(
        logits.T, torch.arange(len(lid)), reduction="none")
    return 0.5 * (w * ce).sum() / w.sum()


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_graded_documents_are_ranked_by_grade_where_masking_cannot(kind):
    """Four queries, each with documents of grades 3, 2 and 1 in one batch (12 rows). The graded
    loss orders every query's documents by grade; the masked loss leaves the order to chance."""
    lid = torch.arange(4).repeat_interleave(3)
    rid = torch.arange(12)
    w = torch.tensor([3.0, 2.0, 1.0]).repeat(4)
    s, b = torch.tensor(10.0), (torch.tensor(-5.0) if kind == "siglip" else None)
    n_right = n_masked = 0
    for seed in range(3):
        sims = _fit(lambda q, d: weighted_contrastive_loss(q[lid], d, w, s, b, kind=kind, left_ids=lid,
                                                           right_ids=rid), 4, 12, seed=seed)
        masked = _fit(lambda q, d: _masked_ce(q[lid], d, w, s, lid), 4, 12, seed=seed)
        for query in range(4):
            own = slice(3 * query, 3 * query + 3)
            n_right += bool((sims[query, own].diff() < 0).all())
            n_masked += bool((masked[query, own].diff() < 0).all())
            # Each query's own documents rank above every other query's.
            others = torch.cat([sims[query, :3 * query], sims[query, 3 * query + 3:]])
            assert sims[query, own].min() > others.max()
    assert n_right == 12
    assert n_masked < 12


def test_loss_is_float32_under_bf16_autocast():
    left, right = feats()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = weighted_contrastive_loss(left.bfloat16(), right.bfloat16(), torch.ones(8), torch.tensor(10.0))
    assert loss.dtype == torch.float32


def test_scale_grad_keeps_value_and_scales_gradient():
    x = torch.tensor(2.5, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert y.item() == 2.5
    (3 * y).backward()
    assert x.grad.item() == pytest.approx(0.75)


def test_rejects_unknown_kind_and_bad_shapes():
    left, right = feats()
    with pytest.raises(ValueError, match="unknown loss kind"):
        weighted_contrastive_loss(left, right, torch.ones(8), torch.tensor(1.0), kind="hinge")
    with pytest.raises(ValueError, match="weights"):
        weighted_contrastive_loss(left, right, torch.ones(7), torch.tensor(1.0))
