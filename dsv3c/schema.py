"""plan.json validity: strict JSON (no NaN/Infinity) checked against the shipped JSON Schema (plan_schema.json).

The validator covers the subset of JSON Schema the schema uses: type (one or a list), enum, required,
properties, additionalProperties (true/false or a schema), items and minimum.
"""

import json
from functools import lru_cache
from pathlib import Path

SCHEMA_PATH = Path(__file__).with_name("plan_schema.json")

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class PlanError(ValueError):
    """A plan that is not strict JSON or does not match plan_schema.json (a bug, not bad input)."""


@lru_cache(maxsize=1)
def plan_schema() -> dict:
    """The JSON Schema of plan.json that ships with the package."""
    return json.loads(SCHEMA_PATH.read_text())


def errors(value, schema: dict, where: str = "plan") -> list[str]:
    """Every place where value breaks schema, as 'path: what' strings (empty when valid)."""
    found = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_TYPES[k](value) for k in kinds):
            return [f"{where}: expected {' or '.join(kinds)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        found.append(f"{where}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        found += [f"{where}: missing key '{k}'" for k in schema.get("required", []) if k not in value]
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                found += errors(item, props[key], f"{where}.{key}")
            elif extra is False:
                found.append(f"{where}: unexpected key '{key}'")
            elif isinstance(extra, dict):
                found += errors(item, extra, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += errors(item, schema["items"], f"{where}[{i}]")
    return found


def plan_json(plan: dict) -> str:
    """plan as strict, schema-valid JSON text; PlanError naming the first problem otherwise."""
    try:
        text = json.dumps(plan, indent=1, allow_nan=False)
    except ValueError as e:
        raise PlanError(f"plan.json would hold a non-finite number ({e}); refusing to write it") from None
    problems = errors(json.loads(text), plan_schema())
    if problems:
        raise PlanError(f"plan.json does not match plan_schema.json: {problems[0]}")
    return text + "\n"
