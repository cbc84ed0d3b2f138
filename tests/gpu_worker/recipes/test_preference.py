"""DPO/IPO/ORPO/SimPO recipes: preference data read in both formats (bad rows named by line), every
method learns a toy preference task on the built-in model, the reference model is the base with
the adapter off, a resumed DPO run replays the uninterrupted one, and the trainer process runs a
DPO job end to end."""

from __future__ import annotations

import json

import pytest

from gpu_worker.contract import CheckpointEvent, CompletedEvent, DataFormat, LogEvent, MethodParams, MetricsEvent, StoppedEvent
from gpu_worker.data import DataError
from gpu_worker.data_preference import detect_format, load_examples
from gpu_worker.recipes import RunContext, recipe_for


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def losses(self) -> list[float]:
        return [e.train_loss for e in self.of(MetricsEvent)]

    def method_metrics(self, name: str) -> list[float]:
        """The objective's per-step metric ``name`` from the "<method> step N: {json}" log lines."""
        return [json.loads(e.message.split(": ", 1)[1])[name] for e in self.of(LogEvent) if " step " in e.message and e.message.split(" step ")[1][0].isdigit()]


def run_job(spec, store, data_dir, should_stop=lambda: False):
    rec = Recorder()
    result = recipe_for(spec.method)(spec, RunContext(store=store, data_dir=data_dir, emit=rec, should_stop=should_stop, device="cpu"))
    assert rec.events[-1] is result
    return rec, result


def preference_rows(sentiment_rows, n: int, seed: int = 0, openai: bool = False, label: bool = False) -> list[dict]:
    """Pairs on the demo's review prompts. The toy task (default): a polite, complete answer is
    preferred over a curt one, whatever the review: learnable in a few steps. With ``label``: the
    right sentiment label over the wrong one (harder: it depends on the review)."""
    rows = []
    for r in sentiment_rows(n, seed):
        prompt, answer = r["messages"][:-1], r["messages"][-1]["content"]
        wrong = "negative" if answer == "positive" else "positive"
        if not label:
            answer, wrong = f"I think it is {answer}, thank you.", "No."
        if openai:
            rows.append({"input": {"messages": prompt}, "preferred_output": [{"role": "assistant", "content": answer}], "non_preferred_output": [{"role": "assistant", "content": wrong}]})
        else:
            rows.append({"prompt": prompt, "chosen": answer, "rejected": wrong})
    return rows


@pytest.fixture
def tokenizer():
    from gpu_worker.builtin import build_tokenizer

    return build_tokenizer(2048)


# --- data --------------------------------------------------------------------------------------------


def test_both_preference_formats_give_the_same_tokens(store, write_jsonl, sentiment_rows, tokenizer):
    write_jsonl(store, "a.jsonl", preference_rows(sentiment_rows, 4, label=True))
    write_jsonl(store, "b.jsonl", preference_rows(sentiment_rows, 4, openai=True, label=True))
    assert detect_format(store, "a.jsonl") == detect_format(store, "b.jsonl") == DataFormat.preference
    a = load_examples(store, "a.jsonl", tokenizer, DataFormat.preference, max_seq_length=128)
    b = load_examples(store, "b.jsonl", tokenizer, DataFormat.preference, max_seq_length=128)
    assert a == b and len(a.examples) == 4 and a.truncated == 0
    pair = a.examples[0]
    text = tokenizer.decode(list(pair.prompt) + list(pair.chosen))
    assert text.endswith("<|im_start|>assistant\n" + sentiment_rows(4)[0]["messages"][-1]["content"] + "<|im_end|>")
    assert tokenizer.decode(list(pair.chosen)).endswith("<|im_end|>")  # the model must learn to stop


def test_a_string_prompt_is_one_user_turn(store, write_jsonl, tokenizer):
    write_jsonl(store, "s.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}])
    write_jsonl(store, "m.jsonl", [{"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": "Go away."}])
    s = load_examples(store, "s.jsonl", tokenizer, DataFormat.preference, max_seq_length=64)
    assert s == load_examples(store, "m.jsonl", tokenizer, DataFormat.preference, max_seq_length=64)


def test_long_pairs_keep_the_prompts_end_and_the_answers_start(store, write_jsonl, tokenizer):
    write_jsonl(store, "long.jsonl", [{"prompt": "word " * 200 + "END", "chosen": "yes " * 100, "rejected": "no"}])
    data = load_examples(store, "long.jsonl", tokenizer, DataFormat.preference, max_seq_length=64)
    pair = data.examples[0]
    assert data.truncated == 1 and len(pair.prompt) + len(pair.chosen) == 64 and len(pair.chosen) == 32
    assert "END" in tokenizer.decode(list(pair.prompt)) and tokenizer.decode(list(pair.rejected)) == "no<|im_end|>"


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"prompt": "q", "chosen": "a"}', "prompt/chosen/rejected"),
        ('{"prompt": "q", "chosen": "a", "rejected": "a"}', "identical"),
        ('{"prompt": [], "chosen": "a", "rejected": "b"}', "prompt must be a string or a non-empty list"),
        ('{"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}', "prompt[0] must be a message"),
        ('{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "chosen must be a string or a list of exactly one assistant"),
        ('{"input": "q", "preferred_output": [], "non_preferred_output": []}', "'input' must be an object"),
        ('{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": "a", "non_preferred_output": 3}', "non_preferred_output must be"),
        ("[1, 2]", "JSON object"),
        ('{"prompt": "q", ', "invalid JSON"),
    ],
)
def test_bad_preference_rows_name_their_line(store, write_jsonl, tokenizer, line, words):
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    write_jsonl(store, "bad.jsonl", [good, "", line])
    with pytest.raises(DataError) as err:
        load_examples(store, "bad.jsonl", tokenizer, DataFormat.preference, max_seq_length=64, param="validation_file")
    assert err.value.line == 3 and err.value.param == "validation_file"
    assert str(err.value).startswith("line 3: ") and words in str(err.value)


def test_missing_and_empty_files_are_data_errors(store, write_jsonl, tokenizer):
    with pytest.raises(DataError, match="not found"):
        load_examples(store, "nope.jsonl", tokenizer, DataFormat.preference, max_seq_length=64)
    write_jsonl(store, "empty.jsonl", ["", " "])
    with pytest.raises(DataError, match="no example"):
        load_examples(store, "empty.jsonl", tokenizer, DataFormat.preference, max_seq_length=64)


# --- training ----------------------------------------------------------------------------------------


def _tiny_spec(make_spec, method, **overrides):
    from gpu_worker.builtin import TINY

    hp = {"n_epochs": 2, "batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 96} | overrides.pop("hyperparameters", {})
    return make_spec(TINY, method=method, validation_file_key="files/valid.jsonl", hyperparameters=hp, runtime={"eval_every_steps": 4}, **overrides)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "ipo", "orpo", "simpo"])
def test_each_method_learns_the_toy_preference(method, builtin_data_dir, store, write_jsonl, sentiment_rows, make_spec):
    write_jsonl(store, "files/train.jsonl", preference_rows(sentiment_rows, 32))
    write_jsonl(store, "files/valid.jsonl", preference_rows(sentiment_rows, 16, seed=1))
    # IPO's target margin 1/(2 beta) is in mean token log-prob: beta 0.1 would ask for a gap of 5.
    params = {"ipo": {"beta": 0.5}, "simpo": {"beta": 2.0, "simpo_gamma": 0.5}}.get(method, {})
    rec, result = run_job(_tiny_spec(make_spec, method, method_params=MethodParams(**params)), store, builtin_data_dir)
    valid = [m.valid_loss for m in rec.of(MetricsEvent) if m.valid_loss is not None]
    assert len(valid) == 4 and valid[-1] < valid[0], valid
    margins, accuracies = rec.method_metrics("rewards/margins"), rec.method_metrics("rewards/accuracies")
    assert len(margins) == 16
    assert sum(margins[-4:]) / 4 > sum(margins[:4]) / 4, margins
    assert sum(accuracies[-4:]) / 4 > 0.5, accuracies
    assert isinstance(result, CompletedEvent) and result.steps == 16
