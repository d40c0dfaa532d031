"""The micro-batch search of dynamicBatchSize: the largest micro-batch whose forward+backward fits.

On CUDA the trainer probes forward+backward of the real model on real rows at micro-batch
sizes that divide the step (halving until one fits, then bisecting between the fit and the
last failure), and trains with feature-caching accumulation (``accumulation.py``) over the
resulting micro-steps, so the contrastive batch stays batchSize x accumFreq and the maths does
not change. On CPU it does nothing.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["divisors", "search_micro_batch", "cuda_probe", "probe_micro_batch", "param_bytes"]


def divisors(n: int) -> list[int]:
    """Divisors of n, largest first."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]), reverse=True)


def search_micro_batch(batch_size: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor of ``batch_size`` for which ``fits(m)`` holds.

    Micro-batches divide the step evenly (equal shapes on every micro-step and rank). Probes
    halve the size (batch_size, then the largest divisor <= half of the last failure, ...)
    until one fits, then bisect among the divisors between that fit and the last failure, so
    O(log B) probes. Assumes ``fits`` is monotone (smaller fits if larger does). Raises
    RuntimeError when not even 1 fits.
    """
    cands = divisors(batch_size)  # descending
    fail, i = -1, 0
    while not fits(cands[i]):
        if cands[i] == 1:
            raise RuntimeError("dynamicBatchSize: not even a micro-batch of 1 fits in memory")
        fail = i
        half = cands[i] // 2
        i = next(j for j, c in enumerate(cands) if c <= max(half, 1))
    lo, hi = fail, i  # cands[lo] fails (or lo == -1), cands[hi] fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(cands[mid]):
            hi = mid
        else:
            lo = mid
    return cands[hi]


def cuda_probe(step: Callable[[int], None], device: torch.device, reserve_bytes: int = 0,
               headroom: float = 0.92) -> Callable[[int], bool]:
    """A ``fits`` predicate for search_micro_batch: run ``step(m)`` (forward+backward of a
    micro-batch of m, gradients zeroed after) and report whether it ran without OOM and with
    the peak plus ``reserve_bytes`` (e.g. the AdamW state not yet allocated) under
    ``headroom`` of the device memory."""
    total = torch.cuda.get_device_properties(device).total_memory

    def fits(m: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            step(m)
            torch.cuda.synchronize(device)
            ok = torch.cuda.max_memory_allocated(device) + reserve_bytes <= headroom * total
        except torch.cuda.OutOfMemoryError:
            ok = False
        torch.cuda.empty_cache()
        return ok

    return fits


def _proxy_loss(left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Local symmetric InfoNCE: the memory of the real loss without its collectives (ranks
    probe independently, so a probe must never wait for another rank)."""
    logits = scale.float() * left.float() @ right.float().T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels))


def probe_micro_batch(
    step_rows: int,
    forward_rows: Callable[[int], tuple],
    module: nn.Module,
    device: torch.device,
    *,
    optimizer_bytes: int = 0,
    world_size: int = 1,
    local_loss: bool = False,
    fits_factory: Callable = None,
) -> int:
    """dynamicBatchSize: the largest micro-batch (a divisor of ``step_rows``) whose forward +
    backward fits, probed on the real model.

    ``forward_rows(m)`` runs the trainable forward on m real rows and returns (left, right,
    logit_scale). The probe's peak must leave room for what a probe does not allocate: the
    AdamW state (``optimizer_bytes``, created lazily at the first step), DDP's gradient
    buckets (one more copy of the gradients when world_size > 1) and the full loss's fp32
    logits over the global batch (a few N_rows x N_global matrices). Model buffers (BatchNorm
    statistics) and the RNG are restored afterwards, so probing changes nothing about the run.
    ``fits_factory(step, device, reserve_bytes) -> fits`` defaults to ``cuda_probe``.
    """
    fits_factory = fits_factory or cuda_probe
    trainable = [p for p in module.parameters() if p.requires_grad]
    n_global = step_rows * world_size
    n_rows = step_rows if local_loss else n_global
    reserve = optimizer_bytes + 4 * 6 * n_rows * n_global  # logits, softmax, grads, mask, both directions
    if world_size > 1:
        reserve += param_bytes(trainable)
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}

    def step(m: int) -> None:
        try:
            left, right, scale = forward_rows(m)[:3]
            _proxy_loss(left, right, scale).backward()
        finally:
            module.zero_grad(set_to_none=True)

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            return search_micro_batch(step_rows, fits_factory(step, device, reserve))
        finally:
            with torch.no_grad():
                for name, b in module.named_buffers():
                    b.copy_(buffers[name])


def param_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes held by these tensors (to size the AdamW state a probe must leave room for)."""
    return sum(p.numel() * p.element_size() for p in params)
