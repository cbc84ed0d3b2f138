"""The OpenAI tool-calling format of chat training examples, checked: the ``tools`` list, the shape of
each assistant ``tool_calls`` entry, and how calls and ``tool`` results refer to each other. Standard
library only; ``gpu_worker.record_checks`` applies these per line at upload and before training."""

from __future__ import annotations

import json
import re
import sys
from typing import Any


def type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def json_error(err: ValueError) -> str:
    """Why ``json.loads`` refused a user's text, for a message that names where the text was. Besides
    syntax (``JSONDecodeError``, a ``ValueError``), the one ValueError the parser raises is Python's
    cap on converting long digit runs to ``int`` (CVE-2020-10735): a client mistake, never a 500."""
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at column {err.colno}"
    return f"a number longer than {sys.get_int_max_str_digits()} digits"


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
    except ValueError as err:
        return f"function {fn['name']!r}: 'arguments' is not valid JSON ({json_error(err)})"
    except RecursionError:
        return f"function {fn['name']!r}: 'arguments' is nested too deeply"
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


# --- other spellings of tool calling, rewritten as OpenAI's ------------------------------------------
#
# Two older shapes are common in the wild and are read as the chat format above, with call ids made
# up in order (``call_0``, ``call_1``, ...), so that the checks, the templates and the token counter
# only ever see one format:
#
# - OpenAI's legacy function calling: ``"functions": [{"name", "description", "parameters"}]``,
#   assistant messages with ``"function_call": {"name", "arguments"}`` and ``{"role": "function",
#   "name", "content"}`` results (each answering the latest unanswered call);
# - ShareGPT tool turns (LLaMA-Factory's convention): ``{"from": "function_call", "value": "<JSON
#   call or list of calls>"}`` (parallel calls are a list), each answered in order by an
#   ``"observation"`` (or ``"tool"``) turn, and ``"tools"``: a JSON string or list of functions.

SHAREGPT_CALL_TURNS = frozenset({"function_call"})
SHAREGPT_RESULT_TURNS = frozenset({"observation", "tool"})


def uses_legacy_functions(obj: dict) -> bool:
    messages = obj.get("messages")
    return "functions" in obj or (isinstance(messages, list) and any(
        isinstance(m, dict) and ("function_call" in m or m.get("role") == "function") for m in messages))


def _as_tools(functions: Any, field: str) -> tuple[list | None, str | None]:
    """A list of functions (or of OpenAI tools), possibly JSON-encoded, as OpenAI ``tools``."""
    if isinstance(functions, str):
        try:
            functions = json.loads(functions)
        except ValueError as err:
            return None, f"'{field}' is a string but not valid JSON ({json_error(err)})"
        except RecursionError:
            return None, f"'{field}' is nested too deeply"
    if not isinstance(functions, list):
        return None, f"'{field}' must be an array of functions, not {type_name(functions)}"
    tools = []
    for k, fn in enumerate(functions):
        if not isinstance(fn, dict):
            return None, f"{field}[{k}] must be an object, not {type_name(fn)}"
        tools.append(fn if fn.get("type") == "function" and "function" in fn else {"type": "function", "function": fn})
    return tools, None


def _call(value: Any, call_id: str, where: str) -> tuple[dict | None, str | None]:
    """One ``{"name", "arguments"}`` call (arguments an object or a JSON string) as a tool call."""
    if not isinstance(value, dict):
        return None, f"{where}: a function call must be an object with 'name' and 'arguments', not {type_name(value)}"
    name, args = value.get("name"), value.get("arguments", {})
    if not isinstance(name, str) or not name:
        return None, f"{where}: function call 'name' must be a non-empty string"
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}, None


def legacy_as_tools(obj: dict) -> tuple[dict | None, str | None]:
    """A chat example written with legacy ``functions``/``function_call`` as one with ``tools``/
    ``tool_calls``/``tool`` messages, or (None, the reason it cannot be read)."""
    if "tools" in obj:
        return None, "use either 'tools' or the legacy 'functions', not both"
    out = {k: v for k, v in obj.items() if k != "functions"}
    if "functions" in obj:
        tools, reason = _as_tools(obj["functions"], "functions")
        if reason:
            return None, reason
        out["tools"] = tools
    messages, pending = [], []
    for i, m in enumerate(obj.get("messages") or []):
        if not isinstance(m, dict):
            messages.append(m)  # the chat checks name it
            continue
        m = dict(m)
        if "function_call" in m:
            if m.get("role") != "assistant":
                return None, f"message {i} ({m.get('role')}): only assistant messages have 'function_call'"
            call, reason = _call(m.pop("function_call"), f"call_{i}", f"message {i}")
            if reason:
                return None, reason
            m["tool_calls"] = [call]
            pending.append(call["id"])
        elif m.get("role") == "function":
            if not pending:
                return None, f"message {i} (function): answers no 'function_call' of an assistant message before it"
            m = {"role": "tool", "tool_call_id": pending.pop(), "content": m.get("content")}
        messages.append(m)
    out["messages"] = messages
    return out, None


def sharegpt_uses_tools(obj: dict) -> bool:
    turns = obj.get("conversations")
    return "tools" in obj or (isinstance(turns, list) and any(
        isinstance(t, dict) and t.get("from") in SHAREGPT_CALL_TURNS | SHAREGPT_RESULT_TURNS for t in turns))


def sharegpt_as_chat(obj: dict, roles: dict[str, str]) -> tuple[dict | None, str | None]:
    """A ShareGPT record with tool turns as an OpenAI chat example (``roles`` maps the other
    speakers), or (None, the reason naming the turn). The turns' shapes are checked by the caller."""
    out: dict[str, Any] = {}
    if "tools" in obj:
        tools, reason = _as_tools(obj["tools"], "tools")
        if reason:
            return None, reason
        out["tools"] = tools
    messages = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    pending: list[str] = []
    for i, turn in enumerate(obj["conversations"]):
        where, speaker = f"turn {i}", turn["from"]
        weight = {"weight": turn["weight"]} if "weight" in turn else {}
        if speaker in SHAREGPT_CALL_TURNS:
            try:
                value = json.loads(turn["value"])
            except ValueError as err:
                return None, f"{where} ({speaker}): 'value' must be a JSON function call ({json_error(err)})"
            except RecursionError:
                return None, f"{where} ({speaker}): 'value' is nested too deeply"
            calls = []
            for value in value if isinstance(value, list) else [value]:
                call, reason = _call(value, f"call_{i}_{len(calls)}", f"{where} ({speaker})")
                if reason:
                    return None, reason
                calls.append(call)
            if not calls:
                return None, f"{where} ({speaker}): the list of calls is empty"
            messages.append({"role": "assistant", "content": None, "tool_calls": calls, **weight})
            pending += [c["id"] for c in calls]
        elif speaker in SHAREGPT_RESULT_TURNS:
            if not pending:
                return None, f"{where} ({speaker}): answers no function call before it"
            messages.append({"role": "tool", "tool_call_id": pending.pop(0), "content": turn["value"]})
        else:
            messages.append({"role": roles[speaker], "content": turn["value"], **weight})
    out["messages"] = messages
    return out, None
