"""The training rows with their query's mined hard negatives (spec.hardNegatives).

Each item is a ``PairDataset`` row plus the right side of its query's ``perQuery`` negatives,
read from the candidate dataset (trainData's rows, or corpusData's) with the training
transforms and the same per-sample augmentation seeds. Empty slots (a query that mined fewer)
hold a blank document with id -1, which the loss leaves out; every item has the same shape,
so micro-batches, ranks and feature caching see fixed shapes.

The mined lists change only between epochs (``set_negatives``); a loader with persistent
workers must then be restarted (``TrainLoader.close``) so its workers receive the new lists.
"""

from __future__ import annotations

import numpy as np
import torch

from ..mining.negatives import MinedNegatives
from .dataset import PairDataset

#: The batch keys of the negatives: [b, perQuery, ...] each.
NEGATIVE_KEYS = ("neg_image", "neg_right_tokens", "neg_right_weights", "neg_id")


class WithNegatives(torch.utils.data.Dataset):
    """``rows``' items, each with its query's negatives from ``candidates``."""

    def __init__(self, rows: PairDataset, candidates: PairDataset, per_query: int):
        self.rows, self.candidates = rows, candidates
        self.negatives = MinedNegatives.empty(per_query)

    @property
    def ex(self):
        return self.rows.ex

    def set_negatives(self, negatives: MinedNegatives) -> None:
        self.negatives = negatives

    def set_epoch(self, epoch: int) -> None:
        self.rows.set_epoch(epoch)
        self.candidates.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        epoch = key[0] if isinstance(key, tuple) else None
        item = self.rows[key]
        rows, ids = self.negatives.of_query(int(item["left_id"]))
        sides = [self.candidates.right_item(int(r), epoch) if r >= 0 else self._blank() for r in rows]
        item["neg_image"] = torch.stack([s["image"] for s in sides])
        item["neg_right_tokens"] = torch.stack([s["right_tokens"] for s in sides])
        item["neg_right_weights"] = torch.stack([s["right_weights"] for s in sides])
        item["neg_id"] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        return item

    def _blank(self) -> dict[str, torch.Tensor]:
        """An empty slot: a blank image, no text, all field weights 0 (its embedding is 0)."""
        c = self.candidates
        return {"image": c.blank,
                "right_tokens": torch.zeros((len(c.ex.right), c._context_length()), dtype=torch.long),
                "right_weights": torch.zeros(c.ex.right_weights.shape[1], dtype=torch.float32)}


def with_negatives_joined(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, right_tokens, right_weights) of the rows followed by their negatives, flattened:
    one forward call encodes both (DDP needs one forward per backward)."""
    if "neg_id" not in batch:
        return batch["image"], batch["right_tokens"], batch["right_weights"]
    return tuple(torch.cat([batch[key], batch[f"neg_{key}"].flatten(0, 1)])
                 for key in ("image", "right_tokens", "right_weights"))
