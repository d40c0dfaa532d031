"""Checkpoints in ``<output>/checkpoints/``, written atomically.

Two kinds of file:

* ``step_<S>.pt``, resumable, written after optimizer step S: at epoch ends (every
  saveFrequency epochs and after the last), every ``checkpointEvery`` steps or minutes, and
  when the process is asked to stop (SIGTERM). Only the newest ``keepCheckpoints`` are kept::

    {"epoch": N,            # epochs completed
     "epoch_step": K,       # optimizer steps done in epoch N (0 at an epoch end)
     "step": S,             # optimizer steps completed
     "state_dict": ...,     # the open_clip model's own state_dict (no DDP "module." prefix)
     "optimizer": ...,      # AdamW state
     "scaler": ...,         # GradScaler state (precision amp on CUDA only)
     "eval_before": {...},  # each eval set's metrics of the starting model, so a resumed run reports them
     "checkpoints": [...],  # the files of this run kept so far (uri, epoch, step, time)
     "seconds": T,          # the run's time up to this checkpoint, over its invocations
     "run": {"uid", "name", "inputs"},  # which run wrote it (see run_identity)
     "name": ..., "model": ..., "kontrast_version": ...}

* ``epoch_<N>.pt``, model only, at the epoch ends of saveFrequency and after the last;
  always kept. The same keys without optimizer, scaler and progress.

Both are plain dicts (safe for ``torch.load(weights_only=True)``) that
``open_clip.create_model_and_transforms(model, pretrained="<...>.pt")`` reads (its
``state_dict`` key; with the same architecture flags the run used: forceCustomText,
forceQuickGELU, contextLength, and ``init_logit_bias`` for SigLIP-style training).

Resume: the newest resumable checkpoint that loads wins. Files are only ever published
complete (storage.write_atomic), but a file that still fails to load (e.g. damaged later) is
skipped with a warning and the next older one is tried. A checkpoint written by another run
(another TrainJob uid, or other training inputs) is refused: continuing it would silently
train someone else's model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any, Mapping, Optional

import torch

from .. import storage
from ..errors import PermanentError
from ..layout import OutputFolder

log = logging.getLogger(__name__)

_RESUMABLE = re.compile(r"^step_(\d+)\.pt$")

#: The spec fields that decide the trained weights, hashed into a checkpoint's run identity
#: (with the global batch, which replaces batchSize, accumFreq and the world size: a run may
#: resume on another number of processes or with other accumulation as long as the global
#: batch stays). Where outputs go, how often to save, data-loader workers and memory knobs
#: that leave the maths unchanged are left out, and so are fields added later unless listed
#: here, so a kontrast upgrade does not orphan a run's checkpoints.
IDENTITY_FIELDS = (
    "model", "pretrained", "trainData", "leftKeys", "leftWeights", "rightKeys", "rightWeights", "weightKey",
    "epochs", "lr", "lrScheduler", "lrCooldownPower", "epochsCooldown", "warmup", "skipScheduler", "seed",
    "beta1", "beta2", "eps", "wd", "gradClipNorm", "weightedLoss", "logitScale", "logitBias", "precision",
    "contextLength", "forceCustomText", "forceQuickGELU", "forcePatchDropout", "imageMean", "imageStd",
    "poolingMethod", "frozenRight", "lockImage", "lockImageFreezeBnStats", "lockImageUnlockedGroups",
    "lockText", "lockTextFreezeLayerNorm", "lockTextUnlockedLayers",
)
#: Inputs added in identity version 2: which rows are the same query or document (in-batch
#: positives) and which rows are dropped for bad images. A checkpoint written before them
#: (no "version") is compared with the version-1 hash, so an upgrade does not orphan it.
ADDED_IN_2 = ("queryIdKey", "docIdKey", "data.onBadImage", "data.maxBadFraction")
IDENTITY_VERSION = 2
#: Training inputs added after checkpoints existed: in the hash only when set, so the
#: checkpoints of runs that never set them keep their identity.
IDENTITY_FIELDS_WHEN_SET = ("matryoshkaDims", "hardNegatives")


def resumable_location(output: str, step: int) -> str:
    return OutputFolder(output).resumable(step)


def model_location(output: str, epoch: int) -> str:
    return OutputFolder(output).epoch_model(epoch)


def list_resumable(output: str) -> list[tuple[int, str]]:
    """(step, location) of every published resumable checkpoint, oldest first."""
    folder = OutputFolder(output).checkpoints
    found = []
    for name in storage.list_names(folder):
        m = _RESUMABLE.match(name)
        if m:
            found.append((int(m.group(1)), storage.join(folder, name)))
    return sorted(found)


def save_resumable(output: str, payload: dict[str, Any]) -> str:
    """Publish ``payload`` as step_<payload['step']>.pt; returns its location."""
    location = resumable_location(output, int(payload["step"]))
    _write(location, payload)
    return location


def save_model(output: str, payload: dict[str, Any]) -> str:
    """Publish the model-only epoch_<payload['epoch']>.pt; returns its location."""
    location = model_location(output, int(payload["epoch"]))
    _write(location, payload)
    return location


def _write(location: str, payload: dict[str, Any]) -> None:
    """A full output volume is permanent: every restart would resume and fail at the same save."""
    try:
        storage.write_atomic(location, lambda f: torch.save(payload, f))
    except storage.NoSpace as exc:
        raise PermanentError(
            f"output volume full: writing {location} needs more than the {exc.written} bytes written before "
            f"the volume filled up, and {exc.free} bytes are free beside the other files. A resumable checkpoint is published before "
            "the oldest one beyond keepCheckpoints is deleted, so the volume needs room for keepCheckpoints + 1 "
            "of them (and the model-only epoch files): give it more space or lower keepCheckpoints") from None


def prune(output: str, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest resumable checkpoints; returns what was deleted."""
    old = [location for _, location in list_resumable(output)[:-keep]]
    for location in old:
        storage.delete(location)
    return old


def remove_temporaries(output: str) -> None:
    """Delete what a killed run was writing into ``output``'s folders (its checkpoints first)."""
    folder = OutputFolder(output)
    removed = [path for place in (folder.checkpoints, folder.root, folder.model, folder.plots)
               for path in storage.remove_temporaries(place)]
    if removed:
        log.warning("removed %d temporary file(s) a stopped run left behind: %s", len(removed), ", ".join(removed))


def load_checkpoint_file(location: str, map_location: Any = "cpu") -> dict[str, Any]:
    with storage.open_read(location) as f:
        obj = torch.load(f, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or "state_dict" not in obj or "epoch" not in obj:
        raise ValueError("not a kontrast training checkpoint (no epoch/state_dict)")
    return obj


def load_latest(output: str, map_location: Any = "cpu") -> Optional[tuple[dict[str, Any], str]]:
    """The newest loadable resumable checkpoint in ``output`` and its location, or None."""
    for _, location in reversed(list_resumable(output)):
        try:
            return load_checkpoint_file(location, map_location), location
        except Exception as exc:
            log.warning("skipping checkpoint %s: cannot load it (%s)", location, exc)
    return None


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def inputs_hash(spec: Mapping[str, Any], global_batch: int, version: int = IDENTITY_VERSION) -> str:
    """sha256 of the training inputs (IDENTITY_FIELDS as written, and the global batch; from
    ``version`` 2 also ADDED_IN_2)."""
    inputs = {key: spec.get(key) for key in IDENTITY_FIELDS}
    inputs.update({key: spec[key] for key in IDENTITY_FIELDS_WHEN_SET if spec.get(key) is not None})
    inputs["globalBatchSize"] = int(global_batch)
    if version >= 2:
        data = spec.get("data") or {}
        inputs.update({key: spec.get(key) for key in ADDED_IN_2 if "." not in key})
        inputs.update({key: data.get(key.split(".", 1)[1]) for key in ADDED_IN_2 if key.startswith("data.")})
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()


def run_identity(name: str, uid: Optional[str], spec: Mapping[str, Any], global_batch: int) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (and, to check a checkpoint of an
    older kontrast, the hash it would have written)."""
    return {"name": name, "uid": uid, "inputs": inputs_hash(spec, global_batch), "version": IDENTITY_VERSION,
            "inputs_v1": inputs_hash(spec, global_batch, version=1)}


def check_identity(recorded: Optional[Mapping[str, Any]], current: Mapping[str, Any], location: str) -> None:
    """Refuse (PermanentError) a checkpoint another run wrote: another TrainJob uid (when both
    have one; local runs have none) or other training inputs (compared as the kontrast that
    wrote it hashed them)."""
    if not recorded:
        log.warning("checkpoint %s does not record which run wrote it (an older kontrast); resuming it", location)
        return
    expected = current["inputs"] if recorded.get("version", 1) >= 2 else current["inputs_v1"]
    other_uid = recorded.get("uid") and current.get("uid") and recorded["uid"] != current["uid"]
    if other_uid or recorded.get("inputs") != expected:
        raise PermanentError(
            f"{location} was written by another run: {_describe(recorded)}; this run is {_describe(current)}. "
            "Resuming would continue another run's training: give this TrainJob a new output, or delete "
            "the old checkpoints to start over")


def _describe(identity: Mapping[str, Any]) -> str:
    return (f"TrainJob {identity.get('name')!r} (uid {identity.get('uid') or 'none: a local run'}, "
            f"training inputs {str(identity.get('inputs'))[:12]})")
