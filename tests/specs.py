"""Parameters for unit tests that need a few fields of the table: the rest from the CRD."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from kontrast.trainer.params import Params

#: The required fields of a spec, with placeholder values.
MINIMAL = {"model": "ViT-B-32", "trainData": "/data/train.csv", "output": "/out", "leftKeys": ["query"],
           "leftWeights": [1.0], "rightKeys": ["image"], "rightWeights": [1.0], "weightKey": "score"}


def params_of(spec: Mapping[str, Any]) -> Params:
    """``Params`` of MINIMAL updated with ``spec`` (camelCase fields), defaults from the CRD."""
    return Params.from_spec({**MINIMAL, **spec}, Path("/"))
