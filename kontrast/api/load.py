"""Read TrainJob files (the thin I/O edge of the API package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .defaults import apply_defaults
from .validation import TrainJobInvalid, validate


def read_trainjob(path: str | Path) -> Any:
    """Parse one YAML document; a file with several documents or bad YAML is an error."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except FileNotFoundError:
        raise TrainJobInvalid([f"file not found: {path}"], str(path)) from None
    except yaml.YAMLError as exc:
        raise TrainJobInvalid([f"not valid YAML: {exc}"], str(path)) from None
    if len(docs) != 1:
        raise TrainJobInvalid([f"expected exactly one YAML document, found {len(docs)}"], str(path))
    return docs[0]


def load_trainjob(path: str | Path) -> dict[str, Any]:
    """Read, default and validate a TrainJob; raise TrainJobInvalid listing every problem."""
    obj = read_trainjob(path)
    defaulted = apply_defaults(obj) if isinstance(obj, dict) else obj
    problems = validate(defaulted)
    if problems:
        raise TrainJobInvalid(problems, str(path))
    return defaulted
