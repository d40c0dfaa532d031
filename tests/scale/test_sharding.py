"""sampler (shard_indices, StepSampler) and the single-process World (no process group needed)."""


import torch
import torch.distributed as dist

from kontrast.trainer.distributed import World, all_reduce_mean, init_from_env, unwrap, wrap_ddp
from kontrast.trainer.data.batches import StepSampler, shard_indices


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

    def shard(epoch, seed):
        return shard_indices(50, world, epoch=epoch, seed=seed).tolist()

    assert shard(0, 0) == shard(0, 0) and shard(0, 0) != shard(1, 0) and shard(0, 0) != shard(0, 1)


def test_each_step_of_w_ranks_is_the_window_one_process_takes():
    """The reason for strided shards: W ranks x batch B at step t hold exactly the samples
    that one process with batch W*B takes at step t."""
    n, w, b = 64, 2, 4
    single = shard_indices(n, World(), epoch=1, seed=3)
    shards = [shard_indices(n, World(rank=r, world_size=w), epoch=1, seed=3) for r in range(w)]
    for step in range(n // (w * b)):
        window = set(single[step * w * b:(step + 1) * w * b])
        assert set().union(*(s[step * b:(step + 1) * b] for s in shards)) == window


def test_step_sampler_cuts_whole_steps_into_micro_batches_and_resumes_mid_epoch():
    world = World(rank=1, world_size=2)
    sampler = StepSampler(n_rows=53, world=world, seed=4, step_rows=6, micro=3)   # 26 rows per rank: 4 steps
    sampler.set_epoch(2)
    full = list(sampler)
    shard = shard_indices(53, world, epoch=2, seed=4).tolist()
    assert sampler.steps_per_epoch == 4 and len(full) == len(sampler) == 8
    assert [i for mb in full for i in mb] == shard[:24] and {len(mb) for mb in full} == {3}
    sampler.set_epoch(2, start_step=3)                  # resumed after 3 steps: the rest, in order
    assert list(sampler) == full[6:] and len(sampler) == 2
    sampler.set_epoch(2, start_step=4)
    assert list(sampler) == []
