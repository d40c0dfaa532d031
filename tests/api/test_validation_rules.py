"""Every schema rule beyond plain types has a failing and a passing example, checked locally.

The same cases (tests/cases/trainjob_rules.yaml) are sent to the real API server in tests/k8s.
"""

import pytest
from rulecases import CASES, trainjob

from kontrast.api import apply_defaults, validate

def test_base_is_valid():
    assert validate(apply_defaults(trainjob({}))) == []


@pytest.mark.parametrize("case", CASES["rules"], ids=[c["rule"] for c in CASES["rules"]])
def test_rule_rejects_bad_and_accepts_good(case):
    problems = validate(apply_defaults(trainjob(case["bad"])))
    assert problems, f"{case['rule']}: bad example accepted"
    assert any(p.startswith(case["field"]) for p in problems), problems
    assert validate(apply_defaults(trainjob(case["good"]))) == []


@pytest.mark.parametrize("case", CASES["immutable"], ids=[c["field"] + str(sorted(c["change"])) for c in CASES["immutable"]])
def test_training_inputs_are_immutable(case):
    old = apply_defaults(trainjob({}))
    new = apply_defaults(trainjob(case["change"]))
    problems = validate(new, old=old)
    assert any(p.startswith(case["field"]) and "create a new TrainJob" in p for p in problems), problems


@pytest.mark.parametrize("change", CASES["mutable"])
def test_scheduling_stays_mutable(change):
    old = apply_defaults(trainjob({}))
    new = apply_defaults(trainjob(change))
    assert new["spec"] != old["spec"]
    assert validate(new, old=old) == []


def test_unknown_field_is_named_with_a_suggestion():
    problems = validate(apply_defaults(trainjob({"batchsize": 3})))
    assert problems == ["spec.batchsize: unknown field (did you mean batchSize?)"]


def test_every_problem_is_reported_at_once():
    problems = validate(apply_defaults(trainjob({"batchSize": 0, "epochs": 0, "lr": -1})))
    assert {p.split(":")[0] for p in problems} == {"spec.batchSize", "spec.epochs", "spec.lr"}


def test_integers_in_number_fields_are_numbers_for_cel():
    # YAML `1` in a list[float] field must compare as a double in the CEL rules, as on the server.
    assert validate(apply_defaults(trainjob({"rightWeights": [0, 1]}))) == []


def test_wrong_kind_and_api_version():
    obj = trainjob({})
    obj["apiVersion"], obj["kind"] = "v1", "Job"
    problems = validate(apply_defaults(obj))
    assert any(p.startswith("apiVersion:") for p in problems)
    assert any(p.startswith("kind:") for p in problems)


@pytest.mark.parametrize("case", CASES["names"], ids=[c["name"] for c in CASES["names"]])
def test_names_whose_children_would_be_invalid_or_collide_are_rejected(case):
    problems = validate(apply_defaults(trainjob({}, name=case["name"])))
    assert any(case["says"] in p for p in problems), problems


@pytest.mark.parametrize("name", CASES["good_names"])
def test_good_names_are_accepted(name):
    assert validate(apply_defaults(trainjob({}, name=name))) == []


def _cel_rules(schema) -> list[str]:
    rules = [r["rule"] for r in schema.get("x-kubernetes-validations", [])]
    children = list((schema.get("properties") or {}).values())
    children += [c for c in (schema.get("items"), schema.get("additionalProperties")) if isinstance(c, dict)]
    return rules + [r for child in children for r in _cel_rules(child)]


def test_the_cached_cel_parser_parses_every_rule_as_celpys_own(tmp_path, monkeypatch):
    """The CEL parser's tables are cached in the user's cache folder (start-up time): built and
    written once, loaded after, it gives celpy's own parse trees for every rule of the CRD."""
    from celpy import InterpretedRunner
    from celpy.celparser import CELParser

    from kontrast.api import validation
    from kontrast.api.schema import openapi_schema

    rules = _cel_rules(openapi_schema())
    assert len(rules) > 10
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(CELParser, "CEL_PARSER", None)
    validation._cel_parser_cached()                                   # built, and written
    assert (tmp_path / "kontrast" / "cel-parser.lark").stat().st_size > 0
    validation._cel_parser_cached()                                   # loaded
    cached = CELParser.CEL_PARSER
    CELParser.CEL_PARSER = None
    celpys = CELParser(tree_class=InterpretedRunner.tree_node_class).CEL_PARSER
    assert cached is not celpys
    for rule in rules:
        assert cached.parse(rule) == celpys.parse(rule), rule
