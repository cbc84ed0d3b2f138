"""The chat fine-tuning file rules: each bad line is named with its reason, good files pass."""

from __future__ import annotations

import json
import sys

import pytest

from gpu_worker.validation import MIN_EXAMPLES, FileValidator, check_example, validate_lines


def _example(**extra) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ],
        **extra,
    }


def _good_lines(n: int = MIN_EXAMPLES) -> list[bytes]:
    return [json.dumps(_example()).encode() + b"\n" for _ in range(n)]


def test_valid_file_passes_and_counts_examples():
    report = validate_lines(_good_lines(12))
    assert report.ok
    assert (report.examples, report.error_count, report.lines) == (12, 0, 12)
    assert report.message == ""


def test_feed_returns_the_parsed_example_for_reuse():
    v = FileValidator()
    assert v.feed(json.dumps(_example()).encode()) == _example()
    assert v.feed(b"not json") is None
    assert v.feed(b"   \n") is None


def test_empty_lines_are_skipped_but_counted_for_line_numbers():
    lines = _good_lines(10)
    lines.insert(2, b"\n")
    lines.insert(3, b"  \r\n")
    lines.insert(4, b'{"messages": [{"role": "bot", "content": "x"}]}\n')
    report = validate_lines(lines)
    assert report.examples == 10
    assert [(e.line, e.reason.split(" ")[0]) for e in report.errors] == [(5, "unknown")]
    assert report.message.startswith("line 5: unknown role 'bot'")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"\xff\xfe{}", "invalid UTF-8"),
        (b"{not json", "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON (nested too deeply)"),  # the parser's recursion: was a 500
        (b'{"text": ' + b"1" * (sys.get_int_max_str_digits() + 1) + b"}", "invalid JSON (a number longer than"),  # int()'s digit cap: was a 500
        (b"[1, 2]", "expected a JSON object, got an array"),
        (b'"text"', "expected a JSON object, got a string"),
        (b'{"prompt": "a", "completion": "b"}', "missing 'messages'"),
        (b'{"messages": []}', "'messages' is empty"),
        (b'{"messages": {"role": "user"}}', "'messages' must be an array"),
        (b'{"messages": ["hi"]}', "message 0 is a string, not an object"),
        (b'{"messages": [{"content": "x"}]}', "message 0 has no 'role'"),
        (b'{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
        (b'{"messages": [{"role": "user"}]}', "message 0 (user) has no 'content'"),
        (b'{"messages": [{"role": "assistant", "content": 5}]}', "'content' must be a string, not a number"),
        (b'{"messages": [{"role": "assistant", "content": null}]}', "'content' must be a string, not null"),
        (b'{"messages": [{"role": "assistant", "content": "a", "weight": 2}]}', "'weight' must be 0 or 1, not 2"),
        (b'{"messages": [{"role": "assistant", "content": "a", "weight": true}]}', "'weight' must be 0 or 1"),
        (b'{"messages": [{"role": "assistant", "content": null, "tool_calls": []}]}', "'tool_calls' must be a non-empty array"),
        (b'{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
        # valid JSON, but no character: hashing the line for duplicates raised UnicodeEncodeError (a 500)
        (b'{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}',
         "not half of a surrogate pair"),
        (b'{"messages": [{"role": "user", "content": "a", "\\uDFFF": 1}, {"role": "assistant", "content": "b"}]}',
         "not half of a surrogate pair"),
    ],
)
def test_each_bad_line_is_named_with_its_reason(line, reason):
    lines = _good_lines(10)
    lines.insert(1, line)
    report = validate_lines(lines)
    assert not report.ok
    assert report.error_count == 1
    assert report.errors[0].line == 2
    assert reason in report.errors[0].reason
    assert report.message.startswith("line 2: ")


def test_a_surrogate_pair_escape_is_one_character_and_fine():
    report = validate_lines([b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, {"role": "assistant", "content": "b"}]}',
                             *_good_lines(9)])
    assert report.ok, report.message


def test_weights_0_1_are_fine():
    example = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "Sunny.", "weight": 1},
            {"role": "assistant", "content": "Ignored.", "weight": 0},
        ]
    }
    assert check_example(example) is None


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _call(call_id="c1", name="get_weather", arguments='{"city": "Paris"}') -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_example(calls=None, results=None, **extra) -> dict:
    """user -> assistant (tool calls) -> tool results -> assistant reply, with the two tools."""
    calls = [_call()] if calls is None else calls
    results = [{"role": "tool", "tool_call_id": c.get("id", "c1"), "content": "sunny"} for c in calls] if results is None else results
    return {
        "tools": [WEATHER, TIME],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            *results,
            {"role": "assistant", "content": "Sunny."},
        ],
        **extra,
    }


def test_openai_tool_calling_examples_are_valid():
    assert check_example(_tool_example()) is None
    two = [_call("a"), _call("b", "get_time", "{}")]
    assert check_example(_tool_example(two, parallel_tool_calls=True)) is None
    # results may come in any order; content may be a string next to the calls; the example may
    # end with the call (teaching when to call), and tools may be listed without being called
    swapped = [{"role": "tool", "tool_call_id": "b", "content": "12:00"}, {"role": "tool", "tool_call_id": "a", "content": "sunny"}]
    assert check_example(_tool_example(two, swapped)) is None
    ends_with_call = {"tools": [WEATHER], "messages": [{"role": "user", "content": "Paris?"}, {"role": "assistant", "content": "Let me check.", "tool_calls": [_call()]}]}
    assert check_example(ends_with_call) is None
    assert check_example(_example(tools=[WEATHER])) is None
    assert validate_lines([json.dumps(_tool_example())] * 10).format == "chat"


def _with(example: dict, index: int, **fields) -> dict:
    example["messages"][index] = {**example["messages"][index], **fields}
    return example


TOOL_BAD = [
    (_tool_example(calls=[_call(name="get_wether")]), "message 1: tool_calls[0] calls unknown tool 'get_wether' (the example's tools: get_time, get_weather)"),
    (_tool_example(calls=[_call(arguments='{"city": Paris}')]), "message 1: tool_calls[0]: function 'get_weather': 'arguments' is not valid JSON"),
    (_tool_example(calls=[_call(arguments="[" * 100_000 + "]" * 100_000)]), "message 1: tool_calls[0]: function 'get_weather': 'arguments' is nested too deeply"),
    (_tool_example(calls=[_call(arguments={"city": "Paris"})]), "'arguments' must be a JSON string, not an object"),
    (_tool_example(calls=[_call(arguments='["Paris"]')]), "'arguments' must encode a JSON object, not an array"),
    (_tool_example(calls=[{"id": "c1", "type": "function"}]), "tool_calls[0]: 'function' must be an object"),
    (_tool_example(calls=[{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]), "tool_calls[0]: 'id' must be a non-empty string"),
    (_tool_example(calls=[{**_call(), "type": "code"}]), "'type' must be 'function', not \"code\""),
    (_tool_example(results=[{"role": "tool", "tool_call_id": "c9", "content": "sunny"}]), "message 2 (tool): 'tool_call_id' 'c9' matches no call of the assistant message before it"),
    (_tool_example(results=[{"role": "tool", "content": "sunny"}]), "message 2 (tool): 'tool_call_id' must be the id of the call it answers"),
    (_tool_example(results=[{"role": "tool", "tool_call_id": "c1", "content": "a"}, {"role": "tool", "tool_call_id": "c1", "content": "b"}]), "message 3 (tool): 'tool_call_id' 'c1' was already answered"),
    (_tool_example(results=[{"role": "tool", "tool_call_id": "c1"}]), "message 2 (tool) has no 'content'"),
    (_tool_example(results=[]), "message 1: tool call 'c1' has no tool message answering it before message 2"),
    (_tool_example(calls=[_call("a"), _call("a", "get_time", "{}")]), "message 1: tool_calls[1]: id 'a' is used twice"),
    (_tool_example(calls=[_call("a"), _call("b", "get_time", "{}")], parallel_tool_calls=False), "2 tool calls in one message, but 'parallel_tool_calls' is false"),
    (_tool_example(parallel_tool_calls="yes"), "'parallel_tool_calls' must be true or false"),
    ({**_tool_example(), "tools": None}, "'tools' must be an array, not null"),
    ({k: v for k, v in _tool_example().items() if k != "tools"}, "calls 'get_weather' but the example has no 'tools' list"),
    ({**_tool_example(), "tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0]: function 'name' must be 1-64 letters"),
    ({**_tool_example(), "tools": [WEATHER, WEATHER]}, "tools[1]: function 'get_weather' is defined twice"),
    ({**_tool_example(), "tools": [{"type": "retrieval"}]}, "tools[0]: 'type' must be 'function'"),
    ({**_tool_example(), "tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0] (f): 'parameters' must be a JSON Schema object, not a string"),
    (_with(_tool_example(), 1, content=5), "message 1: 'content' must be a string or null, not a number"),
    (_with(_tool_example(), 0, tool_calls=[_call()]), "message 0 (user): only assistant messages have 'tool_calls'"),
    (_with(_tool_example(), 2, weight=0), "message 2: 'weight' applies to assistant messages only"),
]


@pytest.mark.parametrize("example, reason", TOOL_BAD, ids=[r[:40] for _, r in TOOL_BAD])
def test_each_bad_tool_calling_line_is_named_with_its_reason(example, reason):
    lines = _good_lines(10)
    lines.insert(2, json.dumps(example).encode())
    report = validate_lines(lines)
    assert report.error_count == 1 and report.errors[0].line == 3
    assert reason in report.errors[0].reason, report.errors[0].reason


def test_tool_messages_are_refused_outside_chat_files():
    from gpu_worker.contract import DataFormat

    prompt = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "c1", "content": "x"}], "chosen": "a", "rejected": "b"}
    report = validate_lines([json.dumps(prompt)], min_examples=1, format=DataFormat.preference)
    assert "only supported in chat ('messages') training files" in report.errors[0].reason


def test_too_few_examples_is_an_error_even_without_bad_lines():
    report = validate_lines(_good_lines(MIN_EXAMPLES - 1))
    assert not report.ok and report.error_count == 0
    assert f"at least {MIN_EXAMPLES} are required" in report.message
    assert validate_lines(_good_lines(3), min_examples=3).ok


def test_message_names_first_lines_and_counts_the_rest():
    lines = _good_lines(10) + [b"oops\n"] * 30
    report = validate_lines(lines)
    assert report.error_count == 30
    assert len(report.errors) == 20  # kept errors are bounded
    assert report.message.count("line ") == 5
    assert report.message.endswith("and 25 more invalid lines")
    assert report.message.startswith("line 11: invalid JSON")


def test_str_lines_and_byte_order_mark_are_accepted():
    lines = [json.dumps(_example()) for _ in range(10)]
    lines[0] = "\ufeff" + lines[0]
    assert validate_lines(lines).ok
    assert validate_lines([b"\xef\xbb\xbf" + _good_lines(1)[0]] + _good_lines(9)).ok


# --- every format --------------------------------------------------------------------------------------

from gpu_worker.contract import DataFormat, Method  # noqa: E402
from gpu_worker.validation import check_format_for_method, detect_format  # noqa: E402

GOOD = {
    DataFormat.chat: {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    DataFormat.sharegpt: {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    DataFormat.alpaca: {"instruction": "Translate.", "input": "chat", "output": "cat"},
    DataFormat.completion: {"prompt": "The sky is", "completion": " blue"},
    DataFormat.text: {"text": "Raw text for continued pretraining."},
    DataFormat.preference: {"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [{"role": "assistant", "content": "Hello"}], "non_preferred_output": [{"role": "assistant", "content": "Go away"}]},
    DataFormat.kto: {"prompt": "Hi", "completion": "Hello", "label": True},
    DataFormat.prompt: {"prompt": "What is 2+2?", "answer": "4"},
}
OTHER_GOOD = [
    (DataFormat.preference, {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}),
    (DataFormat.preference, {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": [{"role": "assistant", "content": "No"}]}),
    (DataFormat.kto, {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "No"}], "label": False}),
    (DataFormat.prompt, {"messages": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}]}),
    (DataFormat.alpaca, {"instruction": "Say hi.", "output": "hi"}),
    (DataFormat.completion, {"prompt": "", "completion": "free text"}),
]


def _lines(fmt: DataFormat, n: int = 10) -> list[str]:
    # Distinct lines (a counter in an extra string), so duplicate counting stays out of the way.
    rows = []
    for i in range(n):
        row = json.loads(json.dumps(GOOD[fmt]))
        if fmt == DataFormat.prompt:
            row["answer"] = str(i)
        else:
            _bump(row, i)
        rows.append(json.dumps(row))
    return rows


def _bump(row, i):
    for key in ("text", "completion", "output", "prompt"):
        if isinstance(row.get(key), str) and row[key]:
            row[key] += f" {i}"
            return
    target = row.get("messages") or row.get("conversations") or row.get("preferred_output")
    field = "value" if "conversations" in row else "content"
    target[-1][field] += f" {i}"


@pytest.mark.parametrize("fmt", list(GOOD))
def test_each_format_is_detected_and_passes(fmt):
    report = validate_lines(_lines(fmt))
    assert report.ok, report.message
    assert report.format == fmt.value and report.examples == 10 and report.duplicates == 0


@pytest.mark.parametrize("fmt, row", OTHER_GOOD)
def test_other_shapes_of_a_format_are_accepted(fmt, row):
    assert detect_format(row) == fmt
    assert validate_lines([json.dumps(row)], min_examples=1, format=fmt).ok


BAD = [
    (DataFormat.sharegpt, {"conversations": []}, "'conversations' is empty"),
    (DataFormat.sharegpt, {"conversations": [{"from": "human", "value": "Hi"}]}, "no assistant ('gpt') turn"),
    (DataFormat.sharegpt, {"conversations": [{"from": "bot", "value": "Hi"}]}, "unknown 'from' 'bot' in turn 0"),
    (DataFormat.sharegpt, {"conversations": [{"from": "human"}]}, "turn 0 (human) has no 'value'"),
    (DataFormat.sharegpt, {"conversations": [{"from": "gpt", "value": 3}]}, "'value' must be a string, not a number"),
    (DataFormat.sharegpt, {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}]}, "turn 1 (gpt): 'value' is empty"),
    (DataFormat.sharegpt, {"conversations": [{"from": "function_call", "value": "{}"}]}, "turn 0 (function_call): function call 'name' must be a non-empty string"),
    (DataFormat.alpaca, {"instruction": "Do it.", "input": ""}, "missing 'output'"),
    (DataFormat.alpaca, {"instruction": "", "output": "x"}, "'instruction' is empty"),
    (DataFormat.alpaca, {"instruction": "Do it.", "input": 5, "output": "x"}, "'input' must be a string, not a number"),
    (DataFormat.completion, {"prompt": "a", "completion": ""}, "'completion' is empty"),
    (DataFormat.completion, {"prompt": None, "completion": "b"}, "'prompt' must be a string, not null"),
    (DataFormat.text, {"text": ["a"]}, "'text' must be a string, not an array"),
    (DataFormat.text, {"text": " "}, "'text' is empty"),
    (DataFormat.preference, {"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [{"role": "assistant", "content": "Hello"}]}, "missing 'non_preferred_output'"),
    (DataFormat.preference, {"input": "Hi", "preferred_output": [], "non_preferred_output": []}, "'input' must be an object"),
    (DataFormat.preference, {"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [{"role": "user", "content": "x"}], "non_preferred_output": [{"role": "assistant", "content": "y"}]}, "must be the assistant's"),
    (DataFormat.preference, {"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [], "non_preferred_output": [{"role": "assistant", "content": "y"}]}, "exactly one assistant message, not 0"),
    (DataFormat.preference, {"prompt": "Hi", "chosen": "same", "rejected": "same"}, "are identical"),
    (DataFormat.preference, {"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    (DataFormat.preference, {"prompt": "Hi", "chosen": 1, "rejected": "b"}, "'chosen' must be a string or an array"),
    (DataFormat.preference, {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "must not end with an assistant message"),
    (DataFormat.kto, {"prompt": "Hi", "completion": "Hello", "label": "true"}, "'label' must be true or false, not a string"),
    (DataFormat.kto, {"prompt": "Hi", "completion": "Hello", "label": 1}, "'label' must be true or false, not a number"),
    (DataFormat.kto, {"prompt": "Hi", "completion": "Hello"}, "missing 'label'"),
    (DataFormat.kto, {"prompt": "Hi", "completion": "", "label": True}, "'completion' is empty"),
    (DataFormat.prompt, {"prompt": ""}, "'prompt' is empty"),
    (DataFormat.prompt, {"prompt": {"text": "x"}}, "'prompt' must be a string or an array of messages"),
    (DataFormat.prompt, {"messages": []}, "'messages' is empty"),
    (DataFormat.chat, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "message 1 (assistant): 'content' is empty"),
]


@pytest.mark.parametrize("fmt, row, reason", BAD)
def test_each_bad_line_of_each_format_is_named(fmt, row, reason):
    lines = _lines(fmt)
    lines.insert(3, json.dumps(row))
    report = validate_lines(lines)
    assert report.format == fmt.value
    assert report.error_count == 1, report.message
    assert report.errors[0].line == 4 and reason in report.errors[0].reason, report.errors[0].reason
    assert report.message.startswith("line 4: ")


def test_a_file_mixing_formats_names_the_line_and_both_formats():
    lines = _lines(DataFormat.alpaca)
    lines.insert(5, json.dumps(GOOD[DataFormat.completion]))
    report = validate_lines(lines)
    assert report.error_count == 1 and report.errors[0].line == 6
    assert "this line is a completion example but the file is alpaca (from line 1); a file holds one format" in report.errors[0].reason


def test_the_format_comes_from_the_first_valid_line():
    lines = ["{oops", json.dumps({"nothing": 1})] + _lines(DataFormat.text)
    report = validate_lines(lines)
    assert report.format == "text" and report.examples == 10
    assert [e.line for e in report.errors] == [1, 2] and "unrecognised example" in report.errors[1].reason


def test_a_declared_format_is_enforced_from_the_first_line():
    report = validate_lines(_lines(DataFormat.chat), format=DataFormat.sharegpt)
    assert report.error_count == 10 and report.format == "sharegpt"
    assert "this line is a chat example but the file was declared sharegpt" in report.errors[0].reason
    assert report.errors[0].line == 1


def test_exact_and_near_duplicates_are_counted_with_their_lines():
    base = {"messages": [{"role": "user", "content": "Hello, World!"}, {"role": "assistant", "content": "Hi."}]}
    near = {"messages": [{"role": "user", "content": "hello   world"}, {"role": "assistant", "content": "hi"}]}
    lines = _lines(DataFormat.chat) + [json.dumps(base), json.dumps(base), json.dumps(near), ""]
    report = validate_lines(lines)
    assert report.ok and (report.duplicates, report.near_duplicates) == (1, 1)
    assert [(d.line, d.first_line, d.exact) for d in report.duplicate_lines] == [(12, 11, True), (13, 11, False)]


def test_a_chat_line_without_a_reply_is_a_bad_chat_line_not_a_prompt():
    lines = _lines(DataFormat.chat)
    lines.insert(1, json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    report = validate_lines(lines)
    assert report.errors[0].reason == "no assistant message"


def test_weights_apply_to_assistant_turns_only_and_one_must_train():
    assert "assistant messages only" in check_example({"messages": [{"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "y"}]})
    assert "every one has weight 0" in check_example({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]})


def test_method_format_pairs():
    assert check_format_for_method(DataFormat.sharegpt, Method.supervised) is None
    assert check_format_for_method(DataFormat.chat, Method.grpo) is None
    assert "cannot train method 'dpo'" in check_format_for_method(DataFormat.chat, Method.dpo)
    assert "kto" in check_format_for_method(DataFormat.preference, Method.kto)
