"""The OpenAI tool-calling format of chat training examples, checked: the ``tools`` list, the shape of
each assistant ``tool_calls`` entry, and how calls and ``tool`` results refer to each other. Standard
library only; ``gpu_worker.validation`` applies these per line at upload and before training."""

from __future__ import annotations

import json
import re
from typing import Any


def type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


# OpenAI's rule for function names.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_call_shape(call: Any) -> str | None:
    """Why one ``tool_calls`` entry is malformed (id, type, function name, JSON-object arguments), or None."""
    if not isinstance(call, dict):
        return f"must be an object, not {type_name(call)}"
    if not isinstance(call.get("id"), str) or not call["id"]:
        return "'id' must be a non-empty string"
    if call.get("type", "function") != "function":
        return f"'type' must be 'function', not {json.dumps(call.get('type'))}"
    fn = call.get("function")
    if not isinstance(fn, dict):
        return f"'function' must be an object with 'name' and 'arguments', not {type_name(fn)}"
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        return "function 'name' must be a non-empty string"
    args = fn.get("arguments")
    if not isinstance(args, str):
        return f"function {fn['name']!r}: 'arguments' must be a JSON string, not {type_name(args)}"
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as err:
        return f"function {fn['name']!r}: 'arguments' is not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(parsed, dict):
        return f"function {fn['name']!r}: 'arguments' must encode a JSON object, not {type_name(parsed)}"
    return None


def check_tools(tools: Any) -> tuple[str | None, set[str]]:
    """The example's ``tools`` list: the reason it is invalid (or None) and the function names."""
    if not isinstance(tools, list):
        return f"'tools' must be an array, not {type_name(tools)}", set()
    names: set[str] = set()
    for k, tool in enumerate(tools):
        where = f"tools[{k}]"
        if not isinstance(tool, dict):
            return f"{where} must be an object, not {type_name(tool)}", names
        if tool.get("type") != "function":
            return f"{where}: 'type' must be 'function', not {json.dumps(tool.get('type'))}", names
        fn = tool.get("function")
        if not isinstance(fn, dict):
            return f"{where}: 'function' must be an object with 'name', 'description' and 'parameters', not {type_name(fn)}", names
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            return f"{where}: function 'name' must be 1-64 letters, digits, '_' or '-', not {json.dumps(name)}", names
        if name in names:
            return f"{where}: function {name!r} is defined twice", names
        if "description" in fn and not isinstance(fn["description"], str):
            return f"{where} ({name}): 'description' must be a string, not {type_name(fn['description'])}", names
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            return f"{where} ({name}): 'parameters' must be a JSON Schema object, not {type_name(fn['parameters'])}", names
        names.add(name)
    return None, names


def check_tool_use(obj: dict) -> str | None:
    """How the calls of a (shape-checked) chat example refer to its tools and to each other: each
    call names a tool of ``tools``, ids are unique, each ``tool`` message answers a call made since
    the last user/assistant reply (once), and no call is left unanswered when the conversation goes on."""
    messages = obj["messages"]
    uses_tools = any(m["role"] == "tool" or m.get("tool_calls") is not None for m in messages)
    if "parallel_tool_calls" in obj and not isinstance(obj["parallel_tool_calls"], bool):
        return f"'parallel_tool_calls' must be true or false, not {json.dumps(obj['parallel_tool_calls'])}"
    names: set[str] = set()
    if "tools" in obj:
        reason, names = check_tools(obj["tools"])
        if reason is not None:
            return reason
    if not uses_tools:
        return None
    ids: set[str] = set()
    pending: dict[str, int] = {}  # call id -> the message that made it, not answered yet
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            call_id = m["tool_call_id"]
            if call_id not in pending:
                answered = "was already answered" if call_id in ids else "matches no call of the assistant message before it"
                return f"message {i} (tool): 'tool_call_id' {call_id!r} {answered}"
            del pending[call_id]
            continue
        if pending:
            left = ", ".join(repr(c) for c in pending)
            return f"message {next(iter(pending.values()))}: tool call {left} has no tool message answering it before message {i}"
        calls = m.get("tool_calls") or []
        if len(calls) > 1 and obj.get("parallel_tool_calls") is False:
            return f"message {i}: {len(calls)} tool calls in one message, but 'parallel_tool_calls' is false"
        for j, call in enumerate(calls):
            name = call["function"]["name"]
            if "tools" not in obj:
                return f"message {i}: tool_calls[{j}] calls {name!r} but the example has no 'tools' list"
            if name not in names:
                return f"message {i}: tool_calls[{j}] calls unknown tool {name!r} (the example's tools: {', '.join(sorted(names)) or 'none'})"
            if call["id"] in ids:
                return f"message {i}: tool_calls[{j}]: id {call['id']!r} is used twice"
            ids.add(call["id"])
            pending[call["id"]] = i
    return None
