"""Text towers: ``poolingMethod`` for Hugging Face towers (with a correct max pooler), and the
tokenizer that feeds at most ``contextLength`` tokens.

open_clip 3.3.0's ``MaxPooler`` masks the wrong tokens: see ``MaskedMaxPooler``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

#: poolingMethod values -> open_clip hf_pooler_type names ("max" is replaced by ours).
POOLERS = {
    "mean": "mean_pooler",
    "cls": "cls_pooler",
    "max": "max_pooler",
    "cls_last_hidden_state": "cls_last_hidden_state_pooler",
}


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


def pooling_name(pooler: nn.Module) -> str:
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
