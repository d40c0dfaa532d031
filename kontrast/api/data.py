"""``spec.data`` as a typed, frozen object: how data files and images are read.

Pure Python (no torch), so the operator can read it too. It is built from a spec the CRD
has defaulted (``apply_defaults``): every default lives in the CRD, none here, and
tests/api/test_data_params.py checks that the fields and the CRD's properties agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional


@dataclass(frozen=True)
class Data:
    """``spec.data`` of a defaulted TrainJob."""

    #: Node-local folder for the checked tables and the image cache, as written in the spec;
    #: None when unset ($KONTRAST_CACHE, else ~/.cache/kontrast decide).
    cache: Optional[str]
    #: What a permanently unreadable image does: "fail" stops the run, "skip" drops its rows.
    on_bad_image: str
    #: With on_bad_image "skip": the largest fraction of distinct images that may be bad.
    max_bad_fraction: float

    #: spec.data key -> field.
    SPEC_KEYS: ClassVar[Mapping[str, str]] = {
        "cache": "cache", "onBadImage": "on_bad_image", "maxBadFraction": "max_bad_fraction"}

    @property
    def skips_bad_images(self) -> bool:
        return self.on_bad_image == "skip"

    @classmethod
    def from_spec(cls, data: Mapping[str, Any]) -> "Data":
        """From the CRD-defaulted ``spec.data`` (an unset optional key is None)."""
        values = {field: data.get(key) for key, field in cls.SPEC_KEYS.items()}
        values["max_bad_fraction"] = float(values["max_bad_fraction"])
        return cls(**values)
