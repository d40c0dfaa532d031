"""Checkpoints: ``<output>/checkpoints/epoch_<N>.pt``, written atomically, loadable by open_clip.

A checkpoint is a plain dict (safe for ``torch.load(weights_only=True)``)::

    {"epoch": N,            # epochs completed
     "step": S,             # optimizer steps completed
     "state_dict": ...,     # the open_clip model's own state_dict (no DDP "module." prefix)
     "optimizer": ...,      # AdamW state
     "scaler": ...,         # GradScaler state (precision amp on CUDA only)
     "eval_before": {...},  # metrics of the starting model, so a resumed run still reports them
     "name": ..., "model": ..., "kontrast_version": ...}

``open_clip.create_model_and_transforms(model, pretrained="<...>/epoch_N.pt")`` reads the
``state_dict`` key (with the same architecture flags the run used: forceCustomText,
forceQuickGELU, contextLength, and ``init_logit_bias`` for SigLIP-style training).

Resume: the newest checkpoint that loads wins. Files are only ever published complete
(storage.write_atomic), but a file that still fails to load (e.g. damaged later) is
skipped with a warning and the next older one is tried.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import torch

from . import storage

log = logging.getLogger(__name__)

_NAME = re.compile(r"^epoch_(\d+)\.pt$")


def checkpoint_dir(output: str) -> str:
    return storage.join(output, "checkpoints")


def checkpoint_location(output: str, epoch: int) -> str:
    return storage.join(checkpoint_dir(output), f"epoch_{epoch}.pt")


def list_checkpoints(output: str) -> list[tuple[int, str]]:
    """(epoch, location) of every published checkpoint, oldest first."""
    folder = checkpoint_dir(output)
    found = []
    for name in storage.list_names(folder):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), storage.join(folder, name)))
    return sorted(found)


def save_checkpoint(output: str, payload: dict[str, Any]) -> str:
    """Publish ``payload`` as epoch_<payload['epoch']>.pt; returns its location."""
    location = checkpoint_location(output, int(payload["epoch"]))
    storage.write_atomic(location, lambda f: torch.save(payload, f))
    return location


def load_checkpoint_file(location: str, map_location: Any = "cpu") -> dict[str, Any]:
    with storage.open_read(location) as f:
        obj = torch.load(f, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or "state_dict" not in obj or "epoch" not in obj:
        raise ValueError("not a kontrast training checkpoint (no epoch/state_dict)")
    return obj


def load_latest(output: str, map_location: Any = "cpu") -> Optional[tuple[dict[str, Any], str]]:
    """The newest loadable checkpoint in ``output`` and its location, or None."""
    for epoch, location in reversed(list_checkpoints(output)):
        try:
            return load_checkpoint_file(location, map_location), location
        except Exception as exc:
            log.warning("skipping checkpoint %s: cannot load it (%s)", location, exc)
    return None


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict
