"""Read TrainJob files (the thin I/O edge of the API package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .defaults import apply_defaults
from .schema import KIND
from .validation import TrainJobInvalid, validate


def read_trainjob(path: str | Path) -> Any:
    """Parse the one TrainJob of a YAML file.

    A file may hold other objects beside it (examples/cluster-cpu.yaml puts the data volume's
    PersistentVolumeClaim first, as `kubectl apply -f` takes it), so several documents are
    fine as long as exactly one of them is a TrainJob.
    """
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except FileNotFoundError:
        raise TrainJobInvalid([f"file not found: {path}"], str(path)) from None
    except yaml.YAMLError as exc:
        raise TrainJobInvalid([f"not valid YAML: {exc}"], str(path)) from None
    if len(docs) == 1:
        return docs[0]
    trainjobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(trainjobs) != 1:
        raise TrainJobInvalid([f"expected exactly one TrainJob, found {len(trainjobs)} among {len(docs)} "
                               "YAML documents"], str(path))
    return trainjobs[0]


def load_trainjob(path: str | Path) -> dict[str, Any]:
    """Read, default and validate a TrainJob; raise TrainJobInvalid listing every problem."""
    obj = read_trainjob(path)
    defaulted = apply_defaults(obj) if isinstance(obj, dict) else obj
    problems = validate(defaulted)
    if problems:
        raise TrainJobInvalid(problems, str(path))
    return defaulted
