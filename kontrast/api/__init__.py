"""The TrainJob API: load, default and validate TrainJobs from the CRD's own schema."""

from .defaults import apply_defaults
from .load import load_trainjob, read_trainjob
from .schema import API_VERSION, GROUP, KIND, PLURAL, VERSION, crd, openapi_schema, spec_schema
from .validation import TrainJobInvalid, validate

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "TrainJobInvalid", "apply_defaults",
    "crd", "load_trainjob", "openapi_schema", "read_trainjob", "spec_schema", "validate",
]
