"""Supervised data formats: a validated JSONL record becomes what the tokenizer sees.

The line rules live in ``gpu_worker.record_checks`` (shared with the API); this module only maps an
already valid record of a supervised format to one of two shapes:

- a conversation (chat, ShareGPT, Alpaca): ``[{"role", "content", "weight"}]``, rendered with the chat
  template, loss on the assistant replies of weight 1; chat files may add tools, tool calls and
  tool results (``chat_message``; rendered by ``templates.render``), also spelt as legacy OpenAI
  ``functions`` or ShareGPT tool turns (rewritten by ``tool_calls``);
- segments (completion, raw text): ``[(text, trained)]`` joined with the tokenizer's BOS in front and
  its EOS at the end (trained: the model learns where a completion stops).

Preference, KTO and prompt-only records are not supervised data (``to_sft`` refuses them); their
recipes tokenize them themselves, and ``prompt_conversation`` / ``preference_conversations`` say once,
for the trainer (``gpu_worker.data_preference``) and the token counter, how such a record reads: a
prompt conversation (OpenAI's DPO ``input.tools`` included) and the answers to it. Standard library
only: ``tokencount`` uses it without torch.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from gpu_worker.contract import DataFormat
from gpu_worker.tool_calls import legacy_as_tools, sharegpt_as_chat, sharegpt_uses_tools, uses_legacy_functions
from gpu_worker.record_checks import SHAREGPT_ROLES

SFT_FORMATS = frozenset({DataFormat.chat, DataFormat.sharegpt, DataFormat.alpaca, DataFormat.completion, DataFormat.text})


@dataclasses.dataclass(frozen=True)
class Conversation:
    # {"role", "content", "weight"}, plus "tool_calls" (assistant) / "tool_call_id" (tool): see
    # ``chat_message``.
    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None = None  # OpenAI's {"type": "function", "function": {...}}


@dataclasses.dataclass(frozen=True)
class Segments:
    parts: tuple[tuple[str, bool], ...]  # (text, trained), concatenated in order


def _message(role: str, content: str, weight: int = 1) -> dict[str, Any]:
    return {"role": role, "content": content, "weight": int(weight)}


def chat_message(m: dict[str, Any]) -> dict[str, Any]:
    """A chat file's message as the templates read it. Tool calls take transformers' convention
    (``{"type", "function": {"name", "arguments": dict}}``, the call ``id`` kept): OpenAI writes the
    arguments as a JSON string, which validation has checked decodes to an object. A null content
    (an assistant message that only calls tools) becomes the empty string."""
    out = _message(m["role"], m.get("content") or "", m.get("weight", 1))
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c.get("id"), "type": "function", "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
            for c in m["tool_calls"]
        ]
    if m["role"] == "tool" and "tool_call_id" in m:
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _arguments(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value  # already an object: as given


def alpaca_prompt(obj: dict[str, Any]) -> str:
    """The user turn of an Alpaca record: the instruction, then its input after a blank line."""
    extra = obj.get("input") or ""
    return f"{obj['instruction']}\n\n{extra}" if extra.strip() else obj["instruction"]


def to_sft(fmt: DataFormat, obj: dict[str, Any]) -> Conversation | Segments:
    """The tokenizer's view of a valid record of supervised format ``fmt``."""
    if fmt == DataFormat.chat:
        if uses_legacy_functions(obj):
            obj = legacy_as_tools(obj)[0]
        tools = tuple(obj["tools"]) if obj.get("tools") else None
        return Conversation(tuple(chat_message(m) for m in obj["messages"]), tools)
    if fmt == DataFormat.sharegpt:
        if sharegpt_uses_tools(obj):
            return to_sft(DataFormat.chat, sharegpt_as_chat(obj, SHAREGPT_ROLES)[0])
        system = [_message("system", obj["system"])] if obj.get("system") else []
        turns = [_message(SHAREGPT_ROLES[t["from"]], t["value"], t.get("weight", 1)) for t in obj["conversations"]]
        return Conversation(tuple(system + turns))
    if fmt == DataFormat.alpaca:
        system = [_message("system", obj["system"])] if obj.get("system") else []
        return Conversation(tuple(system + [_message("user", alpaca_prompt(obj)), _message("assistant", obj["output"])]))
    if fmt == DataFormat.completion:
        return Segments(((obj["prompt"], False), (obj["completion"], True)))
    if fmt == DataFormat.text:
        return Segments(((obj["text"], True),))
    raise ValueError(f"{fmt.value} records are not supervised data")


# --- preference, KTO and prompt records ----------------------------------------------------------------


def prompt_conversation(value: Any, tools: Any = None) -> Conversation:
    """The prompt of a valid preference, KTO or prompt record: a string is one user turn, a list is
    messages (with OpenAI's ``tool_calls`` / ``tool`` results where the record may have them),
    ``tools`` the functions the template lists. Every message has weight 0: a prompt is never
    trained, not even an assistant turn inside it."""
    if isinstance(value, str):
        messages = [_message("user", value, 0)]
    else:
        messages = [{**chat_message(m), "weight": 0} for m in value]
    return Conversation(tuple(messages), tuple(tools) if tools else None)


def answer_text(value: Any) -> str:
    """A preference/KTO answer: a string, or a list of one assistant message."""
    return value if isinstance(value, str) else value[0].get("content") or ""


def answered(prompt: Conversation, answer: str) -> Conversation:
    """``prompt`` with ``answer`` as the assistant's (trained) reply."""
    return Conversation(prompt.messages + (_message("assistant", answer),), prompt.tools)


def preference_conversations(fmt: DataFormat, obj: dict[str, Any]) -> tuple[Conversation, tuple[str, ...]]:
    """A valid preference record's prompt and its (preferred, non-preferred) answers, or a KTO
    record's prompt and its one completion."""
    if fmt == DataFormat.preference:
        if "input" in obj:  # OpenAI's DPO format: the tools, if any, are the input's
            prompt = prompt_conversation(obj["input"]["messages"], obj["input"].get("tools"))
            answers = (obj["preferred_output"], obj["non_preferred_output"])
        else:
            prompt, answers = prompt_conversation(obj["prompt"]), (obj["chosen"], obj["rejected"])
    elif fmt == DataFormat.kto:
        prompt, answers = prompt_conversation(obj["prompt"]), (obj["completion"],)
    else:
        raise ValueError(f"{fmt.value} records are not preference or KTO data")
    return prompt, tuple(answer_text(a) for a in answers)
