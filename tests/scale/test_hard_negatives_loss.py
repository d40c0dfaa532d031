"""Mined hard negatives in weighted_contrastive_loss: only ever negatives (pushed away from the
queries they do not answer, never pulled towards any), under ce and siglip, with Matryoshka
widths and feature-caching accumulation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kontrast.trainer.step.accumulation import contrastive_step
from kontrast.trainer.step.known_pairs import KnownPairs
from kontrast.trainer.step.losses import weighted_contrastive_loss


def unit(n, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).float()


def rows(n=4):
    """Queries along orthonormal axes, so moving a negative along query i changes its logit
    with query i alone: the gradient along q_i is dL/dlogit_i (times the scale)."""
    left = torch.eye(8)[:n].requires_grad_()
    right = unit(n, d=8, seed=2).requires_grad_()
    return left, right, torch.ones(n), torch.arange(n), torch.arange(n) + 100


def _pair_grads(kind, ids, known=None, weights=None, rid=None, lid=None):
    """[queries, negatives] dL/dlogit of each (query, mined negative) pair, by its sign: + pushed
    apart by descent, - pulled together, 0 left out."""
    left, right, w, own_lid, own_rid = rows()
    w = w if weights is None else weights
    lid = own_lid if lid is None else lid
    neg = unit(len(ids), d=8, seed=3).requires_grad_()
    loss = weighted_contrastive_loss(left.detach(), right.detach(), w, torch.tensor(10.0),
                                     torch.tensor(-2.0) if kind == "siglip" else None, kind=kind, left_ids=lid,
                                     right_ids=own_rid if rid is None else rid, known=known, negatives=neg,
                                     negative_ids=torch.tensor(ids))
    (g,) = torch.autograd.grad(loss, neg)
    return g[:, :4].T


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_a_mined_negative_is_pushed_away_from_every_query(kind):
    g = _pair_grads(kind, [200, 201, 202])
    assert torch.all(g > 0), g


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_a_known_positive_of_a_query_is_left_out_of_its_terms_never_pulled(kind):
    """Document 101 is row 1's own document: mined for another query it is a negative for the
    others but neither pulled towards nor pushed from query 1. Document 300 is known to answer
    query 2 only through the table: left out for query 2. An empty slot (-1) is left out for all."""
    known = KnownPairs.of_table(np.array([2, 2, 9]), np.array([300, 301, 300]), np.array([1.0, 1.0, 1.0]))
    g = _pair_grads(kind, [101, 300, -1, 200], known=known)
    assert g[1, 0] == 0 and g[2, 1] == 0
    assert torch.all(g[:, 2] == 0)
    others = torch.ones_like(g, dtype=torch.bool)
    others[1, 0] = others[2, 1] = False
    others[:, 2] = False
    # first order through the embedding: a positive dL/dt means moving towards the query raises the loss
    assert torch.all(g[others] > 0), g
    assert torch.all(g >= 0), "a mined negative is never pulled"


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_a_stated_negative_row_does_not_make_a_mined_document_a_positive(kind):
    """A weight-0 row (query 2, document 200) states a negative: document 200 mined into the
    batch is still a negative of query 2 (pushed from it through query 2's row of weight 1), not
    left out as if it were a positive."""
    rid = torch.arange(4) + 100
    rid[3] = 200
    g = _pair_grads(kind, [200], weights=torch.tensor([1.0, 1.0, 1.0, 0.0]), rid=rid,
                    lid=torch.tensor([0, 1, 2, 2]))
    assert torch.all(g[:3] > 0), g


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_only_empty_slots_change_nothing(kind):
    left, right, w, lid, rid = rows()
    bias = torch.tensor(-2.0) if kind == "siglip" else None
    plain = weighted_contrastive_loss(left, right, w, torch.tensor(10.0), bias, kind=kind, left_ids=lid, right_ids=rid)
    empty = weighted_contrastive_loss(left, right, w, torch.tensor(10.0), bias, kind=kind, left_ids=lid,
                                      right_ids=rid, negatives=unit(3, d=8, seed=5),
                                      negative_ids=torch.tensor([-1, -1, -1]))
    assert torch.allclose(plain, empty)


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_feature_caching_with_negatives_equals_the_full_batch(kind):
    """accumFreq > 1: the negatives of each micro-batch are cached like its documents, and the
    gradients (negatives' included) equal one full batch's, Matryoshka widths too."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(5, 6)
    x_left, x_right, x_neg = torch.randn(6, 5), torch.randn(6, 5), torch.randn(12, 5)
    neg_ids = torch.tensor([300 + i if i % 3 else -1 for i in range(12)])
    batch = {"l": x_left, "r": x_right, "n": x_neg, "w": torch.rand(6) + 0.5, "lid": torch.arange(6),
             "rid": torch.arange(6) + 100, "nid": neg_ids}

    def forward(mb):
        return {"left": F.normalize(enc(mb["l"]), dim=-1), "right": F.normalize(enc(mb["r"]), dim=-1),
                "negatives": F.normalize(enc(mb["n"]), dim=-1), "weights": mb["w"], "left_ids": mb["lid"],
                "right_ids": mb["rid"], "negative_ids": mb["nid"], "logit_scale": torch.tensor(10.0),
                "logit_bias": torch.tensor(-1.0) if kind == "siglip" else None}

    def split(k):
        out = []
        for i in range(k):
            rows_ = slice(i * 6 // k, (i + 1) * 6 // k)
            negs = slice(i * 12 // k, (i + 1) * 12 // k)
            out.append({key: (v[negs] if key in ("n", "nid") else v[rows_]) for key, v in batch.items()})
        return out

    grads = []
    for k in (1, 3):
        enc.zero_grad()
        loss = contrastive_step(forward, split(k), kind=kind, dims=(3,))
        grads.append((float(loss), enc.weight.grad.clone()))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)
