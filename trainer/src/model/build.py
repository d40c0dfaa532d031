"""Build the open_clip model, transforms and tokenizer a TrainJob asks for.

Everything goes through open_clip's own factory (``create_model_and_transforms``,
``get_tokenizer``), so checkpoints stay loadable by open_clip. ``build_model`` reads as its
steps: the architecture (``sources``: a config JSON by path), the logit scale/bias
initialisation, the Hugging Face text config, the create call (with its errors as spec
errors), the repairs open_clip needs (the max pooler, the logit bias), and the tokenizer
(``text``). What it adds to open_clip:

* logit scale/bias initialisation: ``logitScale``/``logitBias`` when set, else SigLIP's
  (10, -10) for ``weightedLoss: siglip`` and open_clip's 1/0.07 without bias for ``ce``;
  a pretrained checkpoint's values win unless the spec sets them. For ``ce`` a logit bias
  cannot change the loss (softmax is shift-invariant), so it is frozen.
* HF text towers never download base weights (``pretrained_text=False``): without
  ``pretrained`` the whole model starts from random initialisation, as the table says.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import open_clip
import torch
from torch import nn

from ..errors import SpecError
from ..params import Params, check_matryoshka_width
from ..precision import Precision
from ..spec import Resolved
from .sources import checkpoint_file, checkpoint_has, local_pretrained, model_name
from .text import CappedTokenizer, MaskedMaxPooler, POOLERS, fed_context_length, pooling_name

log = logging.getLogger(__name__)

SIGLIP_INIT_SCALE = 10.0
SIGLIP_INIT_BIAS = -10.0


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


def build_model(resolved: Resolved, precision: Precision, device: torch.device | str = "cpu") -> ModelBundle:
    """open_clip model + transforms + tokenizer for a resolved TrainJob.

    Call after seeding: with random initialisation the weights come from the global RNG.
    """
    params = resolved.params
    name = model_name(resolved)
    cfg = _architecture(name)
    hf_text = bool(cfg and cfg.get("text_cfg", {}).get("hf_model_name"))
    kwargs = {**_logit_init(params), **_hf_text_config(params, cfg, name, hf_text)}
    model, preprocess_train, preprocess_val = _create(name, resolved, precision, device, kwargs)
    _repair(model, resolved, name, hf_text)
    width = getattr(model.visual, "output_dim", None)   # timm towers have none: the loss checks then
    if width is not None:
        check_matryoshka_width(params.matryoshka_dims, width)
    if params.grad_checkpointing:
        # Only when enabled: HF towers' set_grad_checkpointing ignores its argument.
        model.set_grad_checkpointing(True)
    tokenizer, tokens, warning = _tokenizer(name, model, params)
    return ModelBundle(
        model=model,
        name=name,
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        tokenizer=tokenizer,
        image_size=model.visual.image_size,
        hf_text=hf_text,
        info=_info(model, params, hf_text, tokens, warning),
    )


def _architecture(name: str) -> Optional[dict]:
    """open_clip's config of ``name`` (None for names it builds without one, e.g. hf-hub)."""
    cfg = open_clip.factory.get_model_config(name)
    if cfg is None and name not in open_clip.list_models():
        raise SpecError("model", f"unknown open_clip architecture {name!r}; give a built-in name "
                                 "(see open_clip.list_models()), hf-hub:org/name, or a model config JSON path")
    return cfg


def _logit_init(params: Params) -> dict[str, Any]:
    """The create call's logit scale/bias: the spec's, else SigLIP's for siglip, else open_clip's."""
    siglip = params.weighted_loss == "siglip"
    kwargs: dict[str, Any] = {}
    if params.logit_scale is not None:
        kwargs["init_logit_scale"] = math.log(params.logit_scale)
    elif siglip:
        kwargs["init_logit_scale"] = math.log(SIGLIP_INIT_SCALE)
    if params.logit_bias is not None:
        kwargs["init_logit_bias"] = float(params.logit_bias)
    elif siglip:
        kwargs["init_logit_bias"] = SIGLIP_INIT_BIAS
    return kwargs


def _hf_text_config(params: Params, cfg: Optional[dict], name: str, hf_text: bool) -> dict[str, Any]:
    """The create call's ``text_cfg`` for poolingMethod on a Hugging Face tower (none otherwise)."""
    pooling = params.pooling_method
    if pooling and not hf_text:
        log.warning("poolingMethod=%s is ignored: %s has a built-in text tower (poolingMethod applies to "
                    "Hugging Face text towers)", pooling, name)
    if not (pooling and hf_text):
        return {}
    text_cfg = copy.deepcopy(cfg["text_cfg"])
    if not params.pretrained:
        text_cfg["context_length"] = params.context_length
    text_cfg["hf_model_pretrained"] = False
    # open_clip's max_pooler is broken; build with the mean pooler and swap ours in (_repair).
    text_cfg["hf_pooler_type"] = "mean_pooler" if pooling == "max" else POOLERS[pooling]
    return {"text_cfg": text_cfg}


def _create(name: str, resolved: Resolved, precision: Precision, device, kwargs: dict[str, Any]):
    """open_clip's create_model_and_transforms; a pretrained value it cannot load is a spec error."""
    params = resolved.params
    try:
        return open_clip.create_model_and_transforms(
            name,
            pretrained=local_pretrained(resolved),
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


def _repair(model: nn.Module, resolved: Resolved, name: str, hf_text: bool) -> None:
    """What open_clip leaves wrong: its max pooler, a pretrained model's logit scale/bias when
    the spec sets them (or a SigLIP bias its checkpoint lacks), and a ce run's trainable bias."""
    params = resolved.params
    siglip = params.weighted_loss == "siglip"
    if hf_text:
        text = model.text
        if params.pooling_method == "max" or isinstance(text.pooler, open_clip.hf_model.MaxPooler):
            text.pooler = MaskedMaxPooler()
    with torch.no_grad():
        if params.pretrained:
            if params.logit_scale is not None:
                model.logit_scale.fill_(math.log(params.logit_scale))
            if model.logit_bias is not None:
                if params.logit_bias is not None:
                    model.logit_bias.fill_(float(params.logit_bias))
                elif siglip and not checkpoint_has(checkpoint_file(name, resolved), "logit_bias"):
                    # open_clip inserts 0 for a checkpoint without a bias (its issue #712).
                    model.logit_bias.fill_(SIGLIP_INIT_BIAS)
    if not siglip and model.logit_bias is not None:
        if params.logit_bias is not None:
            log.warning("logitBias has no effect with weightedLoss ce (softmax ignores a constant shift)")
        model.logit_bias.requires_grad_(False)


def _tokenizer(name: str, model: nn.Module, params: Params) -> tuple[Any, int, Optional[str]]:
    """The tokenizer feeding at most contextLength tokens, the tokens it feeds, and a warning
    when a pretrained tower has fewer positions than asked."""
    tokens, warning = fed_context_length(params.context_length, model.context_length, bool(params.pretrained))
    if warning:
        log.warning(warning)
    native = open_clip.get_tokenizer(name, context_length=model.context_length)
    return (native if tokens == model.context_length else CappedTokenizer(native, tokens)), tokens, warning


def _info(model: nn.Module, params: Params, hf_text: bool, tokens: int, warning: Optional[str]) -> dict[str, Any]:
    """The resolved values reported in status.resolved and summary.json."""
    siglip = params.weighted_loss == "siglip"
    return {
        "contextLength": tokens,
        "warnings": [warning] if warning else None,
        "logitScale": float(model.logit_scale.detach().float().exp().reshape(-1)[0]),
        "logitBias": (float(model.logit_bias.detach().float().reshape(-1)[0])
                      if model.logit_bias is not None and siglip else None),
        "poolingMethod": pooling_name(model.text.pooler) if hf_text else None,
    }
