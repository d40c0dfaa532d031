"""The TrainJob rule cases (tests/cases/trainjob_rules.yaml), shared by the local validator's
tests and the real API server's, so both judge exactly the same objects."""

import copy
from pathlib import Path

import yaml

CASES = yaml.safe_load((Path(__file__).parent / "cases" / "trainjob_rules.yaml").read_text())


def trainjob(patch: dict, name: str = "rules") -> dict:
    """The base TrainJob with `patch` merged over its spec (a None value removes the key)."""
    spec = copy.deepcopy(CASES["base"])
    for key, value in patch.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return {"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": name}, "spec": spec}
