"""2 gloo processes x B give the loss and gradients of 1 process x 2B (ce and siglip,
with and without local_loss), both for raw features (with the training table's known pairs,
some joining a query on one rank with a document on the other) and for DDP-averaged
parameters.

Comparisons use the relative norm error (tests/numeric.py). Each test also compares the
ranks' results with a reference in which one row's weight is 10% off, and shows that this
small, real error misses the tolerance by far."""

import pytest
import torch

from numeric import assert_all_rel_close, assert_detects, assert_rel_close, global_norm, rel_err, worst_rel_err
from scale import helpers
from scale.helpers import LOSS_CASES, loss_grads, loss_inputs, loss_table, two_tower_grads

N = helpers.N_LOSS  # global batch; 6 rows per rank
W = 2


@pytest.fixture
def ranks(gloo2):
    return [r["loss"] for r in gloo2]


@pytest.mark.distributed
@pytest.mark.parametrize("kind,local", LOSS_CASES)
def test_feature_gradients_match_full_batch(ranks, kind, local):
    inputs = loss_inputs(N)
    known = loss_table(N)
    assert len(known) > 0
    ref = loss_grads(*inputs, kind, local=False, known=known)
    left, right, weights, lid, rid = inputs
    off = weights.clone()
    off[0] *= 1.1
    ref_off = loss_grads(left, right, off, lid, rid, kind, local=False, known=known)
    b = N // W
    for r, out in enumerate(ranks):
        got = out["features"][(kind, local)]
        assert_rel_close(got["loss"], ref["loss"], msg="loss")
        # DDP divides by W what each rank's rows receive (every rank's loss sees them).
        rows = slice(r * b, (r + 1) * b)
        for side in ("left", "right"):
            assert_rel_close(got[side] / W, ref[side][rows], msg=side)
        assert_detects(max(rel_err(got[side] / W, ref_off[side][rows]) for side in ("left", "right")), margin=10)
    # For ce the bias's true gradient is 0 (softmax ignores it): judge it on the whole gradient's scale.
    floor = 1e-3 * global_norm({k: v for k, v in ref.items() if k != "loss"})
    for p in ("scale", "bias"):
        mean = sum(out["features"][(kind, local)][p] for out in ranks) / W
        assert_rel_close(mean, ref[p], floor=floor, msg=p)


@pytest.mark.distributed
@pytest.mark.parametrize("kind,local", LOSS_CASES)
def test_ddp_parameter_gradients_match_full_batch(ranks, kind, local):
    left, right, weights, lid, rid = loss_inputs(N)
    g = torch.Generator().manual_seed(1)
    xq, xd = torch.randn(N, 5, generator=g), torch.randn(N, 5, generator=g)
    ref = two_tower_grads(xq, xd, weights, lid, kind, local=False)
    off = weights.clone()
    off[0] *= 1.1
    ref_off = two_tower_grads(xq, xd, off, lid, kind, local=False)
    for out in ranks:
        got = out["models"][(kind, local)]
        assert set(got) == set(ref)
        assert_all_rel_close(got, ref, msg=f"{kind} local={local}")
        assert_detects(worst_rel_err(got, ref_off)[0], margin=10)


@pytest.mark.distributed
def test_world_from_torchrun_environment(ranks):
    n = helpers.N_SHARD
    outs = [r["basics"] for r in ranks]
    for r, out in enumerate(outs):
        assert (out["rank"], out["world_size"], out["local_rank"], out["is_main"]) == (r, W, r, r == 0)
        assert out["device"] == "cpu" and out["backend"] == "gloo"
        assert out["mean"] == pytest.approx(1.5)
        assert out["mean_tensor"] == pytest.approx((0 + 4 + 2 + 4) / 4)
        assert out["min"] == 9 and out["max"] == [W - 1, 0, 7]
        assert out["broadcast"] == {"path": "from-rank-0"}
    shards = [out["shard"] for out in outs]
    assert len(shards[0]) == len(shards[1]) == n // W
    assert not set(shards[0]) & set(shards[1])
