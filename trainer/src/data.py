"""From a checked table to batches on the device: loading with the image prefetch, the
Dataset, uint8 transforms, the DataLoader and the normalisation on the device.

The table itself (reading, checks, ids, the node-shared memory-mapped file) is in
``table.py``; fetching, caching and checking images is in ``images.py``.

Batches carry images as uint8 (a quarter of fp32's bytes through worker pipes, pinned
memory and the host-to-device copy); ``normalize_images`` converts them on the device with
the model's mean/std (or imageMean/imageStd). One DataLoader serves the whole run with
persistent workers: each epoch hands it new batches of (epoch, index) pairs, so workers
keep their state (the mapped table, the open cache) and still seed augmentations per epoch.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from .errors import DataError, ProblemCollector
from .images import BadImageReport, ImageCache, Policy, prefetch, problems_of, too_many
from .params import Params
from .table import (Columns, Examples, StringColumn, default_cache, load_examples, parse_examples, parse_table,
                    with_lines)

__all__ = ["Examples", "PairDataset", "SideDataset", "TrainLoader", "collate", "load_data", "load_corpus",
           "load_examples",
           "parse_table", "parse_examples", "normalize_images", "image_normalization", "uint8_transform",
           "cache_folder", "load_image"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# settings beside the table

def cache_folder(params: Params) -> str:
    """data.cache, else $KONTRAST_CACHE, else ~/.cache/kontrast."""
    return params.data.get("cache") or default_cache()


# --------------------------------------------------------------------------------------------
# loading: table check (once per node) + image prefetch (once per node) + the bad-image policy

def _local_share() -> tuple[int, int]:
    """(this process's index, processes) on its node: each node's cache gets every image once."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _gather(items: list) -> list:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]
    return items


def load_data(location: str, params: Params, *, require_positive_weight: bool,
              progress: bool = False, columns: Optional[Columns] = None) -> tuple[Examples, BadImageReport]:
    """Check one data file and prefetch its images; every rank raises the same DataError if
    anything is wrong, or drops the same rows under ``data.onBadImage: skip``. ``columns``
    defaults to the TrainJob's pairs (``Columns.corpus_of`` for a corpus)."""
    cache = cache_folder(params)
    examples = load_examples(location, params, cache=cache, require_positive_weight=require_positive_weight,
                             columns=columns)
    images, first_rows = examples.used_images()
    part, parts = _local_share()
    mine = np.arange(part, len(images), parts)
    # cells read lazily (StringColumn): a corpus of millions of images is never a list of them
    bad = prefetch(ImageCache(cache), StringColumn(images, mine), first_rows[mine], progress=progress,
                   label=location.rsplit("/", 1)[-1])
    bad = sorted({b.location: b for b in _gather(bad)}.values(), key=lambda b: b.row)
    report = BadImageReport(location, len(images), bad=bad)
    if bad:
        examples = _apply_policy(examples, report, Policy.of(params))
    if examples.uses_images:
        queries = f"{_distinct(examples.left_ids)} distinct queries, " if examples.left_ids is not None else ""
        log.info("%s: %d rows, %s%d distinct documents; checked all %d distinct images",
                 location, len(examples), queries, _distinct(examples.right_ids), len(images))
    else:
        log.info("%s: %d rows; the image field has weight 0, so no image is read or checked", location,
                 len(examples))
    return examples, report


def load_corpus(params: Params, *, progress: bool = False) -> tuple[Optional[Examples], Optional[BadImageReport]]:
    """The checked corpus (corpusData: documents only) with its image report; (None, None) without one."""
    if not params.corpus_data:
        return None, None
    return load_data(params.corpus_data, params, require_positive_weight=False, progress=progress,
                     columns=Columns.corpus_of(params))


def _distinct(ids: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(ids))) if len(ids) else 0


def _apply_policy(examples: Examples, report: BadImageReport, policy: Policy) -> Examples:
    column = examples.right_keys[0]
    why = too_many(len(report.bad), report.checked, policy)
    if why is not None and policy.on_bad != "skip":
        collector = ProblemCollector(20)
        for p in with_lines(examples.file, problems_of(report.bad, examples.file, column)):
            collector.add(p)
        collector.raise_if_any()
    if why is not None:
        raise DataError([_fraction_problem(examples.file, column, why, report)])
    dropped = examples.rows_using([b.row for b in report.bad])
    report.skipped_rows = len(dropped)
    kept = examples.without(dropped)
    log.warning("%s: skipping %d row(s) that use %d bad image(s) of %d (data.onBadImage: skip); first: %s",
                examples.file, len(dropped), len(report.bad), report.checked,
                "; ".join(f"row {b.row + 1} {b.location}: {b.reason}" for b in report.bad[:5]))
    if not len(kept):
        raise DataError([_fraction_problem(examples.file, column, "every row uses a bad image", report)])
    return kept


def _fraction_problem(file: str, column: str, why: str, report: BadImageReport):
    from .errors import DataProblem

    named = "; ".join(f"row {b.row + 1} {b.location}: {b.reason}" for b in report.bad[:5])
    return DataProblem(file, f"{why}; first bad images: {named}", column=column)


def load_image(location: str, cache: Optional[str] = None) -> Image.Image:
    """One image, through the node's image cache (e.g. for the report's gallery)."""
    return ImageCache(cache or default_cache()).load(location)


# --------------------------------------------------------------------------------------------
# transforms: open_clip's own, ending in a uint8 tensor (normalised later, on the device)

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


# --------------------------------------------------------------------------------------------
# the Dataset

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


# --------------------------------------------------------------------------------------------
# the DataLoader: one for the run, persistent workers, pinned memory on CUDA

class _EpochBatches:
    """The batch sampler of a TrainLoader: the current epoch's batches as (epoch, index) pairs.
    It runs in the main process, so replacing its batches between epochs reaches the workers."""

    def __init__(self):
        self.epoch, self.batches = 0, []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(self.epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class TrainLoader:
    """``loader.epoch(e, batches)`` iterates one epoch's batches (lists of dataset positions)."""

    def __init__(self, dataset: PairDataset, workers: int, pin_memory: bool, prefetch_factor: int = 4):
        self.sampler = _EpochBatches()
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers,
                                                  collate_fn=collate, pin_memory=pin_memory, **extra)

    def epoch(self, epoch: int, batches: Sequence[Sequence[int]]) -> Iterator[dict[str, torch.Tensor]]:
        self.sampler.epoch, self.sampler.batches = epoch, list(batches)
        return iter(self.loader)
