"""JSON output constraints: a JSON schema (or "any JSON object") as a llama.cpp GBNF grammar.

The conversion is llama-cpp-python's own `json_schema_to_gbnf` (the port of llama.cpp's
json-schema-to-grammar). It skips some keywords silently (numeric bounds, `not`, ...); a schema
that uses one is refused here rather than half-enforced.
"""

from __future__ import annotations

import json

from llama3v.errors import Llama3vError

# Keywords the converter ignores: honouring the rest of the schema but not these would return JSON the
# caller's validator rejects, so a schema naming one is refused.
UNSUPPORTED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "not", "if", "then", "else",
    "dependentRequired", "dependentSchemas", "patternProperties", "propertyNames", "uniqueItems", "contains",
    "minContains", "maxContains", "minProperties", "maxProperties", "unevaluatedProperties", "unevaluatedItems",
})
_NAMED = ("properties", "$defs", "definitions")  # name -> subschema
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SINGLE = ("items", "additionalProperties")
ANY_OBJECT = {"type": "object"}


def json_grammar(schema: dict) -> str:
    """A GBNF grammar (root rule `root`) for JSON matching `schema`; Llama3vError if it cannot be expressed."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    _check(schema, "#")
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise Llama3vError(f"the JSON schema cannot be expressed as a grammar: {e}") from None


def _check(schema: object, path: str) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise Llama3vError(f"the JSON schema at {path} must be an object")
    for key in schema:
        if key in UNSUPPORTED:
            raise Llama3vError(f"the JSON schema keyword {key!r} at {path} cannot be expressed as a grammar")
    for key in _NAMED:
        named = schema.get(key, {})
        if not isinstance(named, dict):
            raise Llama3vError(f"the JSON schema's {key!r} at {path} must be an object")
        for name, sub in named.items():
            _check(sub, f"{path}/{key}/{name}")
    for key in _LISTS:
        subs = schema.get(key, [])
        if not isinstance(subs, list):
            raise Llama3vError(f"the JSON schema's {key!r} at {path} must be a list")
        for i, sub in enumerate(subs):
            _check(sub, f"{path}/{key}/{i}")
    for key in _SINGLE:
        sub = schema.get(key, True)
        for i, item in enumerate(sub) if isinstance(sub, list) else [(None, sub)]:  # `items` may be a tuple list
            _check(item, f"{path}/{key}" if i is None else f"{path}/{key}/{i}")
