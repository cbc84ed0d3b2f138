"""Tool-calling chat data (OpenAI ``tools`` / ``tool_calls`` / ``tool`` messages): rendering, loss
masks (calls and replies trained, tool list and results not), the token counter in step with the
trainer, and a tool-calling file that teaches a model its toy task."""

from __future__ import annotations

import json

import pytest

from gpu_worker.contract import ChatTemplate, DataFormat, DataOptions
from gpu_worker.data import IGNORE_INDEX, collate, epoch_batches, load_dataset, load_sft_data
from gpu_worker.data.encoding import TokenizerView, encode_record
from gpu_worker.data.formats import to_sft
from gpu_worker.data.templates import BUILTIN_TEMPLATES, assistant_spans, render
from gpu_worker.tokencount import count_tokens

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CITIES = [("Paris", "sunny"), ("Oslo", "snow"), ("Lima", "fog"), ("Cairo", "hot"), ("Tokyo", "rain"), ("Rome", "windy"), ("Quito", "mild"), ("Dakar", "dry")]


def tool_row(city: str, weather: str, *, system: bool = True) -> dict:
    head = [{"role": "system", "content": "You check the weather."}] if system else []
    return {
        "tools": [WEATHER],
        "messages": head + [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": f"RESULT {weather}"},
            {"role": "assistant", "content": f"It is {weather}."},
        ],
    }


def _labelled_text(view, example) -> tuple[str, str]:
    """(text of the trained tokens, text of the untrained ones), decoded token by token."""
    ids, labels = list(example.input_ids), list(example.labels)
    trained = view.backend.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX], skip_special_tokens=False)
    untrained = view.backend.decode([t for t, l in zip(ids, labels) if l == IGNORE_INDEX], skip_special_tokens=False)
    return trained, untrained


@pytest.mark.parametrize("template", [ChatTemplate.auto, *BUILTIN_TEMPLATES])
def test_calls_and_replies_are_trained_tool_list_and_results_are_not(tiny_dir, template):
    from gpu_worker.data.templates import resolve_template

    view = TokenizerView.from_dir(tiny_dir)
    source = resolve_template(template, view.chat_template)
    record = to_sft(DataFormat.chat, tool_row("Paris", "sunny"))
    text, spans = assistant_spans(source, list(record.messages), special_tokens=view.special_tokens, tools=record.tools)
    # the documented rendering: tool list in the system turn, calls as <tool_call> blocks, results
    # as <tool_response> blocks, each assistant turn one span
    assert text.index("You check the weather.") < text.index("<tools>\n" + json.dumps(WEATHER) + "\n</tools>") < text.index("Weather in Paris?")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    lead = " " if template == ChatTemplate.mistral else ""  # Mistral's reply starts with the space after [/INST]
    assert [text[s:e].startswith(lead + want) for (s, e), want in zip(spans, (call, "It is sunny."))] == [True, True]
    assert "<tool_response>\nRESULT sunny\n</tool_response>" in text and not any(s <= text.index("RESULT") < e for s, e in spans)

    example, cut = encode_record(view, source, record, 4096)
    trained, untrained = _labelled_text(view, example)
    assert not cut
    assert '"name": "get_weather", "arguments": {"city": "Paris"}' in trained and "It is sunny." in trained
    assert "RESULT" not in trained and "<tool_response>" not in trained and "<tools>" not in trained and "Weather in Paris" not in trained
    assert "RESULT sunny" in untrained and "get_weather" in untrained  # the tool list is read, not learnt


def test_a_tools_aware_tokenizer_template_renders_them_itself_as_transformers_does(tok, tiny_dir):
    # A Qwen2.5-style template that handles tools, calls (arguments as objects) and results.
    native = (
        "{%- if tools %}{{- '<|im_start|>system\\nTOOLS:' }}{%- for t in tools %}{{- '\\n' + t | tojson }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in messages %}"
        "{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + (m.content or '') }}"
        "{%- for c in m.tool_calls or [] %}{{- '<call>' + c.function.name + ' ' + c.function.arguments | tojson + '</call>' }}{%- endfor %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- elif m.role == 'tool' %}{{- '<|im_start|>tool ' + m.tool_call_id + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}"
    )
    row = tool_row("Oslo", "snow", system=False)
    record = to_sft(DataFormat.chat, row)
    ours, _ = render(native, list(record.messages), special_tokens={}, tools=record.tools)
    hf_messages = [{k: v for k, v in m.items() if k != "weight"} for m in record.messages]
    assert ours == tok.apply_chat_template(hf_messages, tools=[WEATHER], tokenize=False, chat_template=native)
    assert '<call>get_weather {"city": "Oslo"}</call>' in ours and "<tool_call>" not in ours

    view = TokenizerView.from_dir(tiny_dir)
    example, _ = encode_record(view, native, record, 4096)
    trained, _ = _labelled_text(view, example)
    assert '<call>get_weather {"city": "Oslo"}</call>' in trained and "It is snow." in trained and "RESULT" not in trained


@pytest.mark.parametrize("template, train_on_inputs", [(ChatTemplate.auto, False), (ChatTemplate.llama3, True), (ChatTemplate.mistral, False)])
def test_token_counter_agrees_with_the_trainer_on_tool_data(tok, tiny_dir, store, write_jsonl, template, train_on_inputs):
    rows = [tool_row(c, w, system=i % 2 == 0) for i, (c, w) in enumerate(CITIES)]
    key = write_jsonl(store, "tools.jsonl", rows)
    data = load_dataset(store, key, tok, 2048, chat_template=template, train_on_inputs=train_on_inputs)
    stats = count_tokens(store.get_bytes(key).splitlines(), tokenizer_dir=tiny_dir, chat_template=template, max_seq_length=2048, train_on_inputs=train_on_inputs)
    assert stats.examples == len(data.examples) == len(rows)
    assert stats.tokens == sum(len(e.input_ids) for e in data.examples)
    assert stats.trained_tokens == sum(e.trained_tokens for e in data.examples)


def test_a_bad_tool_line_stops_loading_with_its_number(tok, store, write_jsonl):
    bad = tool_row("Paris", "sunny")
    bad["messages"][2]["tool_calls"][0]["function"]["name"] = "get_forecast"
    key = write_jsonl(store, "bad.jsonl", [tool_row("Oslo", "snow"), bad])
    from gpu_worker.data import DataError

    with pytest.raises(DataError, match=r"line 2: message 2: tool_calls\[0\] calls unknown tool 'get_forecast'"):
        load_dataset(store, key, tok, 256)


def test_a_tool_calling_file_trains_and_the_loss_falls(micro_model_dir, store, write_jsonl, make_spec):
    import torch
    from transformers import AutoModelForCausalLM

    from gpu_worker.loading import load_tokenizer

    micro_tok = load_tokenizer(str(micro_model_dir), data_dir=micro_model_dir)
    write_jsonl(store, "files/train.jsonl", [tool_row(c, w) for c, w in CITIES])
    data = load_sft_data(store, make_spec(str(micro_model_dir), data=DataOptions(), hyperparameters={"max_seq_length": 512}), micro_tok)
    rows = data.train.examples
    assert len(rows) == len(CITIES) and data.train.truncated == 0

    def mean_loss() -> float:
        with torch.no_grad():
            batch = collate(list(rows), micro_tok.pad_token_id)
            return model(**batch, num_items_in_batch=int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())).loss.item()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    before = mean_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for epoch in range(12):
        for idx in epoch_batches(len(rows), 4, seed=0, epoch=epoch):
            model(**collate([rows[i] for i in idx], micro_tok.pad_token_id)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    after = mean_loss()
    assert after < 0.5 * before, (before, after)


def test_tokenize_messages_takes_tools_as_the_file_loader_does(tok, store, write_jsonl):
    from gpu_worker.data import tokenize_messages

    row = tool_row("Lima", "fog")
    from_file = load_dataset(store, write_jsonl(store, "one.jsonl", [row]), tok, 1024).examples[0]
    direct, _ = tokenize_messages(tok, row["messages"], 1024, tools=row["tools"])
    assert direct == from_file
    without_tools, _ = tokenize_messages(tok, row["messages"], 1024)
    assert len(without_tools.input_ids) < len(direct.input_ids)  # the tool list is part of the input


def test_the_sft_recipe_fine_tunes_on_a_tool_calling_file(micro_model_dir, store, write_jsonl, make_spec, tmp_path):
    """The whole path a job takes (validation, loading, the recipe's loop), not just the data."""
    from gpu_worker.contract import CompletedEvent, MetricsEvent
    from gpu_worker.recipes import RunContext
    from gpu_worker.recipes.sft import run

    write_jsonl(store, "files/train.jsonl", [tool_row(c, w) for c, w in CITIES])
    # Full fine-tuning: a rank-8 LoRA on the randomly initialised micro model moved the loss only
    # 7.2 -> 5.5 in 16 steps (the adapter path itself is covered by the recipe's own tests).
    spec = make_spec(str(micro_model_dir), hyperparameters={"n_epochs": 12, "batch_size": 4, "learning_rate": 1e-2, "max_seq_length": 512}, adapter={"type": "full"})
    events = []
    result = run(spec, RunContext(store=store, data_dir=tmp_path, emit=events.append, should_stop=lambda: False, device="cpu"))
    losses = [e.train_loss for e in events if isinstance(e, MetricsEvent)]
    assert isinstance(result, CompletedEvent) and len(losses) == 24
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
