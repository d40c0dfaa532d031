"""What each ``precision`` value means, on CUDA and on CPU.

open_clip's meanings, made explicit, with one decision for CPUs (which have no fast fp16
and where torch's autocast only supports bf16):

==============  =========================  ============================  ===========
precision       weights                    compute                       GradScaler
==============  =========================  ============================  ===========
amp             fp32                       CUDA: fp16 autocast;          CUDA only
                                           CPU: bf16 autocast
amp_bf16        fp32                       bf16 autocast                 no
amp_bfloat16    (same as amp_bf16)
bf16            bf16 (LayerNorm, embeddings, bf16, no autocast            no
                logit scale stay fp32)
fp16            fp16 (likewise)            fp16, no autocast             no
fp32            fp32                       fp32                          no
==============  =========================  ============================  ===========

CPU notes: ``amp`` is bf16 autocast without a scaler (bf16 has fp32's exponent range, so
there is nothing to scale). ``fp16`` runs, because torch has CPU kernels for half, but it is
slow on most CPUs and AdamW updates fp16 weights directly (open_clip's "manual" mode): an
``eps`` below fp16's smallest subnormal (~6e-8, e.g. the 1e-8 default of non-ViT models)
rounds to 0 and the update can divide by zero, so the trainer warns about it. Use
``amp_bf16`` or ``fp32`` on CPU.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)

FP16_TINY = 2.0 ** -24  # smallest positive fp16 subnormal


@dataclass(frozen=True)
class Precision:
    name: str
    device_type: str
    model_precision: str            #: passed to open_clip.create_model (casts weights)
    autocast_dtype: Optional[torch.dtype]
    grad_scaler: bool
    input_dtype: Optional[torch.dtype]  #: images are cast to this before the image tower

    def autocast(self):
        """Context manager for forward passes (a no-op without autocast)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def make_scaler(self):
        if not self.grad_scaler:
            return None
        return torch.amp.GradScaler(device=self.device_type)

    def describe(self) -> str:
        """What the value means here, e.g. "amp: bf16 autocast, fp32 weights" (for status)."""
        if self.autocast_dtype is not None:
            what = f"{str(self.autocast_dtype).replace('torch.', '')} autocast, fp32 weights"
        elif self.model_precision in ("bf16", "fp16"):
            what = f"{self.model_precision} weights, no autocast"
        else:
            what = "fp32 weights and compute"
        return f"{self.name}: {what}" + (", gradient scaler" if self.grad_scaler else "")


def resolve_precision(name: str, device_type: str) -> Precision:
    """The concrete behaviour of a precision value on a device type ("cpu" or "cuda")."""
    if name == "amp":
        dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
        return Precision(name, device_type, "fp32", dtype, device_type == "cuda", None)
    if name in ("amp_bf16", "amp_bfloat16"):
        return Precision(name, device_type, "fp32", torch.bfloat16, False, None)
    if name == "bf16":
        return Precision(name, device_type, "bf16", None, False, torch.bfloat16)
    if name == "fp16":
        return Precision(name, device_type, "fp16", None, False, torch.float16)
    if name == "fp32":
        return Precision(name, device_type, "fp32", None, False, None)
    raise ValueError(f"unknown precision {name!r}")


def precision_warnings(p: Precision, eps: float) -> list[str]:
    """Advice worth printing before a run (pure: the caller logs it)."""
    out = []
    if p.name == "fp16" and p.device_type == "cpu":
        out.append("precision fp16 on CPU casts the weights to half precision: slow on most CPUs "
                   "and without loss scaling; amp_bf16 or fp32 are the better CPU choices")
    if p.model_precision == "fp16" and eps < FP16_TINY:
        out.append(f"eps={eps:g} is below fp16's smallest value ({FP16_TINY:.1e}) and rounds to 0 in "
                   "fp16 optimizer state, which can produce NaN updates; set eps >= 1e-6 for fp16")
    return out


#: Warn when at least this share of the trainable weights cannot move by one lr-sized step.
LOST_UPDATE_SHARE = 0.1


def lost_update_share(lr: float, params, dtype: torch.dtype) -> float:
    """Share of the weights (as stored in ``dtype``) that an update of size ``lr`` cannot change.

    AdamW's step is about lr per weight whatever the gradient's scale. Stored in a format with
    relative spacing eps (bf16: 2^-7, fp16: 2^-10), a weight w moves only if the step is at
    least half its spacing, 2^floor(log2 |w|) * eps / 2; smaller steps round back to w and are lost.
    """
    eps = torch.finfo(dtype).eps
    lost = total = 0
    for p in params:
        magnitude = p.detach().abs().float()
        spacing = torch.exp2(torch.floor(torch.log2(magnitude))) * eps   # 0 for w = 0
        lost += int((2 * lr < spacing).sum())
        total += magnitude.numel()
    return lost / total if total else 0.0


def lost_update_warning(p: Precision, lr: float, params) -> Optional[str]:
    """A warning when pure bf16/fp16 weights would silently drop most updates at this lr."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p.model_precision)
    if dtype is None:
        return None
    share = lost_update_share(lr, [q for q in params if q.dtype == dtype], dtype)
    if share < LOST_UPDATE_SHARE:
        return None
    return (f"precision {p.name}: at lr={lr:g}, {share:.0%} of the {p.model_precision} weights are too large to "
            f"change by one step (an update below half the weight's spacing rounds away); use amp_bf16 "
            f"(fp32 weights) or a larger lr")
