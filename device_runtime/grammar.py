"""OpenAI's structured-output fields as grammars of the sampling contract, and back.

`response_format` (`json_object`, `json_schema`) and `tools` + `tool_choice` become one
`protocol.constraints.GrammarSpec` that both sides mask with (exact constrained
decoding); a constrained tool call's JSON output becomes OpenAI `tool_calls` again.

Tool calls are the JSON object {"name": <tool name>, "arguments": {...}} constrained by
the tools' parameter schemas: `tool_choice` "required" allows any tool, a named function
only that one, "none" no call (free text). "auto" (the default with tools) lets the
output be either such a call or text that does not start with "{" (a Lark grammar with
the call as a `%json` rule), so the model chooses, and a call is always well formed.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from protocol.constraints import GrammarSpec, json_schema_spec


class GrammarRequestError(ValueError):
    """A response_format / tools field we cannot turn into a grammar (HTTP 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Structured:
    """What a request asked for: the grammar, and whether the output is a tool call."""

    grammar: GrammarSpec | None
    tools: bool = False  # the output may be a tool call ({"name", "arguments"})


def _schema(obj: object, param: str) -> dict[str, Any] | bool:
    if isinstance(obj, bool) or isinstance(obj, dict):
        return obj
    raise GrammarRequestError("a JSON schema must be an object", param)


def response_format_grammar(rf: object) -> GrammarSpec | None:
    """`response_format` -> grammar (None for text)."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise GrammarRequestError("response_format must be an object", "response_format")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_spec({"type": "object"}, 0)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise GrammarRequestError("response_format.json_schema needs a 'schema'", "response_format")
        return json_schema_spec(_schema(js["schema"], "response_format"), 0)
    raise GrammarRequestError(f"unknown response_format type {kind!r}", "response_format")


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters", {"type": "object", "properties": {}})
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": _schema(params, "tools")},
            "required": ["name", "arguments"], "additionalProperties": False}


def tools_grammar(tools: object, tool_choice: object) -> GrammarSpec | None:
    """`tools` + `tool_choice` -> grammar (None: no call possible)."""
    if not isinstance(tools, list) or not tools:
        raise GrammarRequestError("tools must be a non-empty array", "tools")
    fns: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GrammarRequestError(f"tools[{i}] must be a function with a name", "tools")
        fns[fn["name"]] = fn
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if name not in fns:
            raise GrammarRequestError(f"tool_choice names an unknown function {name!r}", "tool_choice")
        return json_schema_spec(_call_schema(fns[name]), 0)
    schemas = [_call_schema(f) for f in fns.values()]
    call = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if choice == "required":
        return json_schema_spec(call, 0)
    if choice == "auto":
        lark = ("start: call | TEXT\n"
                f"call: %json {json.dumps(call)}\n"
                "TEXT: /[^{\\s](.|\\n)*/\n")
        return GrammarSpec("lark", lark, 0)
    raise GrammarRequestError("tool_choice must be 'none', 'auto', 'required' or a named function", "tool_choice")


def structured(response_format: object, tools: object, tool_choice: object) -> Structured:
    """The grammar of a chat request (one of response_format and tools, not both)."""
    rf = response_format_grammar(response_format)
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise GrammarRequestError("tool_choice without tools", "tool_choice")
        return Structured(rf)
    if rf is not None:
        raise GrammarRequestError("response_format and tools together are not supported", "response_format")
    return Structured(tools_grammar(tools, tool_choice), tools=True)


def parse_tool_call(text: str) -> dict[str, Any] | None:
    """An OpenAI `tool_calls` entry from a constrained call's text, None for plain text."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None  # cut by max_tokens: not a call
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
        return None
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(obj["arguments"])}}
