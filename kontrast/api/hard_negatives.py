"""``spec.hardNegatives`` as a typed, frozen object: how the trainer mines hard negatives.

Pure Python (no torch), like ``data.py``: built from a spec the CRD has defaulted
(``apply_defaults``), so every default lives in the CRD and none here;
tests/api/test_hard_negatives.py checks that the fields and the CRD's properties agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

#: ``model``'s value for the starting model (any other value is a checkpoint location).
START_MODEL = "start"


@dataclass(frozen=True)
class HardNegatives:
    """``spec.hardNegatives`` of a defaulted TrainJob."""

    per_query: int          #: negatives each row brings into its batch
    source: str             #: "train" (trainData's documents) or "corpus" (corpusData's)
    model: str              #: START_MODEL, or a checkpoint location (resolved by the trainer)
    margin: float           #: relative margin: drop a candidate above (1 - margin) x the positive's score
    every_epochs: int       #: mine again every this many epochs (0: once, before training)

    #: spec.hardNegatives key -> field ("from" is a Python keyword).
    SPEC_KEYS: ClassVar[Mapping[str, str]] = {
        "perQuery": "per_query", "from": "source", "model": "model", "margin": "margin",
        "everyEpochs": "every_epochs"}

    @property
    def from_start(self) -> bool:
        return self.model == START_MODEL

    def round_of(self, epoch: int) -> int:
        """Which mining serves ``epoch``: 0 before training, then one more every ``every_epochs``."""
        return epoch // self.every_epochs if self.every_epochs else 0

    @classmethod
    def from_spec(cls, spec: Optional[Mapping[str, Any]]) -> Optional["HardNegatives"]:
        """From the CRD-defaulted ``spec.hardNegatives``; None when the field is unset."""
        if spec is None:
            return None
        values = {field: spec.get(key) for key, field in cls.SPEC_KEYS.items()}
        values["margin"] = float(values["margin"])
        return cls(**values)
