"""Process-group set-up for torchrun (single or multi-node) and the collectives the trainer uses.

torchrun (also when launched by the operator with PET_* / rendezvous settings) exports
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT to every worker; without
WORLD_SIZE the trainer is a plain single process and nothing is initialised, so
``kontrast train FILE`` needs no launcher. Which rows each rank takes: data/batches.py.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.distributed as dist
# Imported before any process group exists, and not by DistributedDataParallel's first use: its
# ten functions take ``group=group.WORLD`` as a default, evaluated when the module is imported,
# and so hold the group imported under. Held, the group outlives ``destroy_process_group`` with
# its gloo threads, and a thread releasing its last work while the interpreter finalizes aborts
# the finished rank (SIGABRT, a failure to torchrun; tests/scale/test_group_teardown.py).
import torch.distributed.nn.functional  # noqa: F401

__all__ = ["World", "init_from_env", "wrap_ddp", "unwrap", "world_and_rank", "all_gather", "all_gather_objects",
           "gather_with_grad", "sum_over_ranks", "all_reduce_mean", "all_reduce_min", "all_reduce_max",
           "broadcast_object", "shutdown"]


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, reports and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()


def init_from_env(device: Optional[str] = None, timeout_s: float = 1800.0) -> World:
    """Build the World from torchrun's environment; initialise the process group if W > 1.

    ``device`` forces "cpu" or "cuda"; by default CUDA is used when available (one GPU per
    local rank, nccl) and otherwise the CPU (gloo).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "WORLD_SIZE" not in os.environ:
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return World(device=dev)
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def wrap_ddp(model: torch.nn.Module, world: World, **kwargs) -> torch.nn.Module:
    """DistributedDataParallel with the right device_ids (None on CPU: open_clip's [cpu] fails).

    Returns the model unchanged for a single process. Extra keyword arguments go to DDP
    (e.g. ``find_unused_parameters=True`` when part of the model gets no gradient).
    """
    if world.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Gradients live in DDP's communication buckets: no copy in and out of them every step,
    # and one gradient-sized buffer less.
    kwargs.setdefault("gradient_as_bucket_view", True)
    # DDP broadcasts rank 0's buffers before every forward (a blocking collective). Only
    # running statistics (BatchNorm) can drift apart; CLIP's other buffers (attention masks)
    # are constants, so skip the broadcast for models without them.
    # (torch >= 2.14 names the flag forward_sync_buffers; older releases broadcast_buffers.)
    import inspect

    flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    if "forward_sync_buffers" not in kwargs and "broadcast_buffers" not in kwargs:
        kwargs[flag] = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                           for m in model.modules())

    if world.device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[world.device.index], **kwargs)
    return DistributedDataParallel(model, device_ids=None, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (or torch.compile), whose state_dict keys carry no prefix."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def world_and_rank() -> tuple[int, int]:
    """(processes, this one's rank) of the initialised process group; (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_gather(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's ``x`` (all the same shape) concatenated along ``dim`` in rank order; no gradient."""
    world, _ = world_and_rank()
    if world == 1:
        return x
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return torch.cat(out, dim)


def all_gather_objects(items: list) -> list:
    """Every rank's list of picklable items, concatenated in rank order."""
    world, _ = world_and_rank()
    if world == 1:
        return items
    parts: list = [None] * world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks, in place (``x`` itself without a process group)."""
    if world_and_rank()[0] > 1:
        dist.all_reduce(x)
    return x


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient for our rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = world_and_rank()
        ctx.world, ctx.rank, ctx.n = world, rank, x.shape[0]
        return all_gather(x)

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
    world, _ = world_and_rank()
    if world == 1:
        return x
    if not x.requires_grad:
        return all_gather(x)
    return _GatherWithGrad.apply(x)


def all_reduce_mean(value: Union[float, int, torch.Tensor]) -> float:
    """Mean of a scalar over ranks (for logging); the value itself for one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value.detach().float().mean()) if torch.is_tensor(value) else float(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = (value.detach().float().mean() if torch.is_tensor(value) else torch.tensor(float(value))).to(device)
    t = t.reshape(1).clone()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def all_reduce_min(value: int) -> int:
    """Smallest integer over ranks (e.g. the micro-batch every rank can fit)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_max(values: list[int]) -> list[int]:
    """Element-wise largest integers over ranks, in one collective (e.g. flags any rank may
    raise, so every rank takes the same decision at the same step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [int(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank (e.g. the resume checkpoint path)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Tear down the process group (safe to call when none exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
