"""Shared pieces of the benchmarks: tiny model configs, synthetic batches, our training step.

Benchmarks print figures; they assert nothing about time.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]

#: The tiny ViT CLIP of ../shared/research/openclip.md (3.4 M parameters, 3.2 M of them the
#: 49408 x 64 token embedding); random initialisation.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def ensure_importable() -> None:
    """Let ``kontrast.trainer`` import from a checkout without an editable install."""
    try:
        import kontrast.trainer  # noqa: F401
    except ModuleNotFoundError:
        import types

        sys.path.insert(0, str(ROOT))
        import kontrast

        pkg = types.ModuleType("kontrast.trainer")
        pkg.__path__ = [str(ROOT / "trainer" / "src")]
        sys.modules["kontrast.trainer"] = pkg
        kontrast.trainer = pkg


def model_config(name: str) -> dict:
    """"tiny" (TINY above) or an open_clip architecture name such as ViT-B-32."""
    if name == "tiny":
        return TINY
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise SystemExit(f"unknown open_clip model {name!r}")
    return cfg


def make_clip(cfg: dict, seed: int = 0, device="cpu", precision: str = "fp32", **kwargs):
    """A randomly initialised open_clip model (no downloads)."""
    import open_clip

    torch.manual_seed(seed)
    cls = open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP
    extra = {k: cfg[k] for k in ("quick_gelu",) if k in cfg}
    model = cls(embed_dim=cfg["embed_dim"], vision_cfg=dict(cfg["vision_cfg"]), text_cfg=dict(cfg["text_cfg"]),
                output_dict=True, **extra, **kwargs)
    return model.to(device)


def synthetic(n: int, cfg: dict, fields: int = 1, seed: int = 0, device="cpu"):
    """n random images and, per text field, n random token rows (EOT-terminated)."""
    g = torch.Generator().manual_seed(seed)
    size = cfg["vision_cfg"]["image_size"]
    ctx = cfg["text_cfg"].get("context_length", 77)
    vocab = cfg["text_cfg"].get("vocab_size", 49408)
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = torch.randint(1, vocab - 2, (n, fields, ctx), generator=g)
    tokens[:, :, -1] = vocab - 1  # EOT (argmax pooling finds it)
    return images.to(device), tokens.to(device)


def our_batch(images, left_tokens, right_tokens=None, device="cpu"):
    """A batch in the layout of kontrast.trainer.data.dataset.collate."""
    b = images.shape[0]
    ctx = left_tokens.shape[-1]
    if right_tokens is None:
        right_tokens = torch.zeros((b, 0, ctx), dtype=torch.long)
    f_r = 1 + right_tokens.shape[1]
    return {
        "left_tokens": left_tokens.to(device),
        "left_weights": torch.full((b, left_tokens.shape[1]), 1.0 / left_tokens.shape[1], device=device),
        "image": images.to(device),
        "right_tokens": right_tokens.to(device),
        "right_weights": torch.full((b, f_r), 1.0 / f_r, device=device),
        "weight": torch.ones(b, device=device),
        "left_id": torch.arange(b, device=device),
        "right_id": torch.arange(b, device=device),
    }


def our_trainer(clip, n_left: int = 1, n_right: int = 1, precision_name: str = "fp32", device="cpu",
                kind: str = "ce", lr: float = 1e-4, fused_adamw: bool = True, world=None):
    """Our training step exactly as kontrast.trainer.run.train runs it, as a closure(micro_batches);
    DDP-wrapped when ``world`` is a distributed World."""
    ensure_importable()
    from kontrast.trainer.distributed import World, wrap_ddp
    from kontrast.trainer.model.fusion import FusedModel
    from kontrast.trainer.model.locks import make_adamw, param_groups
    from kontrast.trainer.precision import resolve_precision
    from kontrast.trainer.step.train_step import LOGIT_SCALE_MAX, train_step

    dev = torch.device(device)
    precision = resolve_precision(precision_name, dev.type)
    fused = FusedModel(clip, left_active=[True] * n_left, right_active=[True] * n_right,
                       input_dtype=precision.input_dtype).to(dev)
    fused.train()
    world = world or World(device=dev)
    net = wrap_ddp(fused, world)
    if fused_adamw:
        optimizer = make_adamw(param_groups(clip, 0.2), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    else:
        optimizer = torch.optim.AdamW(param_groups(clip, 0.2), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    scaler = precision.make_scaler()

    def step(micro_batches):
        optimizer.zero_grad(set_to_none=True)
        loss = train_step(net, micro_batches, kind=kind, local_loss=False, precision=precision,
                          scaler=scaler, world=world)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        return loss

    step.params = list(clip.parameters())
    return step


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device="cpu") -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def machine(device="cpu") -> str:
    """CPU model and core count (lscpu's "Model name"), and the GPU when on CUDA."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out = f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.device(device).type == "cuda":
        out = f"{torch.cuda.get_device_name()} ({out})"
    return out


def fmt(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


__all__ = ["TINY", "ensure_importable", "model_config", "make_clip", "synthetic", "our_batch", "our_trainer", "timed", "median",
           "machine", "fmt", "sync", "math"]
