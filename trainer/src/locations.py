"""Where a TrainJob's paths and URIs point: local paths, pvc:// claims and fsspec URLs.

Pure functions of a location string, the TrainJob file's folder and the environment
($KONTRAST_PVC_ROOT), the same on every rank.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from kontrast.contract import PVC_ROOT_DEFAULT, PVC_ROOT_ENV

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


def has_scheme(location: str) -> bool:
    """True for URLs such as s3://b/k or https://h/p (fsspec or HTTP), False for paths."""
    return bool(_SCHEME.match(location))


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV, PVC_ROOT_DEFAULT))


def resolve_location(value: str, base_dir: Path) -> str:
    """Where a spec path points, as a local path or an fsspec URL.

    pvc://claim/path maps to $KONTRAST_PVC_ROOT/claim/path (the operator mounts each claim
    there); file:// URLs become paths; other URLs are left to fsspec; relative paths are
    relative to the TrainJob file's folder (so a job runs the same from any working folder).
    """
    if value.startswith("pvc://"):
        rest = value[len("pvc://"):].strip("/")
        if not rest:
            raise ValueError(f"{value!r}: a pvc:// URI needs a claim name (pvc://<claim>/<path>)")
        return str(pvc_root().joinpath(*PurePosixPath(rest).parts))
    if value.startswith("file://"):
        return value[len("file://"):] or "/"
    if has_scheme(value):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return str(path)


def join_location(base: str, relative: str) -> str:
    """``relative`` resolved against the folder ``base`` (a local path or a URL)."""
    if has_scheme(relative) or relative.startswith("pvc://"):
        return resolve_location(relative, Path("/"))
    if relative.startswith("file://"):
        return relative[len("file://"):]
    if has_scheme(base):
        if relative.startswith("/"):
            scheme, _, rest = base.partition("://")
            host = rest.split("/", 1)[0]
            return f"{scheme}://{host}{relative}"
        return base.rstrip("/") + "/" + relative
    path = Path(relative).expanduser()
    return str(path if path.is_absolute() else Path(base) / path)


def parent_location(location: str) -> str:
    """The folder of a file location (path or URL)."""
    if has_scheme(location):
        return location.rsplit("/", 1)[0]
    return str(Path(location).parent)


def looks_like_path(value: str, base_dir: Path) -> bool:
    """Whether ``pretrained`` names a file (path/URI) rather than an open_clip tag."""
    if value.startswith(("pvc://", "file://", "/", "./", "../", "~")) or has_scheme(value):
        return True
    if value.lower().endswith(_CHECKPOINT_SUFFIXES):
        return True
    return (base_dir / value).exists()
