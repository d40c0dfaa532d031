"""spec.scheduling as a typed, frozen object, checked against the CRD."""

import dataclasses

import pytest

from kontrast.api import spec_schema
from kontrast.api.scheduling import Scheduling, field_name, thaw


def test_every_crd_scheduling_property_has_a_field_and_no_more():
    """A field added to spec.scheduling in crds/trainjob.yaml needs its typed field in Scheduling."""
    crd = {field_name(key) for key in spec_schema()["properties"]["scheduling"]["properties"]}
    fields = {f.name for f in dataclasses.fields(Scheduling)}
    assert sorted(crd - fields) == [], "CRD spec.scheduling properties without a Scheduling field"
    assert sorted(fields - crd) == [], "Scheduling fields that are not CRD spec.scheduling properties"


def test_scheduling_is_typed_frozen_and_takes_the_crd_defaults():
    props = spec_schema()["properties"]["scheduling"]["properties"]
    tolerations = [{"key": "gpu", "operator": "Exists"}]
    s = Scheduling.from_spec({"scheduling": {"queueName": "team-a", "tolerations": tolerations,
                                             "nodeSelector": {"pool": "a100"}}})
    assert s.max_restarts == props["maxRestarts"]["default"] and s.cleanup == props["cleanup"]["default"]
    assert s.suspend is props["suspend"]["default"] and s.queue_name == "team-a" and s.image is None
    assert thaw(s.tolerations) == tolerations and thaw(s.node_selector) == {"pool": "a100"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.suspend = True
    with pytest.raises(TypeError):
        s.node_selector["pool"] = "h100"
