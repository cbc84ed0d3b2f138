"""Each supervised format and chat template: which tokens are trained, EOS included."""

from __future__ import annotations

import pytest

from gpu_worker.contract import ChatTemplate, DataFormat
from gpu_worker.data import IGNORE_INDEX, encode_record, load_dataset, tokenizer_view
from gpu_worker.data.formats import to_sft
from gpu_worker.data.templates import BUILTIN_TEMPLATES, assistant_spans, render


def _trained(tok, example) -> str:
    return tok.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX])


def _encode(tok, fmt, obj, *, template=ChatTemplate.auto, train_on_inputs=False, max_len=512):
    view, source = tokenizer_view(tok, template)
    return encode_record(view, source, to_sft(fmt, obj), max_len, train_on_inputs=train_on_inputs)


SHAREGPT = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hello there"}]}
ALPACA = {"instruction": "Classify the sentiment.", "input": "The food was great.", "output": "positive"}
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hello there"}]}


def test_sharegpt_is_the_same_conversation_as_chat(tok):
    a, _ = _encode(tok, DataFormat.sharegpt, SHAREGPT)
    b, _ = _encode(tok, DataFormat.chat, CHAT)
    assert (list(a.input_ids), list(a.labels)) == (list(b.input_ids), list(b.labels))
    assert _trained(tok, a) == "hello there<|im_end|>"


def test_alpaca_puts_instruction_and_input_in_the_user_turn(tok):
    example, _ = _encode(tok, DataFormat.alpaca, ALPACA)
    text = tok.decode(list(example.input_ids))
    assert text == "<|im_start|>user\nClassify the sentiment.\n\nThe food was great.<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n"
    assert _trained(tok, example) == "positive<|im_end|>"
    no_input, _ = _encode(tok, DataFormat.alpaca, {"instruction": "Say yes.", "input": "", "output": "yes"})
    assert "Say yes.<|im_end|>" in tok.decode(list(no_input.input_ids))


def test_completion_trains_the_completion_and_eos_only(tok):
    example, _ = _encode(tok, DataFormat.completion, {"prompt": "The sky is", "completion": " blue"})
    assert example.input_ids[0] == tok.bos_token_id and example.input_ids[-1] == tok.eos_token_id
    assert tok.decode(list(example.input_ids)) == "<s>The sky is blue<|im_end|>"
    assert _trained(tok, example) == " blue<|im_end|>"


def test_text_trains_every_token_but_the_first(tok):
    example, _ = _encode(tok, DataFormat.text, {"text": "The quick brown fox"})
    assert list(example.labels[1:]) == list(example.input_ids[1:])
    assert example.labels[0] == IGNORE_INDEX


def test_train_on_inputs_trains_the_prompt_too_but_never_a_weight_0_reply(tok):
    chat = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "no", "weight": 0}, {"role": "user", "content": "Again"}, {"role": "assistant", "content": "hello"}]}
    example, _ = _encode(tok, DataFormat.chat, chat, train_on_inputs=True)
    ids, labels = list(example.input_ids), list(example.labels)
    skipped = tok.decode([t for t, l in zip(ids[1:], labels[1:]) if l == IGNORE_INDEX])
    assert skipped == "no<|im_end|>"
    comp, _ = _encode(tok, DataFormat.completion, {"prompt": "The sky is", "completion": " blue"}, train_on_inputs=True)
    assert list(comp.labels[1:]) == list(comp.input_ids[1:])


def test_eos_is_trained_when_pad_equals_eos(tok, store, write_jsonl):
    from gpu_worker.data import collate

    same = tok.__class__.from_pretrained(tok.name_or_path)
    same.pad_token = same.eos_token
    assert same.pad_token_id == same.eos_token_id
    key = write_jsonl(store, "f.jsonl", [{"prompt": "The sky is", "completion": " blue"}, {"prompt": "A", "completion": " longer answer here"}])
    data = load_dataset(store, key, same, 64)
    batch = collate(list(data.examples), same.pad_token_id)
    short = min(range(2), key=lambda r: len(data.examples[r].input_ids))
    n = len(data.examples[short].input_ids)
    # The short row ends with EOS, then EOS-valued padding: the first is trained, the padding not.
    assert batch["labels"][short, n - 1] == same.eos_token_id
    assert (batch["input_ids"][short, n:] == same.eos_token_id).all() and (batch["labels"][short, n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("name", [t for t in ChatTemplate if t != ChatTemplate.auto])
def test_builtin_templates_render_like_transformers_and_train_the_reply_and_its_end(tok, name):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Again"}, {"role": "assistant", "content": "bye"}]
    source = BUILTIN_TEMPLATES[name]
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
    ours, _ = render(source, messages, special_tokens=special)
    theirs = tok.apply_chat_template(messages, chat_template=source, tokenize=False)
    assert ours == theirs
    assert render(source, messages[:2], special_tokens=special, add_generation_prompt=True)[0] == tok.apply_chat_template(messages[:2], chat_template=source, tokenize=False, add_generation_prompt=True)
    text, spans = assistant_spans(source, messages, special_tokens=special)
    ends = {"chatml": "<|im_end|>", "qwen": "<|im_end|>", "llama-3": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>", "phi-3": "<|end|>"}
    lead = " " if name == ChatTemplate.mistral else ""  # Mistral's reply starts with the space after [/INST]: the model writes it
    assert [text[s:e] for s, e in spans] == [f"{lead}hello{ends[name.value]}", f"{lead}bye{ends[name.value]}"]


def test_a_named_template_overrides_the_tokenizers_own(tok):
    example, _ = _encode(tok, DataFormat.chat, CHAT, template=ChatTemplate.llama3)
    assert tok.decode(list(example.input_ids)).startswith("<|begin_of_text|><|start_header_id|>system")
    assert _trained(tok, example) == "hello there<|eot_id|>"


def test_a_template_without_markers_gets_its_end_of_turn_trained(tok):
    plain = BUILTIN_TEMPLATES[ChatTemplate.llama3].replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    special = {"eos_token": "<|eot_id|>"}
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hello"}]
    text, spans = assistant_spans(plain, messages, special_tokens=special)
    assert [text[s:e] for s, e in spans] == ["hello<|eot_id|>"]


def test_truncation_is_reported(tok):
    example, cut = _encode(tok, DataFormat.text, {"text": "word " * 100}, max_len=16)
    assert cut and len(example.input_ids) == 16
