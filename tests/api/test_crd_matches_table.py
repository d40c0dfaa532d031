"""The CRD must be exactly the parameter table the user gave (../shared/seed)."""

import re
from pathlib import Path

import pytest

from kontrast.api import spec_schema

TABLE = Path(__file__).resolve().parents[2].parent / "shared" / "seed" / "training-parameters.txt"
TYPES = {"str": ("string", None), "int": ("integer", None), "float": ("number", None),
         "bool": ("boolean", None), "list[str]": ("array", "string"), "list[float]": ("array", "number")}


def parse_table(text: str) -> dict[str, dict]:
    """Rows of the seed table: name -> {type, default (None if none/model-dependent), enum, required}."""
    params: dict[str, dict] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Required Training Parameters"):
            section = "required"
            continue
        if line.startswith("Optional Training Parameters"):
            section = "optional"
            continue
        if not line or line.startswith("Name ") or section is None:
            continue
        name, typ, rest = line.split(" ", 2)
        row = {"type": typ, "required": section == "required", "default": None, "enum": None}
        if section == "optional":
            m = re.match(r'^(""|\S+ or \S+|\S+) (.*)$', rest)
            raw, rest = m.group(1), m.group(2)
            row["default"] = _parse_default(raw, typ)
        m = re.search(r"One of (.+?)\.?$", rest)
        if m:
            row["enum"] = re.split(r", | or ", m.group(1))
        params[name] = row
    return params


def _parse_default(raw: str, typ: str):
    if raw in ('""', "None") or " or " in raw:
        return None  # no single static default: resolved by the trainer
    if typ == "bool":
        return {"True": True, "False": False}[raw]
    if typ == "int":
        return int(raw)
    if typ == "float":
        return float(raw)
    return raw


PARAMS = parse_table(TABLE.read_text())


def test_table_has_43_parameters():
    assert len(PARAMS) == 43


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_matches_crd(name):
    row = PARAMS[name]
    schema = spec_schema()
    prop = schema["properties"].get(name)
    assert prop is not None, f"{name} missing from the CRD spec"
    typ, item = TYPES[row["type"]]
    assert prop["type"] == typ
    if item:
        assert prop["items"]["type"] == item
    assert (name in schema["required"]) == row["required"]
    if row["default"] is None:
        assert "default" not in prop, f"{name} must have no static default"
    else:
        assert prop["default"] == row["default"] and type(prop["default"]) is type(row["default"])
    if row["enum"] is None:
        assert "enum" not in prop
    else:
        assert prop["enum"] == row["enum"]
    assert prop.get("description", "").strip(), f"{name} needs a description for kubectl explain"


def test_frozen_right_description_is_corrected():
    desc = " ".join(spec_schema()["properties"]["frozenRight"]["description"].split())
    assert "frozen copy of the starting model" in desc
    assert "sampling with replacement" not in desc


def test_parser_sees_model_dependent_defaults():
    assert PARAMS["beta2"]["default"] is None and PARAMS["eps"]["default"] is None
    assert PARAMS["poolingMethod"]["default"] is None
    assert PARAMS["batchSize"]["default"] == 256 and PARAMS["lr"]["default"] == 5.0e-4
    assert PARAMS["lrScheduler"]["enum"] == ["cosine", "const", "const-cooldown"]
