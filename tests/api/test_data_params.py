"""kontrast.api.Data: spec.data typed and frozen, with the CRD's properties and defaults."""

import dataclasses

import pytest

from kontrast.api import apply_defaults, spec_schema
from kontrast.api.data import Data


def data_schema() -> dict:
    return spec_schema()["properties"]["data"]


def test_every_crd_data_property_has_a_field_and_no_more():
    assert set(Data.SPEC_KEYS) == set(data_schema()["properties"])
    assert set(Data.SPEC_KEYS.values()) == {f.name for f in dataclasses.fields(Data)}


def test_data_takes_the_crd_defaults_and_is_frozen():
    spec = apply_defaults({"spec": {"model": "RN50"}})["spec"]
    data = Data.from_spec(spec["data"])
    props = data_schema()["properties"]
    assert data.on_bad_image == props["onBadImage"]["default"]
    assert data.max_bad_fraction == props["maxBadFraction"]["default"]
    assert data.cache is None and "default" not in props["cache"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.on_bad_image = "skip"


def test_set_values_are_kept():
    data = Data.from_spec({"cache": "/c", "onBadImage": "skip", "maxBadFraction": 1})
    assert (data.cache, data.skips_bad_images, data.max_bad_fraction) == ("/c", True, 1.0)
