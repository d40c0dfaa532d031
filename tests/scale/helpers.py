"""Shared helpers for tests/scale: tiny open_clip models and a gloo process launcher.

Worker functions for ``run_workers`` live here because spawned processes must import them
by module name (pytest's importlib mode makes test modules unimportable by name).
"""

from __future__ import annotations

import faulthandler
import math
import os
import tempfile

import torch
import torch.multiprocessing as mp




TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2,
                 "pool_type": "last"},
}


def tiny_clip(custom_text: bool = False, seed: int = 0, **kwargs):
    """A 2-layer ViT + 2-layer text transformer CLIP (random init, ~60k parameters)."""
    import open_clip

    torch.manual_seed(seed)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(embed_dim=TINY_VIT["embed_dim"], vision_cfg=dict(TINY_VIT["vision_cfg"]),
               text_cfg=dict(TINY_VIT["text_cfg"]), output_dict=True, **kwargs)


def tiny_resnet_clip(seed: int = 0):
    """A ModifiedResNet image tower (has BatchNorm) for lockImageFreezeBnStats."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 8,
                                                    "head_width": 8},
                          text_cfg=dict(TINY_VIT["text_cfg"]), output_dict=True)


def _entry(rank: int, fn, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    faulthandler.enable(all_threads=True)    # a native crash prints where each thread was
    from kontrast.trainer.distributed import init_from_env, shutdown

    world = init_from_env(device="cpu")
    try:
        result = fn(world, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        shutdown()


def run_workers(fn, world_size: int = 2, *args):
    """Run ``fn(world, *args)`` on ``world_size`` gloo processes; return each rank's result.

    This process hosts the ranks' store, as torchrun's agent does, on a port it binds itself
    (no free port picked, released and raced for)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(fn, world_size, store.port, d, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(world_size)]


# ---------------------------------------------------------------------------------------
# Workers (run on every rank by run_workers)

LOSS_CASES = [(kind, local) for kind in ("ce", "siglip") for local in (False, True)]


def loss_inputs(n: int, d: int = 6, seed: int = 0):
    """Global-batch inputs: features, weights, ids with duplicates, scale and bias."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    left = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    right = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    weights = torch.rand(n, generator=g) + 0.1
    weights[1] = 0.0
    left_ids = torch.randint(0, n // 2, (n,), generator=g)
    right_ids = torch.arange(n)
    right_ids[-1] = right_ids[0]  # one document appears on both ranks
    return left, right, weights, left_ids, right_ids


def loss_table(n: int):
    """The training table's known pairs for loss_inputs(n): its rows, plus pairs that join a
    query on one rank with a document on the other (a batch holds both, but not the pair's row)."""
    import numpy as np

    from kontrast.trainer.step.known_pairs import KnownPairs

    _, _, weights, left_ids, right_ids = loss_inputs(n)
    extra = [(int(left_ids[2]), int(right_ids[n - 3]), 2.0), (int(left_ids[n - 2]), int(right_ids[1]), 0.5),
             (int(left_ids[0]), int(right_ids[n // 2 + 1]), 1.0)]
    q, d, w = (np.array(col) for col in zip(*extra))
    return KnownPairs.of_table(np.concatenate([left_ids.numpy(), q]), np.concatenate([right_ids.numpy(), d]),
                               np.concatenate([weights.numpy(), w]))


def loss_grads(left, right, weights, left_ids, right_ids, kind, local, known=None):
    """Loss value and gradients w.r.t. features, logit scale and bias for these rows."""
    from kontrast.trainer.step.losses import weighted_contrastive_loss

    left = left.clone().requires_grad_()
    right = right.clone().requires_grad_()
    scale = torch.tensor(9.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    loss = weighted_contrastive_loss(left, right, weights, scale, bias, kind=kind, left_ids=left_ids,
                                     right_ids=right_ids, local_loss=local, known=known)
    loss.backward()
    return {"loss": loss.detach(), "left": left.grad, "right": right.grad, "scale": scale.grad, "bias": bias.grad}


class TwoTower(torch.nn.Module):
    """Linear query and document encoders plus a learnable logit scale and bias."""

    def __init__(self, d_in: int = 5, d: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.q = torch.nn.Linear(d_in, d)
        self.d = torch.nn.Linear(d_in, d)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, xq, xd):
        import torch.nn.functional as F

        return F.normalize(self.q(xq), dim=-1), F.normalize(self.d(xd), dim=-1), self.logit_scale.exp(), self.logit_bias


def two_tower_grads(xq, xd, weights, ids, kind, local, world=None):
    """Parameter gradients of TwoTower (DDP-wrapped when world is distributed)."""
    from kontrast.trainer.distributed import wrap_ddp
    from kontrast.trainer.step.losses import weighted_contrastive_loss

    model = TwoTower()
    net = wrap_ddp(model, world) if world is not None else model
    q, d, s, b = net(xq, xd)
    loss = weighted_contrastive_loss(q, d, weights, s, b, kind=kind, left_ids=ids, local_loss=local)
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


def worker_loss_exactness(world, n_global: int, n_shard: int):
    """Every loss case on this rank's contiguous chunk of the global batch, plus the World
    helpers (one spawn: the first DDP construction alone imports torch._dynamo for seconds)."""
    b = n_global // world.world_size
    rows = slice(world.rank * b, (world.rank + 1) * b)
    left, right, weights, lid, rid = loss_inputs(n_global)
    known = loss_table(n_global)
    features = {case: loss_grads(left[rows], right[rows], weights[rows], lid[rows], rid[rows], *case, known=known)
                for case in LOSS_CASES}
    g = torch.Generator().manual_seed(1)
    xq, xd = torch.randn(n_global, 5, generator=g), torch.randn(n_global, 5, generator=g)
    models = {case: two_tower_grads(xq[rows], xd[rows], weights[rows], lid[rows], *case, world=world)
              for case in LOSS_CASES}
    return {"features": features, "models": models, "basics": worker_world_basics(world, n_shard)}


def worker_world_basics(world, n: int):
    """init_from_env, all_reduce_mean/min/max, broadcast_object, shard_indices, barrier on real gloo."""
    import torch.distributed as dist

    from kontrast.trainer.distributed import all_reduce_max, all_reduce_mean, all_reduce_min, broadcast_object
    from kontrast.trainer.data.batches import shard_indices

    world.barrier()
    return {
        "rank": world.rank, "world_size": world.world_size, "local_rank": world.local_rank,
        "is_main": world.is_main, "device": str(world.device), "backend": dist.get_backend(),
        "mean": all_reduce_mean(float(world.rank + 1)),
        "mean_tensor": all_reduce_mean(torch.tensor([world.rank * 2.0, 4.0])),
        "min": all_reduce_min(10 - world.rank),
        "max": all_reduce_max([world.rank, 0, 7 - world.rank]),
        "broadcast": broadcast_object({"path": f"from-rank-{world.rank}"}),
        "shard": shard_indices(n, world, epoch=3, seed=7).tolist(),
    }


def worker_accumulation_ddp(world, n_global: int, configs):
    """``accumulation_ddp`` for each (k, kind) in configs."""
    return {cfg: accumulation_ddp(world, n_global, *cfg) for cfg in configs}


def accumulation_ddp(world, n_global: int, k: int, kind: str):
    """TwoTower under DDP with feature-caching accumulation over k micro-batches per rank;
    counts DDP gradient all-reduces (comm hook calls) to show no_sync between micro-steps."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from kontrast.trainer.distributed import wrap_ddp
    from kontrast.trainer.step.accumulation import contrastive_step, split_micro_batches

    b = n_global // world.world_size
    rows = slice(world.rank * b, (world.rank + 1) * b)
    xq, xd, weights, ids = two_tower_batch(n_global)
    xq, xd, weights, ids = xq[rows], xd[rows], weights[rows], ids[rows]
    model = TwoTower()
    ddp = wrap_ddp(model, world)
    calls = {"n": 0}

    def hook(state, bucket):
        calls["n"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    sizes = split_micro_batches(b, math.ceil(b / k))
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    mbs = [slice(s, s + n) for s, n in zip(starts, sizes)]

    def forward(mb):
        q, d, s, bias = ddp(xq[mb], xd[mb])
        return {"left": q, "right": d, "weights": weights[mb], "left_ids": ids[mb], "logit_scale": s, "logit_bias": bias}

    loss = contrastive_step(forward, mbs, kind=kind, model=ddp)
    return {"loss": loss, "syncs": calls["n"], "micro_steps": len(mbs),
            **{n: p.grad.clone() for n, p in model.named_parameters()}}


def two_tower_batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xq, xd = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    weights = torch.rand(n, generator=g) + 0.2
    ids = torch.arange(n)
    ids[3] = ids[0]
    return xq, xd, weights, ids


ACCUM_CONFIGS = [(k, kind) for k in (1, 3) for kind in ("ce", "siglip")]
N_LOSS, N_SHARD, N_ACCUM = 12, 11, 12


def worker_all(world):
    """Everything the in-process gloo tests need, from one 2-process spawn (each spawn pays
    for importing torch and, at the first DDP construction, torch._dynamo)."""
    return {"loss": worker_loss_exactness(world, N_LOSS, N_SHARD),
            "accum": worker_accumulation_ddp(world, N_ACCUM, ACCUM_CONFIGS)}


MATRYOSHKA_DIMS = (4, 2)
MATRYOSHKA_CASES = [(kind, local, k) for kind in ("ce", "siglip") for local in (False, True) for k in (1, 2)]


def matryoshka_grads(world, n_global: int, kind: str, local: bool, k: int):
    """TwoTower (8-d embeddings) trained with Matryoshka widths MATRYOSHKA_DIMS through
    ``contrastive_step``: this rank's contiguous chunk of the global batch in k micro-batches,
    DDP-wrapped when ``world`` is given. Parameter gradients and the loss."""
    from kontrast.trainer.distributed import wrap_ddp
    from kontrast.trainer.step.accumulation import contrastive_step

    world_size, rank = (world.world_size, world.rank) if world is not None else (1, 0)
    b = n_global // world_size
    rows = slice(rank * b, (rank + 1) * b)
    xq, xd, weights, ids = (t[rows] for t in two_tower_batch(n_global))
    model = TwoTower(d=8)
    net = wrap_ddp(model, world) if world is not None else model
    step = b // k
    mbs = [slice(i, i + step) for i in range(0, b, step)]

    def forward(mb):
        q, d, s, bias = net(xq[mb], xd[mb])
        return {"left": q, "right": d, "weights": weights[mb], "left_ids": ids[mb], "logit_scale": s,
                "logit_bias": bias}

    loss = contrastive_step(forward, mbs, kind=kind, local_loss=local, model=net, dims=MATRYOSHKA_DIMS)
    return {"loss": loss, **{n: p.grad.clone() for n, p in model.named_parameters()}}


def worker_matryoshka(world, n_global: int):
    return {case: matryoshka_grads(world, n_global, *case) for case in MATRYOSHKA_CASES}
