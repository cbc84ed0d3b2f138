"""GRPO: prompt rows read (with the rewards' reference fields), bad reward parameters refused before
any weight is loaded, sampling stops at the end-of-turn token, the built-in model's mean reward rises
on a learnable exact-match task, and a resumed run samples and trains like the uninterrupted one."""

from __future__ import annotations

import json

import pytest

from gpu_worker.contract import CheckpointEvent, CompletedEvent, DataFormat, LogEvent, MethodParams, MetricsEvent, Reward, StoppedEvent
from gpu_worker.data import DataError
from gpu_worker.data_preference import detect_format, load_examples
from gpu_worker.recipes import RunContext, recipe_for
from gpu_worker.recipes.rewards import MethodParamsError
from test_preference import Recorder, run_job  # same directory: pytest puts it on sys.path


@pytest.fixture
def tokenizer():
    from gpu_worker.builtin import build_tokenizer

    return build_tokenizer(2048)


def test_prompt_rows_keep_their_fields_and_chat_rows_their_answer(store, write_jsonl, tokenizer):
    write_jsonl(store, "p.jsonl", [
        {"prompt": "2+2?", "answer": "4", "id": 7},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]},
    ])
    assert detect_format(store, "p.jsonl") == DataFormat.prompt
    data = load_examples(store, "p.jsonl", tokenizer, DataFormat.prompt, max_seq_length=64, max_prompt_length=64, required_fields=("answer",))
    first, second = data.examples
    assert first.row == {"answer": "4", "id": 7} and second.row == {"answer": "6"}
    assert tokenizer.decode(list(second.prompt)).endswith("3+3?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "row, words",
    [
        ({"question": "2+2?", "answer": "4"}, "missing 'prompt' (or 'messages')"),
        ({"prompt": "2+2?"}, "missing field 'answer' that the exact_match reward compares with"),
        ({"messages": [{"role": "assistant", "content": "4"}]}, "must not end with an assistant message"),
    ],
)
def test_bad_prompt_rows_name_their_line(store, write_jsonl, tokenizer, row, words):
    write_jsonl(store, "p.jsonl", [{"prompt": "1+1?", "answer": "2"}, row])
    with pytest.raises(DataError) as err:
        load_examples(store, "p.jsonl", tokenizer, DataFormat.prompt, max_seq_length=64, required_fields=("answer",))
    assert err.value.line == 2 and words in str(err.value)


@pytest.mark.parametrize(
    "params, param",
    [
        ({"rewards": (Reward(kind="regex_match", pattern="[unclosed"),)}, "method_params.rewards[0].pattern"),
        ({"rewards": (Reward(kind="json_schema", json_schema={"type": 5}),)}, "method_params.rewards[0].json_schema"),
        ({"rewards": ()}, "method_params.rewards"),
        ({"rewards": (Reward(kind="exact_match"),), "grpo_max_completion_length": 128}, "method_params.grpo_max_completion_length"),
    ],
)
def test_bad_method_params_fail_at_job_start(store, make_spec, tmp_path, params, param):
    # The base model does not exist: the error must come before anything is loaded.
    spec = make_spec("/nonexistent/model", method="grpo", method_params=MethodParams(**params))
    with pytest.raises(MethodParamsError) as err:
        run_job(spec, store, tmp_path)
    event = err.value.to_event()
    assert event.code == "invalid_method_params" and event.param == param and event.message.startswith(param)


def _grpo_spec(make_spec, base, **params):
    mp = {"beta": 0.04, "grpo_num_generations": 4, "grpo_max_completion_length": 4, "grpo_temperature": 1.0, "rewards": (Reward(kind="exact_match"),)} | params
    return make_spec(base, method="grpo", method_params=MethodParams(**mp), hyperparameters={"batch_size": 2, "learning_rate": 3e-3, "max_seq_length": 64})


def test_sampling_stops_at_the_end_of_turn_and_respects_the_length_limit(micro_model_dir, store, write_jsonl, make_spec, tokenizer):
    import torch

    from gpu_worker.contract import AdapterConfig
    from gpu_worker.loading import load_model
    from gpu_worker.recipes.grpo import GRPOObjective
    from gpu_worker.recipes.model_setup import wrap_with_lora

    write_jsonl(store, "p.jsonl", [{"prompt": "Say one word.", "answer": "x"}, {"prompt": "Count to three please.", "answer": "x"}])
    objective = GRPOObjective(_grpo_spec(make_spec, str(micro_model_dir), grpo_max_completion_length=6))
    prompts = list(objective.load(store, tokenizer, "p.jsonl", "training_file").examples)
    model = wrap_with_lora(load_model(str(micro_model_dir), data_dir=".", device="cpu"), AdapterConfig(rank=4))
    # Make the end-of-turn token likely (p ~ 1/3 a token), so that some completions stop early.
    boost = torch.zeros(model.base_model.model.lm_head.out_features)
    boost[tokenizer.eos_token_id] = 7.0
    model.base_model.model.lm_head.register_forward_hook(lambda module, args, out: out + boost)
    torch.manual_seed(0)
    a = objective.sample(model, prompts, "cpu")
    torch.manual_seed(0)
    assert objective.sample(model, prompts, "cpu") == a  # the global generator drives sampling
    assert len(a) == 8 and all(1 <= len(c) <= 6 for c in a)
    for c in a:
        assert tokenizer.eos_token_id not in c[:-1]  # nothing after the end of the turn
        assert len(c) == 6 or c[-1] == tokenizer.eos_token_id
    assert any(len(c) < 6 for c in a)
    model.train()
    objective.sample(model, prompts, "cpu")
    assert model.training  # sampling runs without dropout and leaves the mode as it found it


def test_mean_reward_rises_on_a_learnable_exact_match_task(builtin_data_dir, store, write_jsonl, make_spec):
    """One prompt; the reference answer is a word the base model says now and then (its second most
    likely first token): GRPO must make it the usual answer within a few steps."""
    import torch

    from gpu_worker.builtin import TINY
    from gpu_worker.data_preference import encode_prompt
    from gpu_worker.loading import load_base_model

    model, tok = load_base_model(TINY, data_dir=builtin_data_dir, device="cpu")
    prompt = "Say one word."
    with torch.no_grad():
        logits = model(torch.tensor([encode_prompt(tok, [{"role": "user", "content": prompt}])])).logits[0, -1]
    target = tok.decode([logits.topk(2).indices[1].item()]).strip()
    assert target
    write_jsonl(store, "files/train.jsonl", [{"prompt": prompt, "answer": target}] * 8)
    write_jsonl(store, "files/valid.jsonl", [{"prompt": prompt, "answer": target}])
    spec = _grpo_spec(make_spec, TINY, grpo_num_generations=8, grpo_max_completion_length=1, grpo_temperature=0.3)
    spec = spec.model_copy(update={
        "hyperparameters": spec.hyperparameters.model_copy(update={"n_epochs": 4}),
        "data": spec.data.model_copy(update={"dedupe": False}),  # the repeated prompt is the point here
        "validation_file_key": "files/valid.jsonl",
    })
    rec, result = run_job(spec, store, builtin_data_dir)
    rewards = rec.method_metrics("reward")
    assert len(rewards) == 16 and rewards[0] < 0.4, rewards
    assert sum(rewards[-5:]) / 5 > 0.8, rewards
    assert rec.method_metrics("rewards/0:exact_match") == rewards  # one reward, weight 1
    assert all(m.valid_loss is None for m in rec.of(MetricsEvent))
    assert isinstance(result, CompletedEvent) and result.steps == 16
    # validation and the gate: the greedy answer of the base is its most likely word, not the target
    report = result.eval_report
    assert (report.base_reward, report.tuned_reward, report.passed) == (0.0, 1.0, True), report
    lines = [json.loads(e.message.split(": ", 1)[1]) for e in rec.of(LogEvent) if e.message.startswith("grpo step ")]
    assert [x["valid_reward"] for x in lines if "valid_reward" in x][-1] == 1.0  # evaluated at each epoch end


def test_resumed_grpo_run_samples_and_trains_like_the_uninterrupted_one(micro_model_dir, store, write_jsonl, make_spec, tmp_path):
    write_jsonl(store, "files/train.jsonl", [{"prompt": f"Say {w}.", "answer": w} for w in ("one", "two", "three", "four", "five", "six")])
    spec = _grpo_spec(make_spec, str(micro_model_dir), rewards=(Reward(kind="exact_match"), Reward(kind="regex_match", pattern="^ "), Reward(kind="length_penalty", target_length=2, scale=0.5)))
    spec = spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(update={"n_epochs": 2}), "adapter": spec.adapter.model_copy(update={"dropout": 0.1})})
    full, _ = run_job(spec, store, tmp_path)
    assert len(full.losses) == 6 and len(set(full.method_metrics("reward"))) > 1 and any(full.losses)

    first = Recorder()
    stopped = recipe_for(spec.method)(spec.model_copy(update={"output_prefix": "jobs/int"}), RunContext(store, tmp_path, first, lambda: len(first.of(MetricsEvent)) >= 2, "cpu"))
    assert isinstance(stopped, StoppedEvent) and stopped.step == 2 and first.of(CheckpointEvent)[-1].key == stopped.checkpoint_key
    resumed, result = run_job(spec.model_copy(update={"output_prefix": "jobs/int", "resume_from_key": stopped.checkpoint_key}), store, tmp_path)
    assert resumed.losses == full.losses[2:]
    assert resumed.method_metrics("completion_length") == full.method_metrics("completion_length")[2:]
    assert resumed.method_metrics("reward") == full.method_metrics("reward")[2:]
    assert isinstance(result, CompletedEvent) and result.steps == 6


@pytest.mark.gpu
def test_grpo_on_a_gpu_raises_the_mean_reward_with_kernels(builtin_data_dir, store, write_jsonl, make_spec):
    import torch

    from gpu_worker.builtin import TINY
    from gpu_worker.data_preference import encode_prompt
    from gpu_worker.loading import load_base_model

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, tok = load_base_model(TINY, data_dir=builtin_data_dir, device="cuda")
    with torch.no_grad():
        ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": "Say one word."}])], device="cuda")
        target = tok.decode([model(ids).logits[0, -1].topk(2).indices[1].item()]).strip()
    write_jsonl(store, "files/train.jsonl", [{"prompt": "Say one word.", "answer": target}] * 8)
    spec = _grpo_spec(make_spec, TINY, grpo_num_generations=8, grpo_max_completion_length=1, grpo_temperature=0.3)
    spec = spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(update={"n_epochs": 4}), "runtime": spec.runtime.model_copy(update={"use_kernels": True}),
                                   "data": spec.data.model_copy(update={"dedupe": False})})  # the repeated prompt is the point
    rec = Recorder()
    result = recipe_for(spec.method)(spec, RunContext(store=store, data_dir=builtin_data_dir, emit=rec, device="cuda"))
    assert isinstance(result, CompletedEvent), rec.events[-3:]
    rewards = rec.method_metrics("reward")
    assert sum(rewards[-5:]) / 5 > max(0.8, rewards[0]), rewards


def test_a_reward_that_is_not_finite_stops_the_step_with_a_clear_error(micro_model_dir, store, write_jsonl, make_spec,
                                                                      tokenizer, monkeypatch):
    """The contract bounds weights and scales so that rewards stay finite; if one still is not, the step
    refuses it (invalid_method_params) rather than train on a NaN loss until sampling crashes."""
    from gpu_worker.contract import AdapterConfig
    from gpu_worker.loading import load_model
    from gpu_worker.recipes.grpo import GRPOObjective
    from gpu_worker.recipes.model_setup import wrap_with_lora
    from gpu_worker.recipes.rewards import MethodParamsError

    write_jsonl(store, "p.jsonl", [{"prompt": "Say one word.", "answer": "x"}])
    objective = GRPOObjective(_grpo_spec(make_spec, str(micro_model_dir), grpo_max_completion_length=4))
    prompts = list(objective.load(store, tokenizer, "p.jsonl", "training_file").examples)
    model = wrap_with_lora(load_model(str(micro_model_dir), data_dir=".", device="cpu"), AdapterConfig(rank=4))
    monkeypatch.setattr(type(objective.rewards), "scored", lambda self, *a: (float("inf"), {"0:exact_match": float("inf")}))
    with pytest.raises(MethodParamsError, match="not finite") as err:
        objective.micro_step(model, prompts, len(prompts), "cpu")
    assert err.value.code == "invalid_method_params" and err.value.param == "method_params.rewards"
