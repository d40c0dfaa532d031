"""Where a model comes from: an open_clip model config JSON given by path or URL, and the
pretrained weights (a tag, a file, or a URL downloaded once per machine).

``model`` may be the path or URL of an open_clip model config JSON (e.g. a tiny
architecture for CPU runs). It is registered with ``open_clip.add_model_config`` under its
file stem, which is also the name to use when loading a checkpoint later::

    open_clip.add_model_config("tiny-vit.json")
    open_clip.create_model_and_transforms("tiny-vit", pretrained="epoch_3.pt")

Relative ``hf_model_name`` / ``hf_tokenizer_name`` folders in such a JSON are resolved
against the JSON's folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Optional

import open_clip
import torch

from .. import storage
from ..errors import SpecError
from ..locations import has_scheme
from ..spec import Resolved

log = logging.getLogger(__name__)

_registered_dir: Optional[Path] = None


def _read_text(location: str) -> str:
    if has_scheme(location):
        import fsspec

        with fsspec.open(location, "rt", encoding="utf-8") as f:
            return f.read()
    return Path(location).read_text(encoding="utf-8")


def register_model_config(location: str) -> str:
    """Register a model config JSON with open_clip; return the name to create it by."""
    global _registered_dir
    try:
        cfg = json.loads(_read_text(location))
    except FileNotFoundError:
        raise SpecError("model", f"model config file not found: {location}") from None
    except (OSError, ValueError) as exc:
        raise SpecError("model", f"cannot read model config {location}: {exc}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise SpecError("model", f"{location} is not an open_clip model config: missing {', '.join(missing)}")
    if not has_scheme(location):
        folder = Path(location).parent
        for key in ("hf_model_name", "hf_tokenizer_name"):
            value = cfg["text_cfg"].get(key)
            if value and not os.path.isabs(value) and (folder / value).exists():
                cfg["text_cfg"][key] = str((folder / value).resolve())
    name = PurePosixPath(location.split("://", 1)[-1]).stem
    builtin = open_clip.factory.get_model_config(name)
    if builtin is not None and builtin != cfg:
        log.warning("model config %s replaces the open_clip architecture of the same name %r", location, name)
    if _registered_dir is None:
        _registered_dir = Path(tempfile.mkdtemp(prefix="kontrast-model-configs-"))
    target = _registered_dir / f"{name}.json"
    target.write_text(json.dumps(cfg))
    open_clip.add_model_config(target)
    return name


def model_name(resolved: Resolved) -> str:
    """The open_clip name of the TrainJob's architecture (registering a JSON config)."""
    if resolved.model_config:
        return register_model_config(resolved.model_config)
    return resolved.params.model


def checkpoint_file(name: str, resolved: Resolved) -> Optional[str]:
    """A local file holding the pretrained weights (downloads a tag only if open_clip would)."""
    params = resolved.params
    if not params.pretrained:
        return None
    if params.pretrained_is_tag:
        cfg = open_clip.get_pretrained_cfg(name, params.pretrained)
        return open_clip.download_pretrained(cfg) if cfg else None
    return params.pretrained


def local_pretrained(resolved: Resolved) -> Optional[str]:
    """open_clip reads ``pretrained`` files with os.path.isfile: copy URLs to a local cache."""
    p = resolved.params.pretrained
    if not p or resolved.params.pretrained_is_tag or not has_scheme(p):
        return p
    return str(cached_download(p, Path(tempfile.gettempdir()) / "kontrast-pretrained"))


def cache_name(url: str) -> str:
    """A cache file name unique to the whole URL (s3://a/model.pt and s3://b/model.pt differ)."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return f"{digest}-{PurePosixPath(url.split('://', 1)[-1]).name or 'model'}"


def cached_download(url: str, cache: Path) -> Path:
    """The file at ``url``, downloaded once per machine into ``cache``.

    The processes of a node share the cache: an exclusive lock on a per-URL lock file lets
    one of them download while the others wait and then find the file. The download goes to
    a private temporary file that is renamed into place, so no reader sees half a file.
    """
    import fcntl

    import fsspec

    cache.mkdir(parents=True, exist_ok=True)
    target = cache / cache_name(url)
    with open(cache / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            with fsspec.open(url, "rb") as src:
                storage.write_atomic(str(target), lambda dst: shutil.copyfileobj(src, dst, 1 << 24), durable=False)
    return target


def checkpoint_has(path: Optional[str], key: str) -> bool:
    if not path:
        return False
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return key in f.keys()
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
        return key in sd or f"module.{key}" in sd
    except Exception:  # an unreadable file fails loudly in open_clip's loader instead
        return False
