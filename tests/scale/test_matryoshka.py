"""Matryoshka widths (matryoshkaDims): the loss adds the loss on embeddings cut to each width and
renormalised, with the full batch's exact gradients on 1 process or 2 (gloo), with feature-caching
accumulation and localLoss."""

import pytest
import torch
import torch.nn.functional as F
from numeric import assert_all_rel_close, assert_rel_close
from scale.helpers import MATRYOSHKA_CASES, matryoshka_grads, run_workers, worker_matryoshka

from kontrast.trainer.step.accumulation import matryoshka_loss
from kontrast.trainer.step.losses import weighted_contrastive_loss

N = 8


def test_the_loss_adds_each_width_cut_and_renormalised():
    g = torch.Generator().manual_seed(0)
    left = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    right = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    w, s = torch.rand(6, generator=g) + 0.5, torch.tensor(10.0)

    def loss(a, b):
        return weighted_contrastive_loss(a, b, w, s)

    expect = loss(left, right) + loss(F.normalize(left[:, :4], dim=-1), F.normalize(right[:, :4], dim=-1)) + loss(
        F.normalize(left[:, :2], dim=-1), F.normalize(right[:, :2], dim=-1))
    assert_rel_close(matryoshka_loss(loss, left, right, (4, 2)), expect)
    # Cut without renormalising, the short embeddings would score lower cosines: a different loss.
    unnormalised = loss(left, right) + loss(left[:, :4], right[:, :4]) + loss(left[:, :2], right[:, :2])
    assert abs(float(unnormalised - expect)) > 1e-2 * float(expect)
    with pytest.raises(ValueError, match="not below the embedding width 8"):
        matryoshka_loss(loss, left, right, (8,))


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_one_process_accumulation_equals_the_full_batch(kind):
    """accumFreq 2 on one process: the gradients of one micro-batch of the whole batch."""
    full = matryoshka_grads(None, N, kind, False, 1)
    accumulated = matryoshka_grads(None, N, kind, False, 2)
    assert_all_rel_close(accumulated, full)
    # The widths train: without them the gradients differ.
    assert any(float((full[name] - plain).norm()) > 1e-3 * float(plain.norm())
               for name, plain in _without_widths(kind).items() if name != "loss")


def _without_widths(kind):
    from scale.helpers import TwoTower, two_tower_batch

    from kontrast.trainer.step.accumulation import contrastive_step

    xq, xd, weights, ids = two_tower_batch(N)
    model = TwoTower(d=8)

    def forward(mb):
        q, d, s, bias = model(xq[mb], xd[mb])
        return {"left": q, "right": d, "weights": weights[mb], "left_ids": ids[mb], "logit_scale": s,
                "logit_bias": bias}

    contrastive_step(forward, [slice(0, N)], kind=kind, model=model)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def two_processes():
    return run_workers(worker_matryoshka, 2, N)


@pytest.mark.distributed
@pytest.mark.parametrize("kind,local,k", MATRYOSHKA_CASES)
def test_two_processes_equal_one_with_accumulation_and_local_loss(two_processes, kind, local, k):
    """2 gloo processes x 4 rows (in k micro-batches each, with or without localLoss) train
    like 1 process x 8 rows: the same loss and parameter gradients on both ranks."""
    reference = matryoshka_grads(None, N, kind, False, 1)
    for rank in two_processes:
        assert_all_rel_close(rank[(kind, local, k)], reference)
