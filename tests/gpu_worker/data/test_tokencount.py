"""The torch-free token counter agrees with the trainer's tokenization and imports without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpu_worker.contract import ChatTemplate, DataOptions, Method, TrainingFile
from gpu_worker.data import load_dataset
from gpu_worker.data.mixing import held_out_count
from gpu_worker.tokencount import TokenCountError, count_tokens, estimate_job_tokens

ROOT = Path(__file__).resolve().parents[3]

FILES = {
    "chat": [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hello there", "weight": 0}, {"role": "user", "content": "Again, ünïcode ✓"}, {"role": "assistant", "content": "bye now"}]},
        {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok " * 30}]},
    ],
    "sharegpt": [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}],
    "alpaca": [{"instruction": "Name the color.", "input": "sky", "output": "blue"}],
    "completion": [{"prompt": "The sky is", "completion": " blue"}],
    "text": [{"text": "The quick brown fox jumps over the lazy dog. " * 10}],
}


@pytest.mark.parametrize("name", list(FILES))
@pytest.mark.parametrize("template, train_on_inputs", [(ChatTemplate.auto, False), (ChatTemplate.llama3, True)])
def test_counts_equal_the_trainers_tokenization(tok, tiny_dir, store, write_jsonl, name, template, train_on_inputs):
    key = write_jsonl(store, f"{name}.jsonl", FILES[name])
    data = load_dataset(store, key, tok, 64, chat_template=template, train_on_inputs=train_on_inputs)
    lines = store.get_bytes(key).splitlines()
    stats = count_tokens(lines, tokenizer_dir=tiny_dir, chat_template=template, max_seq_length=64, train_on_inputs=train_on_inputs)
    assert stats.examples == len(FILES[name]) and stats.examples - stats.dropped == len(data.examples)
    assert stats.dropped == data.dropped
    assert stats.tokens == sum(len(e.input_ids) for e in data.examples)
    assert stats.trained_tokens == sum(e.trained_tokens for e in data.examples)
    assert stats.truncated == data.truncated


def test_preference_kto_and_prompt_files_are_counted(tiny_dir):
    pref = ['{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away now"}']
    kto = ['{"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello", "label": false}']
    prompts = ['{"prompt": "What is 2+2?", "answer": "4"}']
    p = count_tokens(pref, tokenizer_dir=tiny_dir, max_seq_length=64)
    k = count_tokens(kto, tokenizer_dir=tiny_dir, max_seq_length=64)
    g = count_tokens(prompts, tokenizer_dir=tiny_dir, max_seq_length=64)
    assert p.examples == k.examples == g.examples == 1
    assert p.trained_tokens > k.trained_tokens > 0 and p.tokens > 2 * k.trained_tokens
    assert g.tokens > 0 and g.trained_tokens == 0


def test_bad_lines_are_named(tiny_dir):
    with pytest.raises(TokenCountError, match="line 2: 'label' must be true or false"):
        count_tokens(['{"prompt": "a", "completion": "b", "label": true}', '{"prompt": "a", "completion": "b", "label": "yes"}'], tokenizer_dir=tiny_dir, max_seq_length=64)


def test_job_estimate_is_trained_tokens_times_epochs_with_weights(tiny_dir, store, write_jsonl, make_spec):
    write_jsonl(store, "files/train.jsonl", FILES["chat"])
    write_jsonl(store, "files/extra.jsonl", FILES["completion"] * 4)
    one = count_tokens(store.get_bytes("files/train.jsonl").splitlines(), tokenizer_dir=tiny_dir, max_seq_length=128).trained_tokens
    two = count_tokens(store.get_bytes("files/extra.jsonl").splitlines(), tokenizer_dir=tiny_dir, max_seq_length=128).trained_tokens
    spec = make_spec("tiny", hyperparameters={"n_epochs": 3}, data=DataOptions(dedupe=False, extra_training_files=(TrainingFile(key="files/extra.jsonl", weight=0.5),)))
    assert estimate_job_tokens(store, spec, tiny_dir) == 3 * (one + two // 2)
    # with dedupe (the default) the four copies count once, as the trainer keeps one of them
    write_jsonl(store, "files/extra1.jsonl", FILES["completion"])
    once = make_spec("tiny", hyperparameters={"n_epochs": 3}, data=DataOptions(dedupe=False, extra_training_files=(TrainingFile(key="files/extra1.jsonl", weight=0.5),)))
    deduped = make_spec("tiny", hyperparameters={"n_epochs": 3}, data=DataOptions(extra_training_files=(TrainingFile(key="files/extra.jsonl", weight=0.5),)))
    assert estimate_job_tokens(store, deduped, tiny_dir) == estimate_job_tokens(store, once, tiny_dir)
    # 2 examples at 0.25: the trainer holds out one of them (mixing.held_out_count: at least one), not a quarter
    split = make_spec("tiny", hyperparameters={"n_epochs": 3}, data=DataOptions(validation_split=0.25))
    assert estimate_job_tokens(store, split, tiny_dir) == round(3 * one * 0.5)
    grpo = make_spec("tiny", method=Method.grpo, training_file_key="files/p.jsonl")
    write_jsonl(store, "files/p.jsonl", [{"prompt": "2+2?", "answer": "4"}] * 5)
    assert estimate_job_tokens(store, grpo, tiny_dir) == 5 * 4 * 64  # prompts x generations x max completion
    with pytest.raises(TokenCountError, match="not in storage") as err:
        estimate_job_tokens(store, make_spec("tiny", training_file_key="files/missing.jsonl"), tiny_dir)
    assert err.value.param == "training_file" and "files/" not in str(err.value)  # never our storage layout
    # a bad line of an extra file is that file's: named by its field, not by its storage key
    write_jsonl(store, "files/bad.jsonl", [{"label": "maybe", "prompt": "p", "completion": "c"}])
    bad_extra = make_spec("tiny", data=DataOptions(extra_training_files=(TrainingFile(key="files/bad.jsonl"),)))
    with pytest.raises(TokenCountError) as err:
        estimate_job_tokens(store, bad_extra, tiny_dir)
    assert err.value.param == "extra_training_files[0]" and str(err.value).startswith("extra_training_files[0]: line 1")


def test_the_automatic_split_is_left_out_of_the_trained_tokens(tiny_dir, store, write_jsonl, make_spec):
    """validation_split unset (automatic): from 100 examples on the trainer holds out 5% of them, which
    the estimate once counted as trained; under 100 it holds out none, and 0 never does."""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}"}, {"role": "assistant", "content": f"Answer {i} is here"}]} for i in range(200)]
    write_jsonl(store, "files/auto.jsonl", rows)
    write_jsonl(store, "files/few.jsonl", rows[:99])
    per_example = {n: count_tokens(store.get_bytes(f"files/{n}.jsonl").splitlines(), tokenizer_dir=tiny_dir, max_seq_length=128).trained_tokens
                   for n in ("auto", "few")}
    auto = make_spec("tiny", training_file_key="files/auto.jsonl", hyperparameters={"n_epochs": 2})
    assert auto.data.validation_split is None and held_out_count(200, None) == 10
    assert estimate_job_tokens(store, auto, tiny_dir) == round(2 * per_example["auto"] * 190 / 200)
    none = make_spec("tiny", training_file_key="files/auto.jsonl", hyperparameters={"n_epochs": 2}, data=DataOptions(validation_split=0))
    assert estimate_job_tokens(store, none, tiny_dir) == 2 * per_example["auto"]
    few = make_spec("tiny", training_file_key="files/few.jsonl", hyperparameters={"n_epochs": 2})
    assert estimate_job_tokens(store, few, tiny_dir) == 2 * per_example["few"]


def test_tokencount_and_validation_import_without_torch_or_transformers():
    code = (
        "import sys\n"
        "import gpu_worker.tokencount, gpu_worker.validation\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
