"""The other spellings of tool calling (legacy OpenAI ``functions`` and ShareGPT tool turns) are read
as the OpenAI chat example they mean: the same rendering, labels and token counts, and bad rows are
refused with the turn or message that is wrong."""

from __future__ import annotations

import json

import pytest

from gpu_worker.contract import DataFormat
from gpu_worker.data.encoding import TokenizerView, encode_record
from gpu_worker.data.formats import to_sft
from gpu_worker.data.templates import resolve_template
from gpu_worker.tokencount import count_tokens
from gpu_worker.validation import CHECKS, detect_format, validate_lines

from test_tools import WEATHER, tool_row


def legacy_row(city: str, weather: str) -> dict:
    return {
        "functions": [WEATHER["function"]],
        "messages": [
            {"role": "system", "content": "You check the weather."},
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": json.dumps({"city": city})}},
            {"role": "function", "name": "get_weather", "content": f"RESULT {weather}"},
            {"role": "assistant", "content": f"It is {weather}."},
        ],
    }


def sharegpt_row(city: str, weather: str) -> dict:
    return {
        "system": "You check the weather.",
        "tools": json.dumps([WEATHER["function"]]),
        "conversations": [
            {"from": "human", "value": f"Weather in {city}?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
            {"from": "observation", "value": f"RESULT {weather}"},
            {"from": "gpt", "value": f"It is {weather}."},
        ],
    }


def _encoded(view, fmt: DataFormat, row: dict):
    source = resolve_template("auto", view.chat_template)
    example, _ = encode_record(view, source, to_sft(fmt, row), 4096)
    return list(example.input_ids), list(example.labels)


@pytest.mark.parametrize("fmt, row", [(DataFormat.chat, legacy_row("Oslo", "snow")), (DataFormat.sharegpt, sharegpt_row("Oslo", "snow"))])
def test_reads_as_the_openai_tool_calling_example(tiny_dir, fmt, row):
    view = TokenizerView.from_dir(tiny_dir)
    assert detect_format(row) == fmt and CHECKS[fmt](row) is None
    # same tokens and the same trained positions as the OpenAI spelling (call ids never reach the text)
    assert _encoded(view, fmt, row) == _encoded(view, DataFormat.chat, tool_row("Oslo", "snow"))


def test_sharegpt_parallel_calls_are_answered_in_order(tiny_dir):
    row = sharegpt_row("Oslo", "snow")
    row["conversations"][1:3] = [
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": c}} for c in ("Oslo", "Lima")])},
        {"from": "observation", "value": "RESULT snow"},
        {"from": "observation", "value": "RESULT fog"},
    ]
    assert CHECKS[DataFormat.sharegpt](row) is None
    messages = to_sft(DataFormat.sharegpt, row).messages
    calls = messages[2]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{"city": "Oslo"}, {"city": "Lima"}]
    assert [m.get("tool_call_id") for m in messages[3:5]] == [c["id"] for c in calls]


def test_counter_agrees_with_the_trainer(tok, tiny_dir, store, write_jsonl):
    from gpu_worker.data import load_dataset

    for fmt, make in ((DataFormat.chat, legacy_row), (DataFormat.sharegpt, sharegpt_row)):
        key = write_jsonl(store, f"{fmt.value}.jsonl", [make(c, w) for c, w in (("Paris", "sunny"), ("Oslo", "snow"), ("Lima", "fog"))])
        data = load_dataset(store, key, tok, 4096)
        stats = count_tokens(store.get_bytes(key).splitlines(), tokenizer_dir=tiny_dir, max_seq_length=4096)
        assert stats.examples == len(data.examples) == 3
        assert (stats.tokens, stats.trained_tokens) == (sum(len(e.input_ids) for e in data.examples), sum(e.trained_tokens for e in data.examples))


def _bad(fmt, row, change):
    row = json.loads(json.dumps(row))
    change(row)
    return CHECKS[fmt](row)


@pytest.mark.parametrize("fmt, make, change, reason", [
    (DataFormat.chat, legacy_row, lambda r: r.update(tools=[WEATHER]), "either 'tools' or the legacy 'functions'"),
    (DataFormat.chat, legacy_row, lambda r: r["messages"].pop(2), "message 2 (function): answers no 'function_call'"),
    (DataFormat.chat, legacy_row, lambda r: r["messages"][2]["function_call"].update(name="get_time"), "calls unknown tool 'get_time'"),
    (DataFormat.chat, legacy_row, lambda r: r["messages"][1].update(function_call={"name": "x"}), "only assistant messages have 'function_call'"),
    (DataFormat.chat, legacy_row, lambda r: r.update(functions="[{"), "'functions' is a string but not valid JSON"),
    (DataFormat.sharegpt, sharegpt_row, lambda r: r["conversations"][1].update(value="{not json"), "turn 1 (function_call): 'value' must be a JSON function call"),
    (DataFormat.sharegpt, sharegpt_row, lambda r: r["conversations"].pop(2), "has no tool message answering it"),
    (DataFormat.sharegpt, sharegpt_row, lambda r: r["conversations"].pop(1), "turn 1 (observation): answers no function call"),
    (DataFormat.sharegpt, sharegpt_row, lambda r: r.pop("tools"), "the example has no 'tools' list"),
    (DataFormat.sharegpt, sharegpt_row, lambda r: r["conversations"][1].update(value=json.dumps({"arguments": {}})), "'name' must be a non-empty string"),
    (DataFormat.sharegpt, sharegpt_row, lambda r: r["conversations"][2].update({"from": "function"}), "'function' turns are ambiguous"),
])
def test_bad_rows_name_what_is_wrong(fmt, make, change, reason):
    assert reason in (_bad(fmt, make("Oslo", "snow"), change) or "")


def test_a_file_reports_the_bad_line(tiny_dir):
    rows = [sharegpt_row(c, "sunny") for c in ("Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Rome", "Quito", "Dakar", "Nice", "Bern", "Riga")]
    rows[4]["conversations"].pop(2)
    report = validate_lines([json.dumps(r) for r in rows])
    assert report.format == "sharegpt" and [e.line for e in report.errors] == [5]
