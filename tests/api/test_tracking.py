"""kontrast.api.Tracking: spec.tracking typed and frozen, with the CRD's properties."""

import dataclasses

import pytest

from kontrast.api import spec_schema
from kontrast.api.tracking import MlflowTracking, Tracking


def test_every_crd_tracking_property_has_a_field_and_no_more():
    tracking = spec_schema()["properties"]["tracking"]
    assert set(Tracking.SPEC_KEYS) == set(tracking["properties"])
    assert set(Tracking.SPEC_KEYS.values()) == {f.name for f in dataclasses.fields(Tracking)}
    mlflow = tracking["properties"]["mlflow"]
    assert set(MlflowTracking.SPEC_KEYS) == set(mlflow["properties"])
    assert set(MlflowTracking.SPEC_KEYS.values()) == {f.name for f in dataclasses.fields(MlflowTracking)}


def test_tracking_is_optional_typed_and_frozen():
    assert Tracking.from_spec(None).mlflow is None and Tracking.from_spec({}).mlflow is None
    t = Tracking.from_spec({"mlflow": {"uri": "http://m:5000", "registeredModel": "search",
                                       "credentialsSecretRef": {"name": "mlflow-token"}}})
    assert t.mlflow == MlflowTracking(uri="http://m:5000", experiment=None, registered_model="search",
                                      credentials_secret="mlflow-token")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.mlflow.uri = "http://other"
