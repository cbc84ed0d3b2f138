"""Preference, KTO and prompt data are rendered with the job's chat template (``data.chat_template``),
their tools included, exactly as the supervised loader and the token counter render them: a DPO
prompt decodes as the named template writes it, the counter's trained tokens are the trainer's, and
an OpenAI DPO row's ``input.tools`` reach the prompt."""

from __future__ import annotations

import json

import pytest

from gpu_worker.contract import ChatTemplate, CompletedEvent, DataFormat, DataOptions, MethodParams, Reward
from gpu_worker.data import DataError, tokenize_messages
from gpu_worker.data.templates import BUILTIN_TEMPLATES, render
from gpu_worker.data_preference import Renderer, load_examples
from gpu_worker.tokencount import count_tokens, estimate_job_tokens
from test_preference import preference_rows, run_job  # same directory: pytest puts it on sys.path

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok(micro_model_dir):
    from gpu_worker.loading import load_tokenizer

    return load_tokenizer(str(micro_model_dir), data_dir=micro_model_dir)


def _text(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def _special(tok) -> dict[str, str]:
    return Renderer.of(tok).view.special_tokens


def test_a_dpo_prompt_decodes_with_the_named_template(tok, store, write_jsonl, sentiment_rows):
    rows = preference_rows(sentiment_rows, 3, openai=True)
    write_jsonl(store, "p.jsonl", rows)
    pairs = load_examples(store, "p.jsonl", tok, DataFormat.preference, max_seq_length=512, chat_template=ChatTemplate.llama3).examples
    for row, pair in zip(rows, pairs):
        messages = row["input"]["messages"]
        want, _ = render(BUILTIN_TEMPLATES[ChatTemplate.llama3], messages, special_tokens=_special(tok), add_generation_prompt=True)
        assert _text(tok, pair.prompt) == want and want.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
        assert want.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        # each answer is the reply with the template's end of turn, and nothing after it
        assert _text(tok, pair.chosen) == row["preferred_output"][0]["content"] + "<|eot_id|>"
        assert _text(tok, pair.rejected) == row["non_preferred_output"][0]["content"] + "<|eot_id|>"


@pytest.mark.parametrize("template", list(ChatTemplate))
def test_the_token_counter_counts_the_trainers_completion_tokens(tok, micro_model_dir, store, write_jsonl, sentiment_rows, template):
    rows = preference_rows(sentiment_rows, 4) + preference_rows(sentiment_rows, 2, seed=1, openai=True)
    rows.append({"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Rate it."}], "chosen": "Five stars.", "rejected": "Meh."})
    kto = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in preference_rows(sentiment_rows, 3)]
    for name, fmt, data in (("pref", DataFormat.preference, rows), ("kto", DataFormat.kto, kto)):
        key = write_jsonl(store, f"{name}.jsonl", data)
        examples = load_examples(store, key, tok, fmt, max_seq_length=512, chat_template=template).examples
        completions = [c for e in examples for c in ((e.chosen, e.rejected) if fmt == DataFormat.preference else (e.completion,))]
        stats = count_tokens(store.get_bytes(key).splitlines(), tokenizer_dir=micro_model_dir, chat_template=template, max_seq_length=512)
        assert stats.trained_tokens == sum(len(c) for c in completions), (name, template)


def test_a_dpo_job_trains_the_tokens_the_estimate_counted(micro_model_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    """End to end with a named template: the job's trained tokens (completion tokens, all epochs) are
    the counter's estimate, and its exports speak the template it trained with."""
    write_jsonl(store, "files/train.jsonl", preference_rows(sentiment_rows, 8))
    spec = make_spec(str(micro_model_dir), method="dpo", method_params=MethodParams(beta=0.1), data=DataOptions(chat_template=ChatTemplate.gemma),
                     hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "max_seq_length": 512}, export={"gguf": ["q8_0"]})
    rec, result = run_job(spec, store, tmp_path)
    assert isinstance(result, CompletedEvent)
    assert result.trained_tokens == estimate_job_tokens(store, spec, micro_model_dir) > 0
    modelfile = next(a for a in result.artifacts if a.kind == "modelfile")
    assert modelfile.detail["template"] == "gemma", modelfile


def test_kto_and_grpo_read_the_jobs_template(tok, store, write_jsonl, make_spec):
    from gpu_worker.recipes.grpo import GRPOObjective
    from gpu_worker.recipes.kto import KTOObjective
    from gpu_worker.recipes.preference import PairObjective

    data = DataOptions(chat_template=ChatTemplate.phi3)
    write_jsonl(store, "k.jsonl", [{"prompt": "Hi", "completion": "Hello", "label": True}])
    write_jsonl(store, "d.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}])
    write_jsonl(store, "g.jsonl", [{"prompt": "Hi", "answer": "Hello"}])
    want = "<|user|>\nHi<|end|>\n<|assistant|>\n"
    kto = KTOObjective(make_spec("m", method="kto", data=data)).load(store, tok, "k.jsonl", "training_file").examples[0]
    dpo = PairObjective(make_spec("m", method="dpo", data=data)).load(store, tok, "d.jsonl", "training_file").examples[0]
    grpo = GRPOObjective(make_spec("m", method="grpo", data=data, method_params=MethodParams(rewards=(Reward(kind="exact_match"),))))
    prompt = grpo.load(store, tok, "g.jsonl", "training_file").examples[0]
    assert _text(tok, kto.prompt) == _text(tok, dpo.prompt) == _text(tok, prompt.prompt) == want
    assert _text(tok, kto.completion) == "Hello<|end|>"


def test_grpo_stops_at_the_templates_end_of_turn_token(micro_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert Renderer.of(tok, ChatTemplate.llama3).stop_ids() == (tok.eos_token_id, eot)
    assert Renderer.of(tok, ChatTemplate.chatml).stop_ids() == (tok.eos_token_id,)  # <|im_end|> is the EOS here


# --- tools in OpenAI DPO rows ---------------------------------------------------------------------------


def _tool_row(**extra) -> dict:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    ]
    return {"input": {"messages": messages, "tools": WEATHER, **extra}, "preferred_output": [{"role": "assistant", "content": "Sunny and 21 C."}],
            "non_preferred_output": [{"role": "assistant", "content": "I cannot know that."}]}


@pytest.mark.parametrize("template", [ChatTemplate.auto, ChatTemplate.llama3])
def test_a_dpo_rows_tools_are_rendered_into_its_prompt_as_sft_renders_them(tok, store, write_jsonl, template):
    row = _tool_row()
    write_jsonl(store, "t.jsonl", [row])
    pair = load_examples(store, "t.jsonl", tok, DataFormat.preference, max_seq_length=1024, chat_template=template).examples[0]
    prompt = _text(tok, pair.prompt)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    # the same tokens as the supervised loader gives the conversation answered with the preferred reply
    sft, _ = tokenize_messages(tok, row["input"]["messages"] + row["preferred_output"], 1024, tools=WEATHER, chat_template=template)
    trained = [i for i, label in enumerate(sft.labels) if label != -100]
    assert list(pair.prompt) + list(pair.chosen) == list(sft.input_ids[: trained[-1] + 1])
    reply = trained[-len(pair.chosen):]  # SFT also trains the tool call; the reply is its last trained run
    assert reply == list(range(len(pair.prompt), trained[-1] + 1))


def test_the_tools_change_the_prompt_they_were_dropped_before(tok, store, write_jsonl):
    with_tools = _tool_row()
    without = json.loads(json.dumps(with_tools))
    del without["input"]["tools"]
    without["input"]["messages"] = without["input"]["messages"][:1]
    with_tools["input"]["messages"] = with_tools["input"]["messages"][:1]
    write_jsonl(store, "a.jsonl", [with_tools])
    write_jsonl(store, "b.jsonl", [without])
    a = load_examples(store, "a.jsonl", tok, DataFormat.preference, max_seq_length=1024).examples[0]
    b = load_examples(store, "b.jsonl", tok, DataFormat.preference, max_seq_length=1024).examples[0]
    assert len(a.prompt) > len(b.prompt) and "get_weather" in _text(tok, a.prompt) and "get_weather" not in _text(tok, b.prompt)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda r: r["input"].update(tools="get_weather"), "input: 'tools' must be an array"),
        (lambda r: r["input"]["messages"][1]["tool_calls"][0]["function"].update(name="get_time"), "calls unknown tool 'get_time'"),
        (lambda r: r["input"].pop("tools"), "but the example has no 'tools' list"),
        (lambda r: r["preferred_output"][0].update(tool_calls=[{"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]),
         "only supported in chat ('messages') training files and the 'input' of OpenAI DPO examples"),
    ],
)
def test_bad_tool_use_in_a_dpo_row_is_refused_with_its_line(tok, store, write_jsonl, change, words):
    bad = _tool_row()
    change(bad)
    write_jsonl(store, "bad.jsonl", [_tool_row(), bad])
    with pytest.raises(DataError) as err:
        load_examples(store, "bad.jsonl", tok, DataFormat.preference, max_seq_length=1024)
    assert err.value.line == 2 and words in str(err.value), str(err.value)


def _multi_turn_rows() -> list[dict]:
    """Multi-turn prompts: an OpenAI DPO row with tools, a tool call and its result, then a second
    user turn; a prompt/chosen row whose prompt holds an earlier assistant reply (never trained)."""
    tools = _tool_row()
    tools["input"]["messages"] += [{"role": "assistant", "content": "Sunny and 21 C."}, {"role": "user", "content": "And tomorrow, in detail?"}]
    history = {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Rate the film."},
                          {"role": "assistant", "content": "It was a long and winding film with many scenes."}, {"role": "user", "content": "In one word?"}],
               "chosen": "Good.", "rejected": "Bad, really bad."}
    return [_tool_row(), tools, history]


@pytest.mark.parametrize("template", [ChatTemplate.auto, ChatTemplate.llama3, ChatTemplate.mistral])
@pytest.mark.parametrize("max_seq_length", [1024, 48])  # 48: prompts cut as the trainer cuts them
def test_the_token_counter_reads_multi_turn_prompts_with_tools_as_the_trainer(tok, micro_model_dir, store, write_jsonl, template, max_seq_length):
    """The counter once rendered these prompts without their tools and trained the assistant turns
    inside them: now its counts are the trainer's pairs, token for token."""
    key = write_jsonl(store, "mt.jsonl", _multi_turn_rows())
    loaded = load_examples(store, key, tok, DataFormat.preference, max_seq_length=max_seq_length, chat_template=template)
    stats = count_tokens(store.get_bytes(key).splitlines(), tokenizer_dir=micro_model_dir, chat_template=template, max_seq_length=max_seq_length)
    assert stats.examples == len(loaded.examples) == 3 and stats.truncated == loaded.truncated
    assert stats.trained_tokens == sum(len(e.chosen) + len(e.rejected) for e in loaded.examples)
    assert stats.tokens == sum(2 * len(e.prompt) + len(e.chosen) + len(e.rejected) for e in loaded.examples)
    if max_seq_length == 48:
        assert loaded.truncated
    kto = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in _multi_turn_rows()[2:]]
    key = write_jsonl(store, "kto.jsonl", kto)
    example = load_examples(store, key, tok, DataFormat.kto, max_seq_length=max_seq_length, chat_template=template).examples[0]
    counted = count_tokens(store.get_bytes(key).splitlines(), tokenizer_dir=micro_model_dir, chat_template=template, max_seq_length=max_seq_length)
    assert (counted.trained_tokens, counted.tokens) == (len(example.completion), len(example.prompt) + len(example.completion))
