"""The rules for one record (a decoded JSONL line) of each data format, and which formats each method
trains on; ``gpu_worker.validation`` applies them to whole files, line by line.

Each ``CHECKS[format](record)`` returns the reason the record is invalid (naming the message, turn or
field), or None. The formats are described in ``gpu_worker.validation``'s docstring; tool calling in
its several spellings is ``gpu_worker.tool_calls``'s. Standard library only: the API imports this
without torch.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from gpu_worker.contract import METHOD_FORMATS, DataFormat, Method
from gpu_worker.tool_calls import (
    SHAREGPT_CALL_TURNS,
    SHAREGPT_RESULT_TURNS,
    check_call_shape,
    check_tool_use,
    check_tools,
    legacy_as_tools,
    sharegpt_as_chat,
    sharegpt_uses_tools,
    type_name as _type_name,
    uses_legacy_functions,
)

ROLES = frozenset({"system", "user", "assistant", "tool"})
# ShareGPT speaker names, as the common dumps write them, mapped to chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}
_SHAREGPT_TOOL_TURNS = SHAREGPT_CALL_TURNS | SHAREGPT_RESULT_TURNS


def _weight_reason(where: str, msg: dict) -> str | None:
    if "weight" in msg:
        weight = msg["weight"]
        # bool is an int in Python; OpenAI's weight is the number 0 or 1, not true/false.
        if isinstance(weight, bool) or weight not in (0, 1):
            return f"{where}: 'weight' must be 0 or 1, not {json.dumps(weight)}"
    return None


def _check_message(i: int, msg: Any, roles: frozenset[str] = ROLES, *, tools_ok: bool = False) -> str | None:
    """The reason message ``i`` (0-based) of an example is invalid, or None. The shape of
    ``tool_calls`` and ``tool_call_id`` is checked here; how they refer to the example's tools and to
    each other is ``tool_calls.check_tool_use``'s. ``tools_ok``: tool calls and results may appear here
    (chat files, and the prompt of an OpenAI DPO example); elsewhere (KTO and prompt files, the
    prompt/chosen/rejected shape) no recipe renders them."""
    where = f"message {i}"
    if not isinstance(msg, dict):
        return f"{where} is {_type_name(msg)}, not an object"
    if "role" not in msg:
        return f"{where} has no 'role'"
    role = msg["role"]
    if not isinstance(role, str) or role not in roles:
        return f"unknown role {role!r} in {where} (expected one of {', '.join(sorted(roles))})"
    if not tools_ok and (role == "tool" or msg.get("tool_calls") is not None):
        return f"{where}: tool messages and 'tool_calls' are only supported in chat ('messages') training files and the 'input' of OpenAI DPO examples"
    content = msg.get("content")
    if role == "assistant" and msg.get("tool_calls") is not None:
        if not isinstance(msg["tool_calls"], list) or not msg["tool_calls"]:
            return f"{where}: 'tool_calls' must be a non-empty array"
        if content is not None and not isinstance(content, str):
            return f"{where}: 'content' must be a string or null, not {_type_name(content)}"
        for j, call in enumerate(msg["tool_calls"]):
            if (reason := check_call_shape(call)) is not None:
                return f"{where}: tool_calls[{j}]: {reason}"
    elif "content" not in msg:
        return f"{where} ({role}) has no 'content'"
    elif not isinstance(content, str):
        return f"{where} ({role}): 'content' must be a string, not {_type_name(content)}"
    elif role == "assistant" and not content.strip():
        return f"{where} (assistant): 'content' is empty"
    elif "tool_calls" in msg and role != "assistant":
        return f"{where} ({role}): only assistant messages have 'tool_calls'"
    if role == "tool":
        call_id = msg.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            return f"{where} (tool): 'tool_call_id' must be the id of the call it answers, not {json.dumps(call_id)}"
    return _weight_reason(where, msg)


def _check_messages(messages: Any, field: str = "messages", *, tools_ok: bool = False) -> str | None:
    if not isinstance(messages, list):
        return f"'{field}' must be an array, not {_type_name(messages)}"
    if not messages:
        return f"'{field}' is empty"
    for i, msg in enumerate(messages):
        if (reason := _check_message(i, msg, tools_ok=tools_ok)) is not None:
            return f"{field}: {reason}" if field != "messages" else reason
    return None


def _check_text(obj: dict, field: str, *, allow_empty: bool = False) -> str | None:
    if field not in obj:
        return f"missing '{field}'"
    value = obj[field]
    if not isinstance(value, str):
        return f"'{field}' must be a string, not {_type_name(value)}"
    if not allow_empty and not value.strip():
        return f"'{field}' is empty"
    return None


def object_reason(obj: Any) -> str | None:
    """Why a decoded line is not a JSON object, or None."""
    return None if isinstance(obj, dict) else f"expected a JSON object, got {_type_name(obj)}"


def check_example(obj: Any) -> str | None:
    """The reason a decoded line is not a valid chat example, or None if it is."""
    if (reason := object_reason(obj)) is not None:
        return reason
    if "messages" not in obj:
        return "missing 'messages'"
    if uses_legacy_functions(obj):  # read as tools/tool_calls (tool_calls.legacy_as_tools)
        obj, reason = legacy_as_tools(obj)
        if reason is not None:
            return reason
    if (reason := _check_messages(obj["messages"], tools_ok=True)) is not None:
        return reason
    if (reason := check_tool_use(obj)) is not None:
        return reason
    return _check_trainable([(m["role"], m) for m in obj["messages"]], "message")


def _check_trainable(turns: list[tuple[str, dict]], noun: str) -> str | None:
    """Per-turn ``weight`` (0 = show, do not train) is the assistant's only, and one must train."""
    if not any(role == "assistant" for role, _ in turns):
        return "no assistant message" if noun == "message" else "no assistant ('gpt') turn"
    for i, (role, turn) in enumerate(turns):
        if role != "assistant" and turn.get("weight", 1) == 0:
            return f"{noun} {i}: 'weight' applies to assistant {noun}s only"
    if all(turn.get("weight", 1) == 0 for role, turn in turns if role == "assistant"):
        return "no assistant message to train on (every one has weight 0)"
    return None


def _check_sharegpt(obj: Any) -> str | None:
    if (reason := object_reason(obj)) is not None:
        return reason
    if "conversations" not in obj:
        return "missing 'conversations'"
    turns = obj["conversations"]
    if not isinstance(turns, list):
        return f"'conversations' must be an array, not {_type_name(turns)}"
    if not turns:
        return "'conversations' is empty"
    if "system" in obj and (reason := _check_text(obj, "system", allow_empty=True)):
        return reason
    for i, turn in enumerate(turns):
        where = f"turn {i}"
        if not isinstance(turn, dict):
            return f"{where} is {_type_name(turn)}, not an object"
        if "from" not in turn:
            return f"{where} has no 'from'"
        speaker = turn["from"]
        if speaker == "function":
            return f"{where}: 'function' turns are ambiguous: write 'function_call' for a call and 'observation' for its result"
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES.keys() | _SHAREGPT_TOOL_TURNS:
            return f"unknown 'from' {speaker!r} in {where} (expected one of {', '.join(sorted(SHAREGPT_ROLES.keys() | _SHAREGPT_TOOL_TURNS))})"
        if "value" not in turn:
            return f"{where} ({speaker}) has no 'value'"
        if not isinstance(turn["value"], str):
            return f"{where} ({speaker}): 'value' must be a string, not {_type_name(turn['value'])}"
        if SHAREGPT_ROLES.get(speaker) == "assistant" and not turn["value"].strip():
            return f"{where} ({speaker}): 'value' is empty"
        if (reason := _weight_reason(where, turn)) is not None:
            return reason
    if sharegpt_uses_tools(obj):  # checked as the chat example it is read as (tool_calls.sharegpt_as_chat)
        record, reason = sharegpt_as_chat(obj, SHAREGPT_ROLES)
        if reason is None and (reason := check_example(record)) is not None:
            reason = f"read as a chat example: {reason}"
        return reason
    return _check_trainable([(SHAREGPT_ROLES[t["from"]], t) for t in turns], "turn")


def _check_alpaca(obj: Any) -> str | None:
    if (reason := object_reason(obj)) is not None:
        return reason
    for field, optional in (("instruction", False), ("input", True), ("output", False), ("system", True)):
        if optional and field not in obj:
            continue
        if (reason := _check_text(obj, field, allow_empty=optional)) is not None:
            return reason
    return None


def _check_completion(obj: Any) -> str | None:
    if (reason := object_reason(obj)) is not None:
        return reason
    # An empty prompt is legal (OpenAI's legacy format allowed it): the completion is then plain text.
    return _check_text(obj, "prompt", allow_empty=True) or _check_text(obj, "completion")


def _check_text_example(obj: Any) -> str | None:
    return object_reason(obj) or _check_text(obj, "text")


def _check_reply(value: Any, field: str) -> str | None:
    """A preference/KTO answer: a non-empty string or a list of exactly one assistant message."""
    if isinstance(value, str):
        return None if value.strip() else f"'{field}' is empty"
    if not isinstance(value, list):
        return f"'{field}' must be a string or an array with one assistant message, not {_type_name(value)}"
    if len(value) != 1:
        return f"'{field}' must hold exactly one assistant message, not {len(value)}"
    if (reason := _check_message(0, value[0])) is not None:
        return f"{field}: {reason}"
    if value[0]["role"] != "assistant":
        return f"{field}: message 0 must be the assistant's, not {value[0]['role']!r}"
    return None


def _check_prompt_field(obj: dict, field: str, *, tools_ok: bool = False) -> str | None:
    """A prompt: a non-empty string or a list of messages not ending with the assistant's."""
    if field not in obj:
        return f"missing '{field}'"
    value = obj[field]
    if isinstance(value, str):
        return None if value.strip() else f"'{field}' is empty"
    if not isinstance(value, list):
        return f"'{field}' must be a string or an array of messages, not {_type_name(value)}"
    if (reason := _check_messages(value, field, tools_ok=tools_ok)) is not None:
        return reason
    if value[-1]["role"] == "assistant":
        return f"'{field}' must not end with an assistant message (that is the answer to learn)"
    return None


def _check_preference(obj: Any) -> str | None:
    if (reason := object_reason(obj)) is not None:
        return reason
    if "preferred_output" in obj or "non_preferred_output" in obj or "input" in obj:  # OpenAI DPO
        if "input" not in obj:
            return "missing 'input'"
        if not isinstance(obj["input"], dict):
            return f"'input' must be an object with 'messages', not {_type_name(obj['input'])}"
        # OpenAI's input may list tools, and its messages call them and hold their results: the
        # prompt is rendered with them, as a chat example's (data.templates)
        if (reason := _check_prompt_field(obj["input"], "messages", tools_ok=True)) is not None:
            return f"input: {reason}"
        inp = obj["input"]
        reason = check_tool_use(inp) if isinstance(inp["messages"], list) else check_tools(inp["tools"])[0] if "tools" in inp else None
        if reason is not None:
            return f"input: {reason}"
        good, bad = "preferred_output", "non_preferred_output"
    else:
        if (reason := _check_prompt_field(obj, "prompt")) is not None:
            return reason
        good, bad = "chosen", "rejected"
    for field in (good, bad):
        if field not in obj:
            return f"missing '{field}'"
        if (reason := _check_reply(obj[field], field)) is not None:
            return reason
    if _reply_text(obj[good]) == _reply_text(obj[bad]):
        return f"'{good}' and '{bad}' are identical: there is no preference to learn"
    return None


def _reply_text(value: Any) -> str:
    return value if isinstance(value, str) else value[0].get("content") or ""


def _check_kto(obj: Any) -> str | None:
    if (reason := object_reason(obj)) is not None:
        return reason
    if (reason := _check_prompt_field(obj, "prompt")) is not None:
        return reason
    if "completion" not in obj:
        return "missing 'completion'"
    if (reason := _check_reply(obj["completion"], "completion")) is not None:
        return reason
    if "label" not in obj:
        return "missing 'label'"
    if not isinstance(obj["label"], bool):
        return f"'label' must be true or false, not {_type_name(obj['label'])} {json.dumps(obj['label'])}"
    return None


def _check_prompt(obj: Any) -> str | None:
    if (reason := object_reason(obj)) is not None:
        return reason
    if "prompt" in obj:
        return _check_prompt_field(obj, "prompt")
    if "messages" in obj:
        messages = obj["messages"]
        # A trailing assistant message is the reference answer the rewards may compare with.
        if isinstance(messages, list) and len(messages) > 1 and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            return _check_messages(messages) or _check_prompt_field({"messages": messages[:-1]}, "messages")
        return _check_prompt_field(obj, "messages")
    return "missing 'prompt' (or 'messages')"


CHECKS: dict[DataFormat, Callable[[Any], str | None]] = {
    DataFormat.chat: check_example,
    DataFormat.sharegpt: _check_sharegpt,
    DataFormat.alpaca: _check_alpaca,
    DataFormat.completion: _check_completion,
    DataFormat.text: _check_text_example,
    DataFormat.preference: _check_preference,
    DataFormat.kto: _check_kto,
    DataFormat.prompt: _check_prompt,
}

KNOWN_SHAPES = (
    "messages (chat), conversations (sharegpt), instruction/output (alpaca), prompt/completion, text, "
    "input/preferred_output/non_preferred_output or prompt/chosen/rejected (preference), "
    "prompt/completion/label (kto), prompt (prompt-only)"
)


def detect_format(obj: Any) -> DataFormat | None:
    """The format a decoded line looks like, from its keys (whether it is valid is checked after)."""
    if not isinstance(obj, dict):
        return None
    if {"preferred_output", "non_preferred_output", "chosen", "rejected"} & obj.keys():
        return DataFormat.preference
    if "label" in obj and "completion" in obj:
        return DataFormat.kto
    if "conversations" in obj:
        return DataFormat.sharegpt
    if "instruction" in obj:
        return DataFormat.alpaca
    if "messages" in obj:
        msgs = obj["messages"]
        # A conversation ending with the assistant's reply is supervised data; one that stops before
        # it is a prompt for the model to answer (GRPO).
        last = msgs[-1] if isinstance(msgs, list) and msgs else None
        if isinstance(last, dict) and last.get("role") in ("user", "system"):
            return DataFormat.prompt
        return DataFormat.chat
    if "prompt" in obj and "completion" in obj:
        return DataFormat.completion
    if "text" in obj:
        return DataFormat.text
    if "prompt" in obj:
        return DataFormat.prompt
    return None


def check_format_for_method(fmt: DataFormat | str, method: Method | str) -> str | None:
    """Why a file of format ``fmt`` cannot train ``method``, or None."""
    fmt, method = DataFormat(fmt), Method(method)
    allowed = METHOD_FORMATS[method]
    if fmt in allowed:
        return None
    names = ", ".join(sorted(f.value for f in allowed))
    return f"a {fmt.value} file cannot train method '{method.value}' (it needs {names} data)"
