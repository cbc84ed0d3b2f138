"""DPO/IPO/ORPO/SimPO recipes: preference data read in both formats (bad rows named by line), every
method learns a toy preference task on the built-in model, the reference model is the base with
the adapter off, a resumed DPO run replays the uninterrupted one, and the trainer process runs a
DPO job end to end."""

from __future__ import annotations

import json
import re

import pytest

from gpu_worker.contract import CheckpointEvent, CompletedEvent, DataFormat, LogEvent, Method, MethodParams, MetricsEvent, StoppedEvent
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
        lines = [e.message for e in self.of(LogEvent) if re.match(r"[a-z]+ step \d+: \{", e.message)]
        return [json.loads(line.split(": ", 1)[1])[name] for line in lines]


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
        ('{"prompt": "q", "chosen": "a"}', "missing 'rejected'"),
        ('{"prompt": "q", "chosen": "a", "rejected": "a"}', "identical"),
        ('{"prompt": [], "chosen": "a", "rejected": "b"}', "'prompt' is empty"),
        ('{"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}', "unknown role 'robot'"),
        ('{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "must be the assistant's"),
        ('{"input": "q", "preferred_output": [], "non_preferred_output": []}', "'input' must be an object"),
        ('{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": "a", "non_preferred_output": 3}', "'non_preferred_output' must be a string"),
        ("[1, 2]", "JSON object"),
        ('{"prompt": "q", ', "invalid JSON"),
        ('{"prompt": "q", "chosen": "a", "rejected": "b", "n": ' + "1" * 5000 + "}", "invalid JSON"),  # > 4300 digits
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


# --- the reference model -----------------------------------------------------------------------------


@pytest.mark.parametrize("use_kernels", [False, True], ids=["stock", "kernels"])
def test_the_reference_is_the_base_model_with_the_adapter_off(micro_model_dir, store, write_jsonl, sentiment_rows, tokenizer, use_kernels):
    import torch

    from gpu_worker.contract import AdapterConfig, Runtime
    from gpu_worker.recipes.completion_batches import collate_completions
    from gpu_worker.loading import load_model
    from gpu_worker.recipes.model_setup import apply_memory_mode_and_kernels, wrap_with_lora
    from gpu_worker.recipes.preference_loop import reference, sequence_logps

    write_jsonl(store, "p.jsonl", preference_rows(sentiment_rows, 3))
    pairs = load_examples(store, "p.jsonl", tokenizer, DataFormat.preference, max_seq_length=96).examples
    batch = collate_completions([p.prompt for p in pairs], [p.chosen for p in pairs], tokenizer.pad_token_id)
    base = load_model(str(micro_model_dir), data_dir=".", device="cpu")
    with torch.no_grad():
        expected, _ = sequence_logps(base, batch)
    model = wrap_with_lora(load_model(str(micro_model_dir), data_dir=".", device="cpu"), AdapterConfig(rank=4, alpha=8.0))
    apply_memory_mode_and_kernels(model, Runtime(use_kernels=use_kernels))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.train()
    policy, _ = sequence_logps(model, batch)
    with reference(model) as ref_model:
        ref, _ = sequence_logps(ref_model, batch)
    assert not ref.requires_grad and policy.requires_grad and model.training
    assert torch.allclose(ref, expected, atol=1e-5), (ref, expected)
    assert not torch.allclose(policy, expected, atol=1e-2)


def test_full_fine_tuning_and_a_wrong_declared_format_are_refused(micro_model_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    from gpu_worker.recipes.model_setup import AdapterConfigError

    write_jsonl(store, "files/train.jsonl", preference_rows(sentiment_rows, 4))
    with pytest.raises(AdapterConfigError, match="dpo trains an adapter"):
        run_job(make_spec(str(micro_model_dir), method="dpo", adapter={"type": "full"}), store, tmp_path)
    with pytest.raises(DataError, match="dpo trains on preference data, not kto"):
        run_job(make_spec(str(micro_model_dir), method="dpo", data={"format": "kto"}), store, tmp_path)


# --- resume and the trainer process ------------------------------------------------------------------


def _micro_dpo(make_spec, micro_model_dir, **overrides):
    hp = {"n_epochs": 2, "batch_size": 2, "learning_rate": 5e-3, "warmup_ratio": 0.2, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine"}
    return make_spec(
        str(micro_model_dir), method="dpo", adapter={"rank": 4, "alpha": 8.0, "dropout": 0.1}, hyperparameters=hp,
        validation_file_key="files/valid.jsonl", runtime={"eval_every_steps": 2, "checkpoint_every_steps": 3}, **overrides,
    )


@pytest.mark.parametrize("stop_polls, k", [(1, 4), (2, 2)], ids=["after-a-step", "mid-step"])
def test_resumed_dpo_run_replays_the_uninterrupted_one(micro_model_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path, stop_polls, k):
    """10 pairs, batches of 2, accumulation 2: 3 steps an epoch, 6 in all; stop after step k (off the
    checkpoint schedule), or after the first micro-batch of step k+1 (that half step is thrown away)."""
    write_jsonl(store, "files/train.jsonl", preference_rows(sentiment_rows, 10))
    write_jsonl(store, "files/valid.jsonl", preference_rows(sentiment_rows, 4, seed=3))
    spec = _micro_dpo(make_spec, micro_model_dir)
    full, _ = run_job(spec, store, tmp_path)
    assert len(full.losses) == 6

    first = Recorder()
    polls = []

    def should_stop():
        if len(first.of(MetricsEvent)) >= k:
            polls.append(1)
        return len(polls) >= stop_polls

    interrupted = spec.model_copy(update={"output_prefix": "jobs/interrupted"})
    stopped = recipe_for(spec.method)(interrupted, RunContext(store, tmp_path, first, should_stop, "cpu"))
    assert isinstance(stopped, StoppedEvent) and stopped.step == k
    assert first.of(CheckpointEvent)[-1].key == stopped.checkpoint_key == f"jobs/interrupted/checkpoints/step-{k:06d}"
    assert first.losses == full.losses[:k]

    resumed, result = run_job(interrupted.model_copy(update={"resume_from_key": stopped.checkpoint_key}), store, tmp_path)
    assert [m.step for m in resumed.of(MetricsEvent)] == list(range(k + 1, 7))
    assert resumed.losses == full.losses[k:]
    assert [m.valid_loss for m in resumed.of(MetricsEvent)] == [m.valid_loss for m in full.of(MetricsEvent)][k:]
    assert resumed.method_metrics("rewards/margins") == full.method_metrics("rewards/margins")[k:]
    assert isinstance(result, CompletedEvent) and result.trained_tokens == full.events[-1].trained_tokens


@pytest.mark.parametrize("with_validation", [True, False])
def test_fp8_reports_the_validation_measures_in_bf16_beside_it(micro_model_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path, with_validation):
    # DPO with the FP8 GEMMs (emulated on CPU): each evaluation's loss, in FP8 and in bf16, in the events (without
    # a validation set: the first batch's, once); the run stays near the bf16 one
    write_jsonl(store, "files/train.jsonl", preference_rows(sentiment_rows, 10))
    write_jsonl(store, "files/valid.jsonl", preference_rows(sentiment_rows, 4, seed=3))
    bf16 = _micro_dpo(make_spec, micro_model_dir)
    bf16 = bf16.model_copy(update={"adapter": bf16.adapter.model_copy(update={"dropout": 0.0}),
                                   "runtime": bf16.runtime.model_copy(update={"use_kernels": True}),
                                   "validation_file_key": bf16.validation_file_key if with_validation else None})
    fp8 = bf16.model_copy(update={"runtime": bf16.runtime.model_copy(update={"fp8": True}), "output_prefix": "jobs/fp8"})
    a, _ = run_job(bf16, store, tmp_path)
    b, done = run_job(fp8, store, tmp_path)
    assert isinstance(done, CompletedEvent)
    reports = [e.message for e in b.of(LogEvent) if e.message.startswith("FP8 against bf16")]
    evals = [m for m in b.of(MetricsEvent) if m.valid_loss is not None]
    assert len(reports) == (len(evals) if with_validation else 1) and reports
    if with_validation:
        assert f"validation loss {evals[-1].valid_loss:.4f} with FP8 GEMMs" in reports[-1]
    else:
        assert "this batch loss" in reports[0]
    assert b.losses == pytest.approx(a.losses, rel=5e-2)


def test_a_checkpoint_of_another_method_is_refused(micro_model_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    from gpu_worker.checkpoint import CheckpointError

    write_jsonl(store, "files/train.jsonl", preference_rows(sentiment_rows, 10))
    write_jsonl(store, "files/valid.jsonl", preference_rows(sentiment_rows, 4, seed=3))
    spec = _micro_dpo(make_spec, micro_model_dir)
    rec, _ = run_job(spec, store, tmp_path)
    key = rec.of(CheckpointEvent)[0].key
    with pytest.raises(CheckpointError, match="dpo run, not simpo"):
        run_job(spec.model_copy(update={"method": Method.simpo, "resume_from_key": key, "output_prefix": "jobs/other"}), store, tmp_path)


@pytest.mark.slow
def test_trainer_process_runs_a_dpo_job_end_to_end(micro_model_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    import os
    import subprocess
    import sys

    from gpu_worker.contract import parse_event

    write_jsonl(store, "files/train.jsonl", preference_rows(sentiment_rows, 8, openai=True))
    spec = make_spec(str(micro_model_dir), method="dpo", hyperparameters={"batch_size": 2, "n_epochs": 1}, runtime={"checkpoint_every_steps": 2})
    env = {**os.environ, "TUNEFORGE_STORAGE_URL": store.url, "TUNEFORGE_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    stderr = open(tmp_path / "trainer.stderr", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gpu_worker.train"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env)
    proc.stdin.write(spec.model_dump_json().encode() + b"\n")
    proc.stdin.flush()  # stdin stays open while the job runs: end-of-file means the agent died
    events = []
    for line in proc.stdout:
        events.append(parse_event(line))  # only JobEvents on stdout
        if events[-1].type in ("completed", "failed"):
            break
    code = proc.wait(timeout=60)  # before closing stdin, which would read as the agent's death
    proc.stdin.close()
    assert code == 0, (tmp_path / "trainer.stderr").read_text()[-2000:]
    assert [e.step for e in events if isinstance(e, MetricsEvent)] == [1, 2, 3, 4]
    assert [e.step for e in events if isinstance(e, CheckpointEvent)] == [2, 4]
    assert any(isinstance(e, LogEvent) and e.message.startswith("dpo step 4: ") for e in events)
    done = events[-1]
    assert isinstance(done, CompletedEvent) and done.steps == 4 and done.manifest.files == ("adapter_config.json", "adapter_model.safetensors", "reference_logits.safetensors")
    assert sorted(store.list(done.manifest.key + "/")) == [f"{done.manifest.key}/{f}" for f in done.manifest.files]


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["none", "nf4"], ids=["bf16", "qlora"])
def test_dpo_on_a_gpu_learns_with_kernels_in_bf16_and_over_an_nf4_base(quantization, builtin_data_dir, store, write_jsonl, sentiment_rows, make_spec):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    write_jsonl(store, "files/train.jsonl", preference_rows(sentiment_rows, 32))
    write_jsonl(store, "files/valid.jsonl", preference_rows(sentiment_rows, 16, seed=1))
    spec = _tiny_spec(make_spec, "dpo", quantization=quantization)
    spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"use_kernels": True})})
    rec = Recorder()
    result = recipe_for(spec.method)(spec, RunContext(store=store, data_dir=builtin_data_dir, emit=rec, device="cuda"))
    assert isinstance(result, CompletedEvent), rec.events[-3:]
    valid = [m.valid_loss for m in rec.of(MetricsEvent) if m.valid_loss is not None]
    assert valid[-1] < valid[0], valid
    margins = rec.method_metrics("rewards/margins")
    assert sum(margins[-4:]) / 4 > sum(margins[:4]) / 4, margins
    assert all(m.gpu_memory_gb for m in rec.of(MetricsEvent))


def test_a_dpo_job_leaves_the_adapter_its_reference_and_the_exports_it_asked_for(micro_model_dir, store, write_jsonl, sentiment_rows, make_spec):
    """Same tail as SFT: the PEFT adapter with the serving check's reference log-probs, and a merged
    model when the job asks for one."""
    write_jsonl(store, "files/train.jsonl", preference_rows(sentiment_rows, 6))
    write_jsonl(store, "files/valid.jsonl", preference_rows(sentiment_rows, 4, seed=1))
    spec = _micro_dpo(make_spec, micro_model_dir, export={"merged": True})
    _, result = run_job(spec, store, micro_model_dir.parent)
    assert "reference_logits.safetensors" in result.manifest.files
    kinds = {a.kind: a for a in result.artifacts}
    assert set(kinds) == {"adapter", "merged"}
    assert store.exists(f"{kinds['merged'].key}/model.safetensors")
