"""Validate a TrainJob locally the way kube-apiserver does.

Three passes over the CRD's own schema: unknown fields (the server would silently prune a
typo such as `learningRate`, so we reject it), OpenAPI v3 keywords through jsonschema
(Draft 4 semantics: boolean exclusiveMinimum/Maximum, as in CRD schemas), and the CRD's CEL
`x-kubernetes-validations` rules evaluated with cel-python. Transition rules (those that use
`oldSelf`) run only when an old object is given, like on an update.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema

from .schema import API_VERSION, KIND, openapi_schema

# Keys that are the API server's business, not the schema's.
_SERVER_MANAGED = {"metadata", "apiVersion", "kind"}


class TrainJobInvalid(ValueError):
    """A TrainJob failed validation; `problems` holds one "path: message" per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}invalid TrainJob:\n" + "\n".join(f"  - {p}" for p in problems))


def validate(obj: Any, old: dict[str, Any] | None = None) -> list[str]:
    """All problems of a (defaulted) TrainJob object, each naming its field path."""
    if not isinstance(obj, dict):
        return [f"the document must be a mapping (a TrainJob object), got {type(obj).__name__}"]
    problems: list[str] = []
    if obj.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: must be {API_VERSION}, got {obj.get('apiVersion')!r}")
    if obj.get("kind") != KIND:
        problems.append(f"kind: must be {KIND}, got {obj.get('kind')!r}")
    schema = openapi_schema()
    problems += list(_unknown_fields(obj, schema, ""))
    problems += list(_schema_errors(obj, schema))
    if not problems:  # CEL rules assume well-typed input, as on the server
        problems += list(_cel_errors(obj, old, schema, ""))
    return problems



def _unknown_fields(value: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for key, child in value.items():
                if path == "" and key in _SERVER_MANAGED:
                    continue
                if key not in props:
                    close = difflib.get_close_matches(key, list(props), n=1)
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    yield f"{_join(path, key)}: unknown field{hint}"
                else:
                    yield from _unknown_fields(child, props[key], _join(path, key))
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, child in value.items():
                yield from _unknown_fields(child, schema["additionalProperties"], _join(path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, child in enumerate(value):
            yield from _unknown_fields(child, schema["items"], f"{path}[{i}]")



def _schema_errors(obj: dict[str, Any], schema: dict[str, Any]) -> Iterator[str]:
    validator = jsonschema.Draft4Validator(schema)
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        path = _format_path(err.absolute_path)
        if err.validator == "required":
            missing = err.message.split("'")[1] if "'" in err.message else err.message
            yield f"{_join(path, missing)}: Required value"
        else:
            yield f"{path or '<root>'}: Invalid value: {err.instance!r}: {_describe(err)}"


def _describe(err: jsonschema.ValidationError) -> str:
    s = err.schema
    v = err.validator
    if v == "minimum":
        op = "greater than" if s.get("exclusiveMinimum") else "greater than or equal to"
        return f"should be {op} {s['minimum']}"
    if v == "maximum":
        op = "less than" if s.get("exclusiveMaximum") else "less than or equal to"
        return f"should be {op} {s['maximum']}"
    if v == "enum":
        return "supported values: " + ", ".join(f'"{e}"' for e in s["enum"])
    if v == "minItems":
        return f"should have at least {s['minItems']} items"
    if v == "maxItems":
        return f"should have at most {s['maxItems']} items"
    if v == "type":
        return f"must be of type {s['type']}"
    return err.message



def _cel_parser_cached() -> None:
    """celpy analyses the CEL grammar into an LALR parser in every process: 0.1 s, a sixth of
    `kontrast train --check` on a small file. Build the parser celpy would (the options of
    celpy 0.5's ``CELParser``) and let lark keep the analysed tables in the user's cache
    folder, keyed by the grammar, the options and lark's version; without a writable cache
    folder it is built as before."""
    from celpy.celparser import CELParser
    from lark import Lark

    try:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kontrast"
        folder.mkdir(parents=True, exist_ok=True)
        cache: bool | str = str(folder / "cel-parser.lark") if os.access(folder, os.W_OK) else False
    except (OSError, RuntimeError):      # RuntimeError: no home folder
        cache = False
    CELParser.CEL_PARSER = Lark(
        (Path(celpy.__file__).parent / "cel.lark").read_text(), parser="lalr", start="expr", debug=True,
        g_regex_flags=re.M, lexer_callbacks={"IDENT": CELParser.ambiguous_literals}, propagate_positions=True,
        maybe_placeholders=False, priority="invert", tree_class=celpy.InterpretedRunner.tree_node_class, cache=cache)


_cel_parser_cached()
_env = celpy.Environment()
_programs: dict[str, Any] = {}


def _program(rule: str):
    if rule not in _programs:
        _programs[rule] = _env.program(_env.compile(rule))
    return _programs[rule]


def _cel_errors(value: Any, old: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    for rule in schema.get("x-kubernetes-validations", []):
        expr = rule["rule"]
        transition = "oldSelf" in expr
        if transition and old is None:
            continue
        activation = {"self": _to_cel(value, schema)}
        if transition:
            activation["oldSelf"] = _to_cel(old, schema)
        try:
            ok = bool(_program(expr).evaluate(activation))
        except celpy.CELEvalError as exc:  # a rule that cannot evaluate is a bug in the CRD
            raise RuntimeError(f"CEL rule at {path or '<root>'} failed to evaluate: {expr}: {exc}") from exc
        if not ok:
            where = path + rule.get("fieldPath", "")
            yield f"{where or '<root>'}: {rule['message']}"
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, child in value.items():
            if key in props:
                old_child = old.get(key) if isinstance(old, dict) else None
                yield from _cel_errors(child, old_child if isinstance(old, dict) and key in old else None,
                                       props[key], _join(path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, child in enumerate(value):
            # Kubernetes correlates list items by key only for map lists; none of ours need it.
            yield from _cel_errors(child, None, schema["items"], f"{path}[{i}]")


def _to_cel(value: Any, schema: dict[str, Any]):
    """JSON to CEL, with numbers typed by the schema (YAML `1` in a number field is a double)."""
    return celpy.json_to_cel(_typed(value, schema))


def _typed(value: Any, schema: dict[str, Any]) -> Any:
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else {}
        return {k: _typed(v, props.get(k, extra)) for k, v in value.items()}
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [_typed(v, items) for v in value]
    return value


# --------------------------------------------------------------------------------------------

def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _format_path(parts) -> str:
    out = ""
    for p in parts:
        out = f"{out}[{p}]" if isinstance(p, int) else _join(out, str(p))
    return out
