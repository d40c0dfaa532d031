"""kontrast.api.HardNegatives: spec.hardNegatives typed and frozen, with the CRD's properties,
defaults and rules."""

import dataclasses

import pytest

from kontrast.api import apply_defaults, spec_schema, validate
from kontrast.api.hard_negatives import START_MODEL, HardNegatives


def schema() -> dict:
    return spec_schema()["properties"]["hardNegatives"]


def test_every_crd_property_has_a_field_and_no_more():
    assert set(HardNegatives.SPEC_KEYS) == set(schema()["properties"])
    assert set(HardNegatives.SPEC_KEYS.values()) == {f.name for f in dataclasses.fields(HardNegatives)}


def test_defaults_come_from_the_crd_and_unset_is_none():
    spec = apply_defaults({"spec": {"model": "RN50", "hardNegatives": {"perQuery": 4}}})["spec"]
    hn = HardNegatives.from_spec(spec["hardNegatives"])
    props = schema()["properties"]
    assert (hn.source, hn.model, hn.margin, hn.every_epochs) == (
        props["from"]["default"], props["model"]["default"], props["margin"]["default"], props["everyEpochs"]["default"])
    assert hn.from_start and hn.model == START_MODEL and hn.round_of(7) == 0
    assert HardNegatives.from_spec(None) is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        hn.per_query = 2


def test_rounds_every_n_epochs():
    hn = HardNegatives(per_query=1, source="train", model="start", margin=0.0, every_epochs=2)
    assert [hn.round_of(e) for e in range(5)] == [0, 0, 1, 1, 2]


def _job(spec_extra: dict) -> dict:
    spec = {"leftKeys": ["q"], "leftWeights": [1], "rightKeys": ["img"], "rightWeights": [1], "weightKey": "w",
            "model": "RN50", "trainData": "t.csv", "output": "o", "epochs": 3, **spec_extra}
    return apply_defaults({"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
                           "metadata": {"name": "job"}, "spec": spec})


@pytest.mark.parametrize("hard, extra, message", [
    ({"perQuery": 0}, {}, "perQuery"),
    ({"perQuery": 2, "margin": 1.0}, {}, "margin"),
    ({"perQuery": 2, "from": "eval"}, {}, "from"),
    ({"perQuery": 2, "from": "corpus"}, {}, "needs corpusData"),
    ({"perQuery": 2, "everyEpochs": 3}, {}, "less than epochs"),
    ({}, {}, "perQuery"),
])
def test_bad_values_are_refused_with_the_field(hard, extra, message):
    problems = validate(_job({"hardNegatives": hard, **extra}))
    assert any(message in p for p in problems), problems


def test_good_values_pass():
    assert validate(_job({"hardNegatives": {"perQuery": 4, "everyEpochs": 2, "margin": 0.1}})) == []
    assert validate(_job({"hardNegatives": {"perQuery": 4, "from": "corpus"}, "evalData": "e.csv",
                          "corpusData": "c.csv"})) == []


def test_cannot_be_added_or_changed_after_creation():
    old = _job({})
    assert any("cannot be added or removed" in p
               for p in validate(_job({"hardNegatives": {"perQuery": 2}}), old=old))
    old = _job({"hardNegatives": {"perQuery": 2}})
    assert any("hardNegatives is immutable" in p for p in validate(_job({"hardNegatives": {"perQuery": 3}}), old=old))
