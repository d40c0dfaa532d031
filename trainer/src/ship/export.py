"""Export a trained model as the folder open_clip loads with ``local-dir:`` or ``hf-hub:``.

The layout is the one open_clip's own ``push_to_hf_hub`` writes: ``open_clip_config.json``
(``model_cfg`` + ``preprocess_cfg``), ``open_clip_model.safetensors`` and, for Hugging Face
tokenizers, the tokenizer files. Nothing is pickled, so the folder loads with weights-only
semantics. Everything the model needs to be rebuilt exactly is in ``model_cfg``: the run's
context length, QuickGELU, a custom text tower and a logit bias (SigLIP-style runs), which a
bare ``epoch_N.pt`` leaves to the user to pass again.

The config is computed at training time (``open_clip_config``) and stored in every
checkpoint, so ``kontrast export CHECKPOINT OUT`` needs nothing else. A ``README.md`` model
card beside it records the data, the parameters and the metrics of the run (``model_card``).
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME

from .. import storage
from ..layout import OutputFolder
from ..locations import has_scheme
from .model_card import model_card
from .run_files import read_run

log = logging.getLogger(__name__)

#: The checkpoint key holding the config (see run/checkpoint.py).
CONFIG_KEY = "open_clip_config"


def open_clip_config(model: torch.nn.Module, model_cfg: dict[str, Any], params: Any,
                     tokenizer: Any = None) -> dict[str, Any]:
    """``{"model_cfg", "preprocess_cfg"}`` that rebuild ``model`` (built from ``model_cfg``
    with the run's ``Params``) and its evaluation transforms through open_clip's factory."""
    cfg = copy.deepcopy(model_cfg)
    text_cfg = cfg["text_cfg"]
    fed = tokens_fed(tokenizer, params.context_length)
    # A built-in tower's context length is its positional embedding (loading into a different
    # one would interpolate it); an HF tower's only sets the tokenizer's length.
    hf = "hf_model_name" in text_cfg
    text_cfg["context_length"] = fed if hf else int(getattr(model, "context_length", None) or fed)
    text_cfg.pop("hf_model_pretrained", None)      # the factory decides; weights come from the file
    cfg.get("vision_cfg", {}).pop("patch_dropout", None)   # a training-only setting
    if params.force_quick_gelu:
        cfg["quick_gelu"] = True
    if params.force_custom_text:
        cfg["custom_text"] = True
    if getattr(model, "logit_bias", None) is not None:
        # Only the parameter's existence matters: its trained value is in the weights.
        cfg["init_logit_bias"] = float(model.logit_bias.detach().float().reshape(-1)[0])
    pooler = getattr(getattr(model, "text", None), "pooler", None)
    if pooler is not None and "hf_model_name" in text_cfg:
        from ..model.text import POOLERS, pooling_name

        text_cfg["hf_pooler_type"] = POOLERS.get(pooling_name(pooler), text_cfg.get("hf_pooler_type"))
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    preprocess = {
        "size": pp.get("size", model.visual.image_size),
        "mean": list(pp.get("mean", model.visual.image_mean)),
        "std": list(pp.get("std", model.visual.image_std)),
        "interpolation": pp.get("interpolation", "bicubic"),
        "resize_mode": pp.get("resize_mode", "shortest"),
        # Read by people, ignored by open_clip's merge (it takes the text_cfg's):
        "context_length": fed,
        "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
    }
    if isinstance(preprocess["size"], (tuple, list)):
        preprocess["size"] = list(preprocess["size"])
    return {"model_cfg": cfg, "preprocess_cfg": preprocess}


def tokens_fed(tokenizer: Any, default: int) -> int:
    """How many tokens training fed per text: a capped tokenizer's cap, else its context length."""
    return int(getattr(tokenizer, "cap", None) or getattr(tokenizer, "context_length", None) or default)


def _weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous, unshared CPU tensors without a DDP prefix (what safetensors accepts)."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def write_model_folder(folder: Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any],
                       card: Optional[str] = None) -> Path:
    """Write config, safetensors weights, HF tokenizer files and the card into a local folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(_weights(state_dict), str(folder / HF_SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / HF_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    hf_tokenizer = config["model_cfg"]["text_cfg"].get("hf_tokenizer_name")
    if hf_tokenizer:
        # open_clip's get_tokenizer("local-dir:...") reads HF tokenizer files from the folder.
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(hf_tokenizer).save_pretrained(folder)
    if card is not None:
        (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def _publish(local: Path, target: str) -> None:
    """Copy a local folder's files to ``target`` (a path or an fsspec URL), each atomically."""
    for path in sorted(local.iterdir()):
        if path.is_file():
            data = path.read_bytes()
            storage.write_atomic(storage.join(target, path.name), lambda f, data=data: f.write(data))


def load_checkpoint_for_export(location: str) -> dict[str, Any]:
    with storage.open_read(location) as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    if CONFIG_KEY not in state:
        raise ValueError(f"{location} has no {CONFIG_KEY!r}: it was written by an older kontrast; "
                         "re-run the epoch (or train again) to export it")
    return state


def export_checkpoint(checkpoint: str, out: str, *, run_output: Optional[str] = None) -> str:
    """Export ``checkpoint`` (an epoch_N.pt) into the model folder ``out``; returns ``out``.

    The card reads the run's summary.json and progress.jsonl from ``run_output`` (default:
    the folder above ``checkpoints/``), when they are there.
    """
    state = load_checkpoint_for_export(checkpoint)
    if run_output is None:
        run_output = _run_output_of(checkpoint)
    run = read_run(run_output) if run_output else None
    card = model_card(state[CONFIG_KEY], run, checkpoint=checkpoint_name(checkpoint, run_output),
                      epoch=state.get("epoch"))
    if has_scheme(out):
        with tempfile.TemporaryDirectory(prefix="kontrast-export-") as tmp:
            write_model_folder(Path(tmp), state["state_dict"], state[CONFIG_KEY], card)
            _publish(Path(tmp), out)
    else:
        write_model_folder(Path(out), state["state_dict"], state[CONFIG_KEY], card)
    log.info("exported %s (epoch %s) to %s", checkpoint, state.get("epoch"), out)
    return out


def checkpoint_name(checkpoint: str, run_output: Optional[str]) -> str:
    """How the card names the checkpoint: its URI on an object store, else its path relative to
    the run's output (a path on the machine that trained means nothing to the card's reader)."""
    if has_scheme(checkpoint):
        return checkpoint
    path = Path(checkpoint)
    if run_output and not has_scheme(run_output) and path.is_relative_to(run_output):
        return path.relative_to(run_output).as_posix()
    return path.name


def _run_output_of(checkpoint: str) -> Optional[str]:
    parts = checkpoint.replace("\\", "/").rstrip("/").split("/")
    if len(parts) >= 3 and parts[-2] == OutputFolder.CHECKPOINTS:
        return "/".join(parts[:-2]) or "/"
    return None


def chosen_checkpoint(summary: dict[str, Any]) -> Optional[str]:
    """The checkpoint to ship: the one evaluation picked as best, else the newest."""
    checkpoints = summary.get("checkpoints") or []
    if isinstance(checkpoints, dict):
        best = checkpoints.get("best") or {}
        if best.get("uri"):
            return best["uri"]
        latest = checkpoints.get("latest") or {}
        saved = checkpoints.get("saved") or []
        return latest.get("uri") or (saved[-1]["uri"] if saved else None)
    best = summary.get("best") or {}
    if best.get("uri"):
        return best["uri"]
    return checkpoints[-1]["uri"] if checkpoints else None


def export_run(output: str, summary: dict[str, Any]) -> Optional[str]:
    """End-of-run export into ``<output>/model``; returns its location (None without checkpoints)."""
    checkpoint = chosen_checkpoint(summary)
    if checkpoint is None:
        log.warning("no checkpoint to export")
        return None
    return export_checkpoint(checkpoint, OutputFolder(output).model, run_output=output)
