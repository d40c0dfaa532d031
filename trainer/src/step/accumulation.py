"""How one optimizer step is computed over several micro-batches without changing the maths:
feature-caching accumulation (accumFreq) and the micro-batch search (dynamicBatchSize).

Feature-caching accumulation (``contrastive_step``). A contrastive loss is not a sum of
per-sample terms, so plain gradient accumulation would shrink the batch of negatives. We
instead (1) encode every micro-batch without gradients and cache the embeddings, then (2)
re-encode each micro-batch j with gradients and evaluate the *full* loss on the cached
embeddings with micro-batch j's live ones in place, and backpropagate. Summed over j, the
tower gradients are exactly the full batch's. The full loss is evaluated k times, so the
logit scale and bias would collect k times their gradient (open_clip 3.3.0 does this); here
each micro-step passes them through ``scale_grad(., 1/k)``, which makes their gradient exact
as well. Micro-steps 0..k-2 run under DDP's ``no_sync`` (one all-reduce per optimizer step).
The RNG state of each micro-batch's caching pass is replayed for its gradient pass, so
dropout / patch dropout draw the same masks in both and the cached embeddings are the ones
the gradient pass differentiates. Cost: one extra no-grad forward per sample (about 4/3 of
the compute) and the memory of the cached embeddings (k * B * d floats). BatchNorm towers
(ResNet/timm) update their running statistics in both passes, as in open_clip.

dynamicBatchSize (``search_micro_batch``, ``probe_micro_batch``). On CUDA the trainer
probes forward+backward of the real model on real rows at micro-batch sizes that divide the
step (halving until one fits, then bisecting between the fit and the last failure), and
trains with feature-caching accumulation over the resulting micro-steps, so the contrastive
batch stays batchSize x accumFreq and the maths does not change. On CPU it does nothing.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from .known_pairs import KnownPairs
from .losses import scale_grad, weighted_contrastive_loss

__all__ = ["contrastive_step", "split_micro_batches", "divisors", "search_micro_batch", "cuda_probe",
           "probe_micro_batch", "param_bytes", "ROW_KEYS"]

#: Keys of the forward output that hold one row per sample (concatenated across micro-batches).
ROW_KEYS = ("left", "right", "weights", "left_ids", "right_ids")


def split_micro_batches(batch_size: int, micro_batch: int) -> list[int]:
    """Sizes of ceil(B/m) near-equal micro-batches covering B rows (e.g. 10, 4 -> [4, 3, 3])."""
    if micro_batch <= 0 or batch_size <= 0:
        raise ValueError("batch sizes must be positive")
    k = math.ceil(batch_size / micro_batch)
    base, extra = divmod(batch_size, k)
    return [base + 1] * extra + [base] * (k - extra)


def _rng_state(device: torch.device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def contrastive_step(
    forward: Callable[[Any], Mapping[str, Any]],
    micro_batches: Sequence[Any],
    *,
    kind: str = "ce",
    local_loss: bool = False,
    model: Optional[nn.Module] = None,
    backward: Optional[Callable[[torch.Tensor], None]] = None,
    known: Optional[KnownPairs] = None,
) -> torch.Tensor:
    """Forward and backward of one optimizer step over ``micro_batches`` (gradients accumulate
    in ``.grad``; the caller zeroes them before and steps the optimizer after).

    ``forward(mb)`` returns a mapping with "left", "right" ([b, d] normalised embeddings),
    "weights" ([b]), optional "left_ids" / "right_ids" ([b]), "logit_scale" (exponentiated)
    and optional "logit_bias". It must call the DDP-wrapped model once (DDP needs one forward
    per backward). ``model``: the (possibly DDP-wrapped) model, for ``no_sync``.
    ``backward``: e.g. ``lambda l: scaler.scale(l).backward()`` for fp16 AMP.
    ``known``: the training table's relevant pairs (``losses.KnownPairs``), for the targets.
    Returns the full-batch loss (detached).
    """
    backward = backward or (lambda loss: loss.backward())
    k = len(micro_batches)
    if k == 0:
        raise ValueError("no micro-batches")

    def loss_of(rows: Mapping[str, Any], scale, bias) -> torch.Tensor:
        return weighted_contrastive_loss(
            rows["left"], rows["right"], rows["weights"], scale, bias, kind=kind,
            left_ids=rows.get("left_ids"), right_ids=rows.get("right_ids"), local_loss=local_loss, known=known)

    if k == 1:
        out = forward(micro_batches[0])
        loss = loss_of(out, out["logit_scale"], out.get("logit_bias"))
        backward(loss)
        return loss.detach()

    cached: list[dict] = []
    states = []
    state_device = (torch.device("cuda", torch.cuda.current_device())
                    if torch.cuda.is_available() and torch.cuda.is_initialized() else torch.device("cpu"))
    with torch.no_grad():
        for mb in micro_batches:
            states.append(_rng_state(state_device))
            out = forward(mb)
            cached.append({key: out[key].detach() for key in ROW_KEYS if out.get(key) is not None})
    after = _rng_state(state_device)
    sync_off = getattr(model, "no_sync", None)
    loss = None
    for j, mb in enumerate(micro_batches):
        ctx = sync_off() if (sync_off is not None and j < k - 1) else contextlib.nullcontext()
        with ctx:
            _set_rng_state(states[j], state_device)
            out = forward(mb)
            rows = {key: torch.cat([out[key] if i == j else cached[i][key] for i in range(k)])
                    for key in ("left", "right")}
            for key in ROW_KEYS[2:]:
                if key in cached[0]:
                    rows[key] = torch.cat([c[key] for c in cached])
            bias = out.get("logit_bias")
            loss = loss_of(rows, scale_grad(out["logit_scale"], 1.0 / k),
                           None if bias is None else scale_grad(bias, 1.0 / k))
            backward(loss)
    _set_rng_state(after, state_device)
    return loss.detach()


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
