"""Build the open_clip model, transforms and tokenizer a TrainJob asks for.

Everything goes through open_clip's own factory (``create_model_and_transforms``,
``get_tokenizer``), so checkpoints stay loadable by open_clip. What this module adds:

* ``model`` may be the path or URL of an open_clip model config JSON (e.g. a tiny
  architecture for CPU runs). It is registered with ``open_clip.add_model_config`` under its
  file stem, which is also the name to use when loading a checkpoint later::

      open_clip.add_model_config("tiny-vit.json")
      open_clip.create_model_and_transforms("tiny-vit", pretrained="epoch_3.pt")

  Relative ``hf_model_name`` / ``hf_tokenizer_name`` folders in such a JSON are resolved
  against the JSON's folder.
* ``poolingMethod`` for Hugging Face text towers, with a correct max pooler (open_clip
  3.3.0's ``MaxPooler`` masks the wrong tokens: see ``MaskedMaxPooler``).
* logit scale/bias initialisation: ``logitScale``/``logitBias`` when set, else SigLIP's
  (10, -10) for ``weightedLoss: siglip`` and open_clip's 1/0.07 without bias for ``ce``;
  a pretrained checkpoint's values win unless the spec sets them. For ``ce`` a logit bias
  cannot change the loss (softmax is shift-invariant), so it is frozen.
* HF text towers never download base weights (``pretrained_text=False``): without
  ``pretrained`` the whole model starts from random initialisation, as the table says.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import open_clip
import torch
from torch import nn

from ..errors import SpecError
from ..precision import Precision
from ..locations import has_scheme
from ..spec import Resolved

log = logging.getLogger(__name__)

#: poolingMethod values -> open_clip hf_pooler_type names ("max" is replaced by ours).
POOLERS = {
    "mean": "mean_pooler",
    "cls": "cls_pooler",
    "max": "max_pooler",
    "cls_last_hidden_state": "cls_last_hidden_state_pooler",
}
SIGLIP_INIT_SCALE = 10.0
SIGLIP_INIT_BIAS = -10.0
CLIP_INIT_SCALE = 1.0 / 0.07


class MaskedMaxPooler(nn.Module):
    """Element-wise max over the real (non-padding) tokens of an HF text tower's output.

    open_clip 3.3.0's ``MaxPooler`` calls ``masked_fill(attention_mask, -inf)``: with the long
    mask its text encoder passes it raises, and with a bool mask it fills the *real* tokens, so
    it takes the max over padding. Here padding is filled with the dtype's lowest value.
    """

    cls_token_position = 0  # read by HFTextEncoder only for ClsPooler; kept for symmetry

    def forward(self, x: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = x.last_hidden_state
        pad = ~attention_mask.bool().unsqueeze(-1)
        return hidden.masked_fill(pad, torch.finfo(hidden.dtype).min).max(dim=1).values


def _pooling_name(pooler: nn.Module) -> str:
    from open_clip import hf_model

    if isinstance(pooler, MaskedMaxPooler) or isinstance(pooler, hf_model.MaxPooler):
        return "max"
    if isinstance(pooler, hf_model.ClsLastHiddenStatePooler):
        return "cls_last_hidden_state"
    if isinstance(pooler, hf_model.ClsPooler):
        return "cls"
    if isinstance(pooler, hf_model.MeanPooler):
        return "mean"
    return type(pooler).__name__


@dataclass
class ModelBundle:
    model: nn.Module
    name: str                       #: the name open_clip knows the architecture by
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    image_size: Any
    hf_text: bool
    info: dict = field(default_factory=dict)  #: resolved values for status / summary


# --------------------------------------------------------------------------------------------
# model config JSON by path

_registered_dir: Optional[Path] = None


def _read_text(location: str) -> str:
    if has_scheme(location):
        import fsspec

        with fsspec.open(location, "rt", encoding="utf-8") as f:
            return f.read()
    return Path(location).read_text(encoding="utf-8")


def register_model_config(location: str) -> str:
    """Register a model config JSON with open_clip; return the name to create it by."""
    global _registered_dir
    try:
        cfg = json.loads(_read_text(location))
    except FileNotFoundError:
        raise SpecError("model", f"model config file not found: {location}") from None
    except (OSError, ValueError) as exc:
        raise SpecError("model", f"cannot read model config {location}: {exc}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise SpecError("model", f"{location} is not an open_clip model config: missing {', '.join(missing)}")
    if not has_scheme(location):
        folder = Path(location).parent
        for key in ("hf_model_name", "hf_tokenizer_name"):
            value = cfg["text_cfg"].get(key)
            if value and not os.path.isabs(value) and (folder / value).exists():
                cfg["text_cfg"][key] = str((folder / value).resolve())
    name = PurePosixPath(location.split("://", 1)[-1]).stem
    builtin = open_clip.factory.get_model_config(name)
    if builtin is not None and builtin != cfg:
        log.warning("model config %s replaces the open_clip architecture of the same name %r", location, name)
    if _registered_dir is None:
        _registered_dir = Path(tempfile.mkdtemp(prefix="kontrast-model-configs-"))
    target = _registered_dir / f"{name}.json"
    target.write_text(json.dumps(cfg))
    open_clip.add_model_config(target)
    return name


def model_name(resolved: Resolved) -> str:
    """The open_clip name of the TrainJob's architecture (registering a JSON config)."""
    if resolved.model_config:
        return register_model_config(resolved.model_config)
    return resolved.params.model


# --------------------------------------------------------------------------------------------
# pretrained checkpoint inspection

def _checkpoint_file(name: str, resolved: Resolved) -> Optional[str]:
    """A local file holding the pretrained weights (downloads a tag only if open_clip would)."""
    params = resolved.params
    if not params.pretrained:
        return None
    if params.pretrained_is_tag:
        cfg = open_clip.get_pretrained_cfg(name, params.pretrained)
        return open_clip.download_pretrained(cfg) if cfg else None
    return params.pretrained


def _local_pretrained(resolved: Resolved) -> Optional[str]:
    """open_clip reads ``pretrained`` files with os.path.isfile: copy URLs to a local cache."""
    p = resolved.params.pretrained
    if not p or resolved.params.pretrained_is_tag or not has_scheme(p):
        return p
    return str(cached_download(p, Path(tempfile.gettempdir()) / "kontrast-pretrained"))


def cache_name(url: str) -> str:
    """A cache file name unique to the whole URL (s3://a/model.pt and s3://b/model.pt differ)."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return f"{digest}-{PurePosixPath(url.split('://', 1)[-1]).name or 'model'}"


def cached_download(url: str, cache: Path) -> Path:
    """The file at ``url``, downloaded once per machine into ``cache``.

    The processes of a node share the cache: an exclusive lock on a per-URL lock file lets
    one of them download while the others wait and then find the file. The download goes to
    a private temporary file that is renamed into place, so no reader sees half a file.
    """
    import fcntl

    import fsspec

    cache.mkdir(parents=True, exist_ok=True)
    target = cache / cache_name(url)
    with open(cache / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{target.name}.")
            try:
                with fsspec.open(url, "rb") as src, os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    return target


def _checkpoint_has(path: Optional[str], key: str) -> bool:
    if not path:
        return False
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return key in f.keys()
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
        return key in sd or f"module.{key}" in sd
    except Exception:  # an unreadable file fails loudly in open_clip's loader instead
        return False


# --------------------------------------------------------------------------------------------

class CappedTokenizer:
    """Keeps at most ``cap`` tokens of each text and pads them to the tower's full width.

    open_clip's CLIP text tower adds its whole positional embedding, so every token tensor
    must have the native width; the tokens past ``cap`` are padding, exactly what open_clip
    feeds for a text that short.
    """

    def __init__(self, native: Any, cap: int):
        self.native, self.cap = native, cap
        self.context_length = native.context_length
        inner = getattr(native, "tokenizer", None)
        self.pad_id = int(getattr(inner, "pad_token_id", None) or 0)

    def __call__(self, texts, context_length: Optional[int] = None) -> torch.Tensor:
        tokens = self.native(texts, context_length=self.cap)
        pad = self.context_length - tokens.shape[1]
        return torch.nn.functional.pad(tokens, (0, pad), value=self.pad_id)


def fed_context_length(asked: int, native: int, pretrained: bool) -> tuple[int, Optional[str]]:
    """Tokens fed to the text tower, and a warning when ``contextLength`` asks for more than a
    pretrained tower has positions for.

    A pretrained tower keeps its positional embedding as trained (resizing it would
    interpolate the embedding and change the starting model), so ``contextLength`` only caps
    the tokens fed to it. A randomly initialised model is built with ``contextLength``
    positions, so there the two are equal.
    """
    if not pretrained or asked <= native:
        return asked, None
    return native, (f"contextLength={asked} exceeds the pretrained text tower's {native} positions; "
                    f"feeding at most {native} tokens (the tower is never resized)")


def build_model(resolved: Resolved, precision: Precision, device: torch.device | str = "cpu") -> ModelBundle:
    """open_clip model + transforms + tokenizer for a resolved TrainJob.

    Call after seeding: with random initialisation the weights come from the global RNG.
    """
    params = resolved.params
    name = model_name(resolved)
    siglip = params.weighted_loss == "siglip"
    cfg = open_clip.factory.get_model_config(name)
    if cfg is None and name not in open_clip.list_models():
        raise SpecError("model", f"unknown open_clip architecture {name!r}; give a built-in name "
                                 "(see open_clip.list_models()), hf-hub:org/name, or a model config JSON path")
    hf_text = bool(cfg and cfg.get("text_cfg", {}).get("hf_model_name"))

    kwargs: dict[str, Any] = {}
    if params.logit_scale is not None:
        kwargs["init_logit_scale"] = math.log(params.logit_scale)
    elif siglip:
        kwargs["init_logit_scale"] = math.log(SIGLIP_INIT_SCALE)
    if params.logit_bias is not None:
        kwargs["init_logit_bias"] = float(params.logit_bias)
    elif siglip:
        kwargs["init_logit_bias"] = SIGLIP_INIT_BIAS

    pooling = params.pooling_method
    if pooling and not hf_text:
        log.warning("poolingMethod=%s is ignored: %s has a built-in text tower (poolingMethod applies to "
                    "Hugging Face text towers)", pooling, name)
    if pooling and hf_text:
        text_cfg = copy.deepcopy(cfg["text_cfg"])
        if not params.pretrained:
            text_cfg["context_length"] = params.context_length
        text_cfg["hf_model_pretrained"] = False
        # open_clip's max_pooler is broken; build with the mean pooler and swap ours in below.
        text_cfg["hf_pooler_type"] = "mean_pooler" if pooling == "max" else POOLERS[pooling]
        kwargs["text_cfg"] = text_cfg

    pretrained = _local_pretrained(resolved)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name,
            pretrained=pretrained,
            precision=precision.model_precision,
            device=device,
            force_quick_gelu=params.force_quick_gelu,
            force_custom_text=params.force_custom_text,
            force_patch_dropout=params.force_patch_dropout,
            force_context_length=None if params.pretrained else params.context_length,
            image_mean=params.image_mean,
            image_std=params.image_std,
            pretrained_text=False,
            output_dict=True,
            **kwargs,
        )
    except RuntimeError as exc:
        if "Pretrained value" in str(exc) or "Failed to download" in str(exc):
            raise SpecError("pretrained", str(exc)) from None
        raise

    if hf_text:
        text = model.text
        if pooling == "max" or isinstance(text.pooler, open_clip.hf_model.MaxPooler):
            text.pooler = MaskedMaxPooler()

    with torch.no_grad():
        if params.pretrained:
            if params.logit_scale is not None:
                model.logit_scale.fill_(math.log(params.logit_scale))
            if model.logit_bias is not None:
                if params.logit_bias is not None:
                    model.logit_bias.fill_(float(params.logit_bias))
                elif siglip and not _checkpoint_has(_checkpoint_file(name, resolved), "logit_bias"):
                    # open_clip inserts 0 for a checkpoint without a bias (its issue #712).
                    model.logit_bias.fill_(SIGLIP_INIT_BIAS)
    if not siglip and model.logit_bias is not None:
        if params.logit_bias is not None:
            log.warning("logitBias has no effect with weightedLoss ce (softmax ignores a constant shift)")
        model.logit_bias.requires_grad_(False)

    if params.grad_checkpointing:
        # Only when enabled: HF towers' set_grad_checkpointing ignores its argument.
        model.set_grad_checkpointing(True)

    tokens, warning = fed_context_length(params.context_length, model.context_length, bool(params.pretrained))
    if warning:
        log.warning(warning)
    native = open_clip.get_tokenizer(name, context_length=model.context_length)
    tokenizer = native if tokens == model.context_length else CappedTokenizer(native, tokens)
    info: dict[str, Any] = {
        "contextLength": tokens,
        "warnings": [warning] if warning else None,
        "logitScale": float(model.logit_scale.detach().float().exp().reshape(-1)[0]),
        "logitBias": (float(model.logit_bias.detach().float().reshape(-1)[0])
                      if model.logit_bias is not None and siglip else None),
        "poolingMethod": _pooling_name(model.text.pooler) if hf_text else None,
    }
    return ModelBundle(
        model=model,
        name=name,
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        tokenizer=tokenizer,
        image_size=model.visual.image_size,
        hf_text=hf_text,
        info=info,
    )
