"""``spec.tracking`` as a typed, frozen object: where a run is tracked outside the cluster.

Pure Python (no MLflow), so the operator (which passes the credentials) reads it too. Built
from a CRD-defaulted spec; tests/api/test_tracking.py checks that the fields and the CRD's
properties agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

#: The keys of credentialsSecretRef's Secret that become variables of rank 0's pod (all optional):
#: what the MLflow client reads from its environment.
MLFLOW_CREDENTIAL_KEYS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@dataclass(frozen=True)
class MlflowTracking:
    """``spec.tracking.mlflow``."""

    uri: str                                    #: the tracking server
    experiment: Optional[str]                   #: None: the TrainJob's namespace decides
    registered_model: Optional[str]             #: register the exported model under this name
    credentials_secret: Optional[str]           #: the Secret with MLFLOW_TRACKING_* keys

    SPEC_KEYS: ClassVar[Mapping[str, str]] = {
        "uri": "uri", "experiment": "experiment", "registeredModel": "registered_model",
        "credentialsSecretRef": "credentials_secret"}

    @classmethod
    def from_spec(cls, mlflow: Mapping[str, Any]) -> "MlflowTracking":
        values = {field: mlflow.get(key) for key, field in cls.SPEC_KEYS.items()}
        values["credentials_secret"] = (values["credentials_secret"] or {}).get("name")
        return cls(**values)


@dataclass(frozen=True)
class Tracking:
    """``spec.tracking``: every tracker is optional."""

    mlflow: Optional[MlflowTracking] = None

    SPEC_KEYS: ClassVar[Mapping[str, str]] = {"mlflow": "mlflow"}

    @classmethod
    def from_spec(cls, tracking: Optional[Mapping[str, Any]]) -> "Tracking":
        mlflow = (tracking or {}).get("mlflow")
        return cls(mlflow=MlflowTracking.from_spec(mlflow) if mlflow else None)
