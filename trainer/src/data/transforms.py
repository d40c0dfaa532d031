"""Image transforms: open_clip's own, ending in a uint8 tensor (normalised later, on the device).

Batches carry images as uint8 (a quarter of fp32's bytes through worker pipes, pinned
memory and the host-to-device copy); ``normalize_images`` converts them on the device with
the model's mean/std (or imageMean/imageStd).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def uint8_transform(preprocess) -> tuple[Callable, tuple[float, ...], tuple[float, ...]]:
    """open_clip's transform with ``ToTensor`` + ``Normalize`` replaced by ``PILToTensor``
    (uint8, C x H x W); returns it with the Normalize mean and std."""
    from torchvision import transforms as T

    steps, mean, std = [], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    for step in preprocess.transforms:
        if isinstance(step, T.Normalize):
            mean, std = tuple(map(float, step.mean)), tuple(map(float, step.std))
        elif isinstance(step, T.ToTensor):
            steps.append(T.PILToTensor())
        else:
            steps.append(step)
    return T.Compose(steps), mean, std


def image_normalization(preprocess) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of open_clip's transform (the model's, or imageMean/imageStd)."""
    _, mean, std = uint8_transform(preprocess)
    return mean, std


def image_side(preprocess) -> int:
    """The output side of a transform (for decoding JPEGs no smaller than needed)."""
    for step in preprocess.transforms:
        size = getattr(step, "size", None)
        if size is not None:
            return int(max(size) if isinstance(size, (tuple, list)) else size)
    return 224


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, 3, H, W] (on the device) -> normalised floats, as Normalize(ToTensor(x))."""
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return ((images.float() - m) / s).to(dtype)
