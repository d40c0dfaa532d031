"""Tower locking (LiT-style) and AdamW parameter groups.

Locks must be applied before the optimizer is built: locked parameters get
requires_grad=False and ``param_groups`` leaves them out, so AdamW keeps no state for them
and weight decay cannot move them.

* Image tower: open_clip's own ``lock_image_tower`` (correct for ViT, ModifiedResNet, timm).
  ViT groups are [stem], blocks[0..L-2], [last block + ln_post], [proj]; the last
  ``lockImageUnlockedGroups`` stay trainable. ``lockImageFreezeBnStats`` turns BatchNorm into
  FrozenBatchNorm2d (ResNet / timm towers; ViTs have no BatchNorm).
* Built-in text tower: our own lock. open_clip 3.3.0's ``lock_text_tower`` asserts
  ``freeze_layer_norm`` and so crashes on the TrainJob default (lockTextFreezeLayerNorm:
  false). The groups are open_clip's: [token + positional embedding (+ cls)], blocks[0..L-2],
  [last block + ln_final], [text_projection]; the last ``lockTextUnlockedLayers`` groups stay
  trainable (1 = the projection only). With ``lockTextFreezeLayerNorm: false`` the LayerNorm
  weights and biases inside the locked groups stay trainable (as open_clip's HF tower does);
  with true they are frozen like every other locked weight.
* Hugging Face text tower: delegated to its own ``lock`` (it honours both LayerNorm values).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..distributed import unwrap as _unwrap
from ..params import Params

__all__ = ["apply_locks", "param_groups", "make_adamw", "lock_builtin_text_tower", "NORM_TYPES"]

#: Modules whose parameters are gains/offsets: never weight-decayed, and what
#: lockTextFreezeLayerNorm refers to.
NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _text_root(model: nn.Module) -> nn.Module:
    """The module holding the text tower: ``model.text`` (CustomTextCLIP) or the CLIP root."""
    return model.text if hasattr(model, "text") and isinstance(model.text, nn.Module) else model


def _is_hf_text(text: nn.Module) -> bool:
    return type(text).__name__ == "HFTextEncoder" or (
        hasattr(text, "transformer") and hasattr(text, "config") and not hasattr(text, "token_embedding"))


def _params(items: Iterable[Any]) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, nn.Parameter):
            out.append(item)
        elif isinstance(item, nn.Module):
            out.extend(item.parameters())
    return out


def _norm_param_ids(modules: Iterable[nn.Module]) -> set[int]:
    ids: set[int] = set()
    for root in modules:
        if root is None or isinstance(root, nn.Parameter):
            continue
        for m in root.modules():
            if isinstance(m, NORM_TYPES):
                ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def lock_builtin_text_tower(model: nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
    """Lock open_clip's built-in text transformer (CLIP root or CustomTextCLIP.text)."""
    text = _text_root(_unwrap(model))
    resblocks = list(text.transformer.resblocks)
    embeddings = [getattr(text, "token_embedding", None), getattr(text, "positional_embedding", None),
                  getattr(text, "cls_emb", None)]
    groups: list[list[Any]] = [embeddings, *([blk] for blk in resblocks[:-1])]
    groups.append([resblocks[-1], getattr(text, "ln_final", None)] if resblocks else [getattr(text, "ln_final", None)])
    extra = [getattr(text, "text_projection", None), getattr(text, "attn_pool", None)]
    if any(e is not None for e in extra):
        groups.append(extra)
    unlocked = groups[len(groups) - min(unlocked_layers, len(groups)):] if unlocked_layers > 0 else []
    locked = groups[:len(groups) - len(unlocked)]

    locked_modules = [m for g in locked for m in g if m is not None]
    norm_ids = _norm_param_ids(locked_modules)
    for p in _params(locked_modules):
        p.requires_grad = (not freeze_layer_norm) and id(p) in norm_ids
    for p in _params(m for g in unlocked for m in g):
        p.requires_grad = True


def _hf_layers(text: nn.Module):
    """(embeddings, encoder layers) of an HF text tower, found by the usual attribute names."""
    tr = text.transformer
    encoder = getattr(tr, "encoder", tr)
    for attr in ("layer", "block", "layers"):
        layers = getattr(encoder, attr, None)
        if isinstance(layers, nn.ModuleList):
            break
    else:
        raise ValueError(f"lockTextUnlockedLayers: cannot find the layers of HF model {type(tr).__name__}")
    embeddings = getattr(tr, "embeddings", None) or getattr(tr, "embed_tokens", None) or tr.get_input_embeddings()
    return embeddings, list(layers)


def lock_hf_text_tower(text: nn.Module, unlocked_layers: int, freeze_layer_norm: bool) -> None:
    """open_clip's HFTextEncoder.lock; for architectures its table lacks (open_clip 3.3.0 has no
    layer list for e.g. BERT and raises KeyError when unlocked_layers > 0) the same rule with
    the layers found by attribute name: freeze [embeddings, *layers][:-n]; "LayerNorm"
    parameters stay trainable unless freeze_layer_norm; the projection always trains."""
    try:
        text.lock(unlocked_layers, freeze_layer_norm)
        return
    except KeyError:
        pass
    embeddings, layers = _hf_layers(text)
    modules = [embeddings, *layers]
    for module in modules[:len(modules) - unlocked_layers]:
        for n, p in module.named_parameters():
            p.requires_grad = (not freeze_layer_norm) if "LayerNorm" in n.split(".") else False


def apply_locks(model: nn.Module, params: Params) -> None:
    """Apply the lockImage* and lockText* parameters to ``model`` (before the optimizer)."""
    m = _unwrap(model)
    if params.lock_image:
        groups = params.lock_image_unlocked_groups
        if type(m.visual).__name__ == "ModifiedResNet" and groups:
            raise ValueError("lockImageUnlockedGroups must be 0 for a ModifiedResNet image tower "
                             "(open_clip can only lock it whole)")
        m.lock_image_tower(unlocked_groups=groups, freeze_bn_stats=params.lock_image_freeze_bn_stats)
    if params.lock_text:
        layers, freeze_ln = params.lock_text_unlocked_layers, params.lock_text_freeze_layer_norm
        text = _text_root(m)
        if text is not m and _is_hf_text(text):
            lock_hf_text_tower(text, layers, freeze_ln)
        else:
            lock_builtin_text_tower(m, layers, freeze_ln)


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    """AdamW groups: decay for weight matrices; none for norms, biases, 1-D params, logit
    scale/bias. Parameters with requires_grad=False are left out entirely."""
    m = _unwrap(model)
    norm_ids = _norm_param_ids([m])
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in m.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (p.ndim < 2 or id(p) in norm_ids or leaf == "bias" or leaf.endswith("_bias")
                or name in ("logit_scale", "logit_bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(wd)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW over ``groups``, fused (one kernel per parameter group instead of ~10
    element-wise passes per tensor) where torch supports it: CPU or CUDA floating-point
    parameters. Same algorithm; on the tiny CPU benchmark model the optimizer step is
    several times faster (BENCHMARKS.md)."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
