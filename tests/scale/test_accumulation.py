"""accumFreq: feature-caching accumulation gives the full batch's gradients (logit scale and
bias included, unlike open_clip_train), replays dropout masks, and syncs DDP once per step."""

import math

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss
from open_clip_train.train import train_one_epoch
from openclip_peer import peer_args, peer_data

from numeric import EXACT, assert_all_rel_close, assert_detects, assert_rel_close, rel_err, worst_rel_err
from scale import helpers
from scale.helpers import tiny_clip, two_tower_batch

from kontrast.trainer.step import accumulation
from kontrast.trainer.step.accumulation import contrastive_step, split_micro_batches
from kontrast.trainer.step.micro_batch import search_micro_batch
from kontrast.trainer.step.known_pairs import KnownPairs


def clip_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=g), torch.randint(1, 64, (n, 8), generator=g),
            torch.rand(n, generator=g) + 0.5)


def clip_forward(model, images, texts, weights, left_ids=None, right_ids=None):
    def forward(mb):
        out = model(images[mb], texts[mb])
        ids = {} if left_ids is None else {"left_ids": left_ids[mb], "right_ids": right_ids[mb]}
        return {"left": out["text_features"], "right": out["image_features"], "weights": weights[mb],
                "logit_scale": out["logit_scale"], "logit_bias": out.get("logit_bias"), **ids}
    return forward


def slices(sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def grads_after(model, forward, mbs, kind):
    model.zero_grad(set_to_none=True)
    loss = contrastive_step(forward, mbs, kind=kind, model=model)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["ce", "siglip"])
@pytest.mark.parametrize("sizes", [[4, 4], [3, 3, 2]], ids=["k2", "k3_uneven"])
def test_accumulated_gradients_equal_full_batch_including_scale_and_bias(kind, sizes, monkeypatch):
    """Every gradient within EXACT (relative norm error) of the full batch's. The tolerance
    still catches real errors, shown here: skipping the last micro-batch, or dropping the
    1/k factor on the logit scale and bias (open_clip_train's accumulation), misses it by
    more than 100x."""
    model = tiny_clip(init_logit_bias=-2.0)
    images, texts, weights = clip_batch()
    forward = clip_forward(model, images, texts, weights)
    full_loss, full = grads_after(model, forward, [slice(0, 8)], kind)
    acc_loss, acc = grads_after(model, forward, slices(sizes), kind)
    assert_rel_close(acc_loss, full_loss, msg="loss")
    assert {"logit_scale", "logit_bias"} <= set(full)
    assert_all_rel_close(acc, full)

    _, skipped = grads_after(model, forward, slices(sizes)[:-1], kind)
    assert_detects(worst_rel_err(skipped, full)[0])
    monkeypatch.setattr(accumulation, "scale_grad", lambda x, factor: x)
    _, unscaled = grads_after(model, forward, slices(sizes), kind)
    assert_detects(rel_err(unscaled["logit_scale"], full["logit_scale"]))
    assert_detects(rel_err(unscaled["logit_bias"], full["logit_bias"]))


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_accumulation_passes_the_tables_known_pairs_to_every_micro_step(kind):
    """Graded targets from the batch's ids and the training table's pairs: 3 micro-batches give
    the full batch's gradients, and the table's pairs are really used (without them, far off)."""
    model = tiny_clip(init_logit_bias=-2.0)
    images, texts, weights = clip_batch()
    lid, rid = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5]), torch.arange(8) + 10
    # The table also says documents 10 and 13 answer queries 2 and 4 (rows 3 and 6).
    table_q = np.concatenate([lid.numpy(), [2, 4]])
    table_d = np.concatenate([rid.numpy(), [10, 13]])
    known = KnownPairs.of_table(table_q, table_d, np.concatenate([weights.numpy(), [1.0, 2.0]]))
    forward = clip_forward(model, images, texts, weights, lid, rid)

    def grads(mbs, known):
        model.zero_grad(set_to_none=True)
        loss = contrastive_step(forward, mbs, kind=kind, model=model, known=known)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    full_loss, full = grads([slice(0, 8)], known)
    acc_loss, acc = grads(slices([3, 3, 2]), known)
    assert_rel_close(acc_loss, full_loss, msg="loss")
    assert_all_rel_close(acc, full)
    _, without = grads(slices([3, 3, 2]), None)
    assert_detects(worst_rel_err(without, full)[0])


def sgd_delta(model, run):
    """Parameter change of one plain SGD step (lr 1e-3): -lr * gradient, seen from outside."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    run(opt)
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_open_clip_train_accumulation_inflates_scale_and_bias_gradients_ours_does_not(kind):
    images, texts, weights = clip_batch()
    weights = torch.ones(8)  # open_clip has no row weights
    bias = -2.0 if kind == "siglip" else None
    loss = ClipLoss() if kind == "ce" else SigLipLoss()

    def open_clip_step(accum_freq):
        model = tiny_clip(init_logit_bias=bias)
        per = 8 // accum_freq
        data = peer_data([(images[i * per:(i + 1) * per], texts[i * per:(i + 1) * per]) for i in range(accum_freq)])
        return sgd_delta(model, lambda opt: train_one_epoch(model, data, loss, 0, opt, None, None, None,
                                                            peer_args(batch_size=per, accum_freq=accum_freq)))

    def our_step(accum_freq):
        model = tiny_clip(init_logit_bias=bias)
        forward = clip_forward(model, images, texts, weights)

        def run(opt):
            opt.zero_grad()
            contrastive_step(forward, slices([8 // accum_freq] * accum_freq), kind=kind)
            opt.step()
        return sgd_delta(model, run)

    theirs_full, theirs_acc = open_clip_step(1), open_clip_step(2)
    ours_full, ours_acc = our_step(1), our_step(2)
    scalars = ["logit_scale"] + (["logit_bias"] if bias is not None else [])
    for name in scalars:
        assert (theirs_acc[name] / theirs_full[name]).item() == pytest.approx(2.0, rel=1e-3)  # open_clip: k x
        assert (ours_acc[name] / ours_full[name]).item() == pytest.approx(1.0, rel=1e-3)
        assert_rel_close(ours_full[name], theirs_full[name], msg=name)
    for name in ("visual.proj", "text_projection", "token_embedding.weight"):  # towers: both exact
        assert_rel_close(theirs_acc[name], theirs_full[name], msg=f"open_clip {name}")
        assert_rel_close(ours_acc[name], ours_full[name], msg=name)


def test_dropout_masks_are_replayed_between_cache_and_gradient_pass():
    model = tiny_clip()
    model.visual.patch_dropout = __import__("open_clip.transformer", fromlist=["PatchDropout"]).PatchDropout(0.5)
    model.train()
    images, texts, weights = clip_batch()
    inner = clip_forward(model, images, texts, weights)
    seen = []

    def forward(mb):
        out = inner(mb)
        seen.append(out["right"].detach().clone())
        return out

    contrastive_step(forward, slices([4, 4]))
    assert len(seen) == 4  # two caching passes, then two gradient passes
    torch.testing.assert_close(seen[2], seen[0], rtol=0, atol=0)
    torch.testing.assert_close(seen[3], seen[1], rtol=0, atol=0)
    assert not torch.equal(seen[0], inner(slice(0, 4))["right"])  # the dropout is really random


N_DDP = helpers.N_ACCUM


@pytest.fixture
def ddp_runs(gloo2):
    return [r["accum"] for r in gloo2]


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["ce", "siglip"])
def test_ddp_accumulation_matches_one_process_full_batch_with_one_sync_per_step(ddp_runs, kind):
    n = N_DDP
    k_ranks = [r[(3, kind)] for r in ddp_runs]
    one_ranks = [r[(1, kind)] for r in ddp_runs]
    xq, xd, weights, ids = two_tower_batch(n)
    model = helpers.TwoTower()

    def forward(mb):
        q, d, s, b = model(xq[mb], xd[mb])
        return {"left": q, "right": d, "weights": weights[mb], "left_ids": ids[mb], "logit_scale": s, "logit_bias": b}

    ref_loss = contrastive_step(forward, [slice(0, n)], kind=kind)
    ref = {name: p.grad for name, p in model.named_parameters()}
    for out in k_ranks:
        assert out["micro_steps"] == 3
        assert_rel_close(out["loss"], ref_loss, msg="loss")
        assert_all_rel_close({name: out[name] for name in ref}, ref)
    # The tolerance would catch a rank that lost one row's term: the reference without it is far off.
    model.zero_grad(set_to_none=True)
    weights[-1] = 0.0
    contrastive_step(forward, [slice(0, n)], kind=kind)
    assert_detects(worst_rel_err({name: k_ranks[0][name] for name in ref},
                                 {name: p.grad for name, p in model.named_parameters()})[0], EXACT)
    # no_sync: 3 micro-steps cost exactly the gradient all-reduces of 1.
    assert k_ranks[0]["syncs"] == one_ranks[0]["syncs"] > 0


def test_split_micro_batches():
    assert split_micro_batches(8, 4) == [4, 4]
    assert split_micro_batches(10, 4) == [4, 3, 3]
    assert split_micro_batches(5, 8) == [5]
    for b in range(1, 40):
        for m in range(1, b + 2):
            sizes = split_micro_batches(b, m)
            assert sum(sizes) == b and max(sizes) <= m and max(sizes) - min(sizes) <= 1
            assert len(sizes) == math.ceil(b / m)


@pytest.mark.parametrize("batch,limit,expect", [
    (256, 300, 256), (256, 256, 256), (256, 255, 128), (256, 90, 64), (256, 1, 1),
    (100, 40, 25), (100, 99, 50), (96, 40, 32), (7, 6, 1), (1, 1, 1), (1000, 333, 250), (360, 170, 120),
])
def test_search_micro_batch_finds_the_largest_divisor_that_fits(batch, limit, expect):
    probes = []

    def fits(m):
        probes.append(m)
        return m <= limit

    got = search_micro_batch(batch, fits)
    assert got == expect
    assert batch % got == 0 and got <= limit
    assert not any(d > got and batch % d == 0 and d <= limit for d in range(1, batch + 1))
    assert len(probes) <= 2 * math.ceil(math.log2(batch)) + 2


def test_search_micro_batch_gives_up_when_nothing_fits():
    with pytest.raises(RuntimeError, match="not even a micro-batch of 1"):
        search_micro_batch(64, lambda m: False)
