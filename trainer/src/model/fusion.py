"""Multi-field embeddings: one vector per side from several weighted fields.

Each field is encoded by the shared open_clip towers (texts by the text tower, the right
side's first field by the image tower) and L2-normalised; the side's embedding is the
weighted sum with the row's renormalised field weights, normalised again (GCL's rule).
Normalising each field first keeps a field's influence equal to its weight whatever its
raw norm; normalising the sum puts the result on the unit sphere the loss expects.

A field whose table weight is 0 is never encoded (its row weights are 0 everywhere, so it
cannot change the sum), which also skips the image tower when rightWeights[0] is 0.

``FusedModel`` is the module DDP wraps: its forward does the whole multi-field encoding, so
DDP sees every parameter use inside one forward call.

frozenRight (``frozen_copy``). The right (document) side is encoded by a frozen copy of the
starting model: eval mode, requires_grad=False, encoded under no_grad. Only the query path
trains, and document embeddings of the starting model (an existing index) stay valid: at
serving time encode queries with the fine-tuned checkpoint and documents with the starting
model. Memory: one more set of weights (4 bytes per parameter in fp32, 2 in bf16/fp16; about
0.6 GB for ViT-B-32 in fp32), no gradients, no optimizer state and no stored activations for
the right side, which usually saves more activation memory (images) than the copy costs.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import unwrap


def frozen_copy(model: nn.Module) -> nn.Module:
    """A gradient-free, eval-mode copy of the starting model for the right side (frozenRight)."""
    frozen = copy.deepcopy(unwrap(model))
    frozen.eval()
    frozen.requires_grad_(False)
    return frozen


def fuse(field_embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[b, f, d] per-field embeddings (any norm) and [b, f] weights -> [b, d] unit vectors."""
    per_field = F.normalize(field_embeddings, dim=-1)
    summed = (per_field * weights.unsqueeze(-1).to(per_field.dtype)).sum(dim=1)
    return F.normalize(summed, dim=-1)


class FusedModel(nn.Module):
    """Wraps an open_clip model; forward(batch fields) -> fused left/right embeddings.

    ``left_active`` / ``right_active``: which fields have a non-zero table weight.
    ``frozen_right``: encode the right side with a frozen, gradient-free copy of the
    starting model (documents already indexed with it stay valid).
    ``image_norm``: (mean, std) for uint8 image batches, which are normalised here, on the
    device (``data.transforms.normalize_images``; default open_clip's OpenAI mean/std, which models
    without their own use); float images are taken as already normalised.
    """

    def __init__(self, clip: nn.Module, left_active: Sequence[bool], right_active: Sequence[bool],
                 frozen_right: bool = False, input_dtype: Optional[torch.dtype] = None,
                 image_norm: Optional[tuple[Sequence[float], Sequence[float]]] = None):
        super().__init__()
        self.clip = clip
        self.left_idx = [i for i, a in enumerate(left_active) if a]
        self.image_active = bool(right_active[0])
        self.right_text_idx = [i for i, a in enumerate(list(right_active)[1:]) if a]
        self.input_dtype = input_dtype
        self.image_norm = image_norm
        self.right_clip: Optional[nn.Module] = None
        if frozen_right:
            self.right_clip = frozen_copy(clip)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.right_clip is not None:
            self.right_clip.eval()
        return self

    def _text(self, clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """[b, f, ctx] -> [b, f, d] (unnormalised)."""
        b, f, ctx = tokens.shape
        return clip.encode_text(tokens.reshape(b * f, ctx)).reshape(b, f, -1)

    def _image(self, clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            from ..data.transforms import normalize_images

            from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

            images = normalize_images(images, *(self.image_norm or (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)))
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)
        return clip.encode_image(images).unsqueeze(1)

    def encode_left(self, left_tokens: torch.Tensor, left_weights: torch.Tensor) -> torch.Tensor:
        return fuse(self._text(self.clip, left_tokens[:, self.left_idx]), left_weights[:, self.left_idx])

    def encode_right(self, image: torch.Tensor, right_tokens: torch.Tensor,
                     right_weights: torch.Tensor) -> torch.Tensor:
        clip = self.right_clip if self.right_clip is not None else self.clip
        with torch.no_grad() if self.right_clip is not None else contextlib.nullcontext():
            return fuse(*self._right_fields(clip, image, right_tokens, right_weights))

    def _right_fields(self, clip, image, right_tokens, right_weights, text_embeddings=None):
        parts, cols = [], []
        if self.image_active:
            parts.append(self._image(clip, image))
            cols.append(0)
        if self.right_text_idx:
            emb = text_embeddings if text_embeddings is not None else \
                self._text(clip, right_tokens[:, self.right_text_idx])
            parts.append(emb.to(parts[0].dtype) if parts else emb)
            cols += [i + 1 for i in self.right_text_idx]
        return torch.cat(parts, dim=1), right_weights[:, cols]

    def forward(self, left_tokens, left_weights, image, right_tokens, right_weights):
        """Returns (left [b, d], right [b', d], logit_scale (exp'd), logit_bias or None); b' > b
        when the right side also holds mined hard negatives (encoded apart from the left texts)."""
        if self.right_clip is None and self.right_text_idx and left_tokens.shape[0] == right_tokens.shape[0]:
            # One text-tower call for the texts of both sides (bigger matmuls, one pass).
            left_part = left_tokens[:, self.left_idx]
            right_part = right_tokens[:, self.right_text_idx]
            texts = self._text(self.clip, torch.cat([left_part, right_part], dim=1))
            n_left = left_part.shape[1]
            left = fuse(texts[:, :n_left], left_weights[:, self.left_idx])
            right = fuse(*self._right_fields(self.clip, image, right_tokens, right_weights,
                                             text_embeddings=texts[:, n_left:]))
        else:
            left = self.encode_left(left_tokens, left_weights)
            right = self.encode_right(image, right_tokens, right_weights)
        scale = self.clip.logit_scale.exp()
        bias = self.clip.logit_bias
        return left, right, scale, bias

