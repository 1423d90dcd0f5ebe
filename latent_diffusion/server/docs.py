"""``/docs``: the API reference as one plain HTML page rendered from the app's own OpenAPI document.

It needs no script and nothing from the network, so it works on an offline machine (FastAPI's
Swagger page loads its scripts from a CDN and stays blank there). Tools read ``/openapi.json``.
"""
from __future__ import annotations

import json
from html import escape
from typing import Any

STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.4}
h2{font-size:1.05rem;margin:2rem 0 .3rem;font-family:monospace}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top;font-size:.9rem}
code{font-family:monospace}.method{color:#fff;background:#446;padding:0 .4rem;border-radius:3px}"""


def docs_page(openapi: dict[str, Any]) -> str:
    """The whole page: every operation with its parameters, request fields and answers."""
    info = openapi.get("info", {})
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(info.get('title', ''))} API"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>{escape(info.get('title', ''))} {escape(str(info.get('version', '')))} API</h1>",
             f"<p>{escape(info.get('description', ''))} The machine-readable schema is "
             "<a href=\"/openapi.json\">/openapi.json</a>.</p>"]
    schemas = openapi.get("components", {}).get("schemas", {})
    for path, operations in openapi.get("paths", {}).items():
        for method, operation in operations.items():
            parts.append(_operation(path, method, operation, schemas))
    parts.append("</body></html>")
    return "\n".join(parts)


def _operation(path: str, method: str, operation: dict[str, Any], schemas: dict[str, Any]) -> str:
    rows = [(p["name"] + f" ({p.get('in', '')})", p.get("schema", {}), p.get("required", False), p.get("description"))
            for p in operation.get("parameters", [])]
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body:
        model = _resolve(body, schemas)
        required = set(model.get("required", []))
        rows += [(name, field, name in required, field.get("description"))
                 for name, field in model.get("properties", {}).items()]
    html = [f"<h2 id=\"{escape(method + path)}\"><span class=method>{method.upper()}</span> {escape(path)}</h2>"]
    if operation.get("summary"):
        html.append(f"<p>{escape(operation['summary'])}</p>")
    if rows:
        html.append("<table><tr><th>field</th><th>type and limits</th><th>default</th><th>notes</th></tr>")
        html += [f"<tr><td><code>{escape(name)}</code>{' (required)' if needed else ''}</td>"
                 f"<td>{escape(_type(field, schemas))}</td><td>{escape(_default(field))}</td>"
                 f"<td>{escape(note or '')}</td></tr>" for name, field, needed, note in rows]
        html.append("</table>")
    answers = ", ".join(f"{code} {escape(r.get('description', ''))}" for code, r in operation.get("responses", {}).items())
    html.append(f"<p>Answers: {answers}</p>")
    return "\n".join(html)


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    return schemas.get(ref.rpartition("/")[2], {}) if ref else schema


def _type(field: dict[str, Any], schemas: dict[str, Any]) -> str:
    """A short description of a JSON schema: type, bounds, item type, choices."""
    if "$ref" in field:
        return field["$ref"].rpartition("/")[2]
    if "anyOf" in field:
        return " or ".join(_type(option, schemas) for option in field["anyOf"])
    text = field.get("type", "any")
    if text == "array":
        text = f"array of {_type(field.get('items', {}), schemas)}"
    bounds = [f"{word} {_number(field[key])}" for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                      ("maximum", "<="), ("exclusiveMaximum", "<"),
                                                      ("minLength", "length >="), ("maxLength", "length <="),
                                                      ("minItems", "items >="), ("maxItems", "items <="))
              if key in field]
    if "enum" in field:
        bounds.append("one of " + ", ".join(map(str, field["enum"])))
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _default(field: dict[str, Any]) -> str:
    return json.dumps(field["default"]) if "default" in field else ""
