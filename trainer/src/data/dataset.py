"""The Dataset: one item per row of a checked file, tokenized texts and the uint8 image.

Augmentations are seeded per sample (``sample_seed``), so the same sample in the same epoch
gets the same crop whatever the number of workers or processes.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..layout import default_cache
from .examples import Examples
from .images import ImageCache
from .transforms import image_side, uint8_transform


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed for augmentation: the same sample in the same epoch gets the same
    crop whatever the number of workers or processes, so runs are reproducible across them."""
    return (((seed * 1_000_003) ^ (epoch * 10_007)) * 1_000_000_007 + index) % (2 ** 63 - 1)


class PairDataset(torch.utils.data.Dataset):
    """Items: tokenized left/right texts, the uint8 image, field weights, row weight, ids.

    An index is a position, or an (epoch, position) pair from ``TrainLoader``: persistent
    workers never see ``set_epoch``, so the epoch travels with the index.
    """

    def __init__(self, examples: Examples, transform: Callable, tokenizer: Callable,
                 image_size: Iterable[int] | int, seed: int = 0, cache: Optional[ImageCache] = None,
                 image_loader: Optional[Callable[[str], Image.Image]] = None):
        self.ex = examples
        self.transform, self.mean, self.std = uint8_transform(transform)
        self.decode_side = image_side(transform)
        self.tokenizer = tokenizer
        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        self.blank = torch.zeros((3, *size), dtype=torch.uint8)
        self.seed = seed
        self.epoch = 0
        self.cache = cache or ImageCache(default_cache())
        self.image_loader = image_loader   #: replaces the cache (tests that paint their images)
        self.image_active = examples.uses_images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ex)

    def _image(self, index: int, epoch: int) -> torch.Tensor:
        location = self.ex.image(index) if self.image_active else None
        if location is None or self.ex.right_weights[index, 0] <= 0:
            return self.blank
        img = (self.image_loader(location) if self.image_loader is not None
               else self.cache.load(location, at_least=self.decode_side))
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed also queues a lazy seed for every
            # accelerator backend, each with a formatted stack trace (0.8 ms, 15% of an item)
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(img)

    def left_item(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "left_tokens": self.tokenizer(self.ex.left_texts(index)),
            "left_weights": torch.from_numpy(np.array(self.ex.left_weights[index])),
        }

    def right_item(self, index: int, epoch: Optional[int] = None) -> dict[str, torch.Tensor]:
        right_texts = self.ex.right_texts(index)
        return {
            "image": self._image(index, self.epoch if epoch is None else epoch),
            "right_tokens": (self.tokenizer(right_texts) if right_texts
                             else torch.zeros((0, self._context_length()), dtype=torch.long)),
            "right_weights": torch.from_numpy(np.array(self.ex.right_weights[index])),
        }

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        ex = self.ex
        return {
            **self.left_item(index),
            **self.right_item(index, epoch),
            "weight": torch.tensor(float(ex.weights[index])),
            "left_id": torch.tensor(int(ex.left_ids[index])),
            "right_id": torch.tensor(int(ex.right_ids[index])),
            "index": torch.tensor(int(index)),
        }

    def _context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate(items)


class SideDataset(torch.utils.data.Dataset):
    """One side ("left" or "right") of chosen rows of a PairDataset (for evaluation, where
    queries need no image and documents no query text)."""

    def __init__(self, pairs: PairDataset, rows: Sequence[int], side: str):
        if side not in ("left", "right"):
            raise ValueError(side)
        # a numpy array, not a list: a corpus has millions of rows
        self.pairs, self.rows, self.side = pairs, np.asarray(rows, dtype=np.int64), side

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = int(self.rows[i])
        return self.pairs.left_item(row) if self.side == "left" else self.pairs.right_item(row)
