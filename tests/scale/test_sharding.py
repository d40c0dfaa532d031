"""shard_indices and the single-process World (no process group needed)."""


import torch
import torch.distributed as dist

from kontrast.trainer.distributed import (World, all_reduce_mean, init_from_env, shard_indices,
                                          unwrap, wrap_ddp)


def test_single_process_world_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    world = init_from_env(device="cpu")
    assert (world.rank, world.world_size, world.local_rank, world.is_main) == (0, 1, 0, True)
    assert world.device == torch.device("cpu")
    assert not dist.is_initialized()
    world.barrier()  # a no-op, not an error
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, world) is model and unwrap(model) is model
    assert all_reduce_mean(torch.tensor([1.0, 3.0])) == 2.0


def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder():
    n, w = 103, 4
    shards = [shard_indices(n, World(rank=r, world_size=w), epoch=2, seed=5) for r in range(w)]
    assert {len(s) for s in shards} == {n // w}
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) == (n // w) * w
    assert set(flat) <= set(range(n))


def test_shards_are_deterministic_and_reshuffled_each_epoch():
    world = World(rank=1, world_size=2)
    assert shard_indices(50, world, epoch=0, seed=0) == shard_indices(50, world, epoch=0, seed=0)
    assert shard_indices(50, world, epoch=0, seed=0) != shard_indices(50, world, epoch=1, seed=0)
    assert shard_indices(50, world, epoch=0, seed=0) != shard_indices(50, world, epoch=0, seed=1)


def test_each_step_of_w_ranks_is_the_window_one_process_takes():
    """The reason for strided shards: W ranks x batch B at step t hold exactly the samples
    that one process with batch W*B takes at step t."""
    n, w, b = 64, 2, 4
    single = shard_indices(n, World(), epoch=1, seed=3)
    shards = [shard_indices(n, World(rank=r, world_size=w), epoch=1, seed=3) for r in range(w)]
    for step in range(n // (w * b)):
        window = set(single[step * w * b:(step + 1) * w * b])
        assert set().union(*(s[step * b:(step + 1) * b] for s in shards)) == window
