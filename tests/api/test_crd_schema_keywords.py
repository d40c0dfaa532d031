"""Every node of the CRD's schema uses only OpenAPI v3 / Kubernetes schema keywords.

Why: the CRD writes short properties as YAML flow mappings, where an unquoted comma in a
description starts a new key (``{description: forward, backward}`` has a key ``backward``).
The API server rejects such a CRD on apply ("field not declared in schema"); this finds it
without a server, naming the property."""

from pathlib import Path

import yaml

CRD = Path(__file__).resolve().parents[2] / "crds" / "trainjob.yaml"
KEYWORDS = {
    "type", "description", "properties", "items", "default", "enum", "format", "required", "nullable",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "uniqueItems",
    "minLength", "maxLength", "pattern", "minProperties", "maxProperties", "additionalProperties",
    "oneOf", "anyOf", "allOf", "not", "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type", "x-kubernetes-embedded-resource",
}


def unknown_keywords(node, path=""):
    if not isinstance(node, dict):
        return []
    found = [(path or "<root>", sorted(set(node) - KEYWORDS))] if set(node) - KEYWORDS else []
    children = [(f"{path}.{k}", v) for k, v in (node.get("properties") or {}).items()]
    children += [(f"{path}[]", node["items"])] if isinstance(node.get("items"), dict) else []
    children += [(f"{path}{{}}", node["additionalProperties"])] if isinstance(node.get("additionalProperties"), dict) else []
    for child_path, child in children:
        found += unknown_keywords(child, child_path)
    return found


def test_schema_nodes_use_only_schema_keywords():
    crd = yaml.safe_load(CRD.read_text())
    for version in crd["spec"]["versions"]:
        assert unknown_keywords(version["schema"]["openAPIV3Schema"]) == []


def test_an_unquoted_comma_in_a_flow_description_is_caught():
    node = yaml.safe_load("{properties: {x: {type: number, description: forward, backward}}}")
    assert unknown_keywords(node) == [(".x", ["backward"])]


def test_the_crd_as_the_validator_reads_it_is_the_yaml_safe_load():
    """``schema.crd`` reads with libyaml where PyYAML has it (start-up time); the objects are
    those of PyYAML's own safe loader."""
    from kontrast.api.schema import crd

    assert crd() == yaml.safe_load(CRD.read_text())
