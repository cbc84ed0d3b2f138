"""Every JSON string inside a training line that ``tool_calls`` parses (a call's ``arguments``, legacy
``functions`` and ``function_call``, ShareGPT ``tools`` and ``function_call`` turns) is the uploader's
data: whatever ``json.loads`` refuses, an integer past Python's digit limit included, is a bad line
named with its field, never an exception out of the validator (the upload's 500)."""

from __future__ import annotations

import json
import sys

import pytest

from gpu_worker.validation import MIN_EXAMPLES, validate_lines

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
# One digit past the limit: json.loads raises ValueError (not JSONDecodeError) converting it to int.
HUGE = "1" * (sys.get_int_max_str_digits() + 1)
TOO_LONG = f"a number longer than {sys.get_int_max_str_digits()} digits"


def chat_row(arguments: str = '{"city": "Oslo"}') -> dict:
    return {
        "tools": [{"type": "function", "function": WEATHER}],
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "snow"},
            {"role": "assistant", "content": "It snows."},
        ],
    }


def legacy_row(functions=None, arguments: str = '{"city": "Oslo"}') -> dict:
    return {
        "functions": [WEATHER] if functions is None else functions,
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": arguments}},
            {"role": "function", "name": "get_weather", "content": "snow"},
            {"role": "assistant", "content": "It snows."},
        ],
    }


def sharegpt_row(tools: str | None = None, call: str | None = None) -> dict:
    return {
        "tools": json.dumps([WEATHER]) if tools is None else tools,
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}}) if call is None else call},
            {"from": "observation", "value": "snow"},
            {"from": "gpt", "value": "It snows."},
        ],
    }


CASES = {
    "chat-arguments": (chat_row, chat_row(arguments=f'{{"city": {HUGE}}}'), f"message 1: tool_calls[0]: function 'get_weather': 'arguments' is not valid JSON ({TOO_LONG})"),
    "legacy-function-call-arguments": (legacy_row, legacy_row(arguments=f'{{"city": {HUGE}}}'), f"'arguments' is not valid JSON ({TOO_LONG})"),
    "legacy-functions-string": (legacy_row, legacy_row(functions=f'[{{"name": "get_weather", "n": {HUGE}}}]'), f"'functions' is a string but not valid JSON ({TOO_LONG})"),
    "sharegpt-tools-string": (sharegpt_row, sharegpt_row(tools=f'[{{"name": "get_weather", "n": {HUGE}}}]'), f"'tools' is a string but not valid JSON ({TOO_LONG})"),
    "sharegpt-function-call": (sharegpt_row, sharegpt_row(call=f'{{"name": "get_weather", "arguments": {{"city": {HUGE}}}}}'), f"turn 1 (function_call): 'value' must be a JSON function call ({TOO_LONG})"),
}


@pytest.mark.parametrize(("good", "bad", "reason"), CASES.values(), ids=CASES.keys())
def test_a_number_too_long_to_read_is_a_named_bad_line(good, bad, reason):
    lines = [json.dumps(good()) for _ in range(MIN_EXAMPLES)]
    assert validate_lines(lines).ok  # the same file without the long number is fine
    lines.insert(3, json.dumps(bad))
    report = validate_lines(lines)
    assert (report.error_count, report.examples, report.errors[0].line) == (1, MIN_EXAMPLES, 4)
    assert reason in report.errors[0].reason, report.errors[0].reason
    assert report.message.startswith("line 4: ")


def test_the_longest_readable_number_is_still_read():
    digits = "1" * sys.get_int_max_str_digits()
    report = validate_lines([json.dumps(chat_row(arguments=f'{{"city": {digits}}}'))] * MIN_EXAMPLES)
    assert report.ok, report.message
