"""The chat fine-tuning file rules: each bad line is named with its reason, good files pass."""

from __future__ import annotations

import json

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


def test_weights_0_1_are_fine():
    example = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "Sunny.", "weight": 1},
            {"role": "assistant", "content": "Ignored.", "weight": 0},
        ]
    }
    assert check_example(example) is None


def test_well_formed_tool_calls_are_refused_until_the_trainer_supports_them():
    example = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    assert "not supported for training yet" in check_example(example)


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
