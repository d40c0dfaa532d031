"""2 gloo processes x B give the loss and gradients of 1 process x 2B (ce and siglip,
with and without local_loss), both for raw features and for DDP-averaged parameters."""

import pytest
import torch

from scale import helpers
from scale.helpers import LOSS_CASES, loss_grads, loss_inputs, two_tower_grads

N = helpers.N_LOSS  # global batch; 6 rows per rank
W = 2


@pytest.fixture
def ranks(gloo2):
    return [r["loss"] for r in gloo2]


@pytest.mark.distributed
@pytest.mark.parametrize("kind,local", LOSS_CASES)
def test_feature_gradients_match_full_batch(ranks, kind, local):
    ref = loss_grads(*loss_inputs(N), kind, local=False)
    b = N // W
    for r, out in enumerate(ranks):
        got = out["features"][(kind, local)]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        # DDP divides by W what each rank's rows receive (every rank's loss sees them).
        for side in ("left", "right"):
            torch.testing.assert_close(got[side] / W, ref[side][r * b:(r + 1) * b], rtol=1e-4, atol=1e-6)
    for p in ("scale", "bias"):
        mean = sum(out["features"][(kind, local)][p] for out in ranks) / W
        torch.testing.assert_close(mean, ref[p], rtol=1e-4, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("kind,local", LOSS_CASES)
def test_ddp_parameter_gradients_match_full_batch(ranks, kind, local):
    left, right, weights, lid, rid = loss_inputs(N)
    g = torch.Generator().manual_seed(1)
    xq, xd = torch.randn(N, 5, generator=g), torch.randn(N, 5, generator=g)
    ref = two_tower_grads(xq, xd, weights, lid, kind, local=False)
    for out in ranks:
        got = out["models"][(kind, local)]
        assert set(got) == set(ref)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{kind} local={local} {name}")


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
