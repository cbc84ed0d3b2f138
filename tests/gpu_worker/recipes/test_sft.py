"""The SFT recipe: it learns, it is deterministic, a resumed run replays the uninterrupted one, and
gradient accumulation equals one big batch."""

from __future__ import annotations

import pytest

from gpu_worker.contract import CheckpointEvent, CompletedEvent, LogEvent, MetricsEvent, StoppedEvent
from gpu_worker.recipes import RunContext
from gpu_worker.recipes.schedule import lr_at
from gpu_worker.recipes.sft import run


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


def _run(spec, store, data_dir, should_stop=lambda: False):
    rec = Recorder()
    result = run(spec, RunContext(store=store, data_dir=data_dir, emit=rec, should_stop=should_stop, device="cpu"))
    assert rec.events[-1] is result
    return rec, result


def test_lr_schedule_warms_up_then_decays_and_never_reaches_zero():
    lrs = [lr_at(s, peak=1.0, warmup_steps=4, total_steps=20) for s in range(1, 21)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(1 / 16) and min(lrs) > 0
    assert [lr_at(s, peak=2.0, warmup_steps=0, total_steps=2) for s in (1, 2)] == [2.0, 1.0]


def test_builtin_model_learns_the_demo_task(builtin_data_dir, store, write_jsonl, sentiment_rows, make_spec):
    from gpu_worker.builtin import TINY

    write_jsonl(store, "files/train.jsonl", sentiment_rows(64))
    write_jsonl(store, "files/valid.jsonl", sentiment_rows(16, seed=1))
    spec = make_spec(TINY, validation_file_key="files/valid.jsonl", hyperparameters={"n_epochs": 4, "batch_size": 8, "learning_rate": 3e-3})
    rec, result = _run(spec, store, builtin_data_dir)
    metrics = rec.of(MetricsEvent)
    assert [m.step for m in metrics] == list(range(1, 33)) and {m.total_steps for m in metrics} == {32}
    first, last = sum(rec.losses[:3]) / 3, sum(rec.losses[-4:]) / 4
    assert last < 0.5 * first, rec.losses
    valid = [m.valid_loss for m in metrics if m.valid_loss is not None]
    assert len(valid) == 4 and valid[-1] < valid[0]  # once per epoch (the last one is the end)
    tokens = [m.tokens for m in metrics]
    assert tokens == sorted(tokens) and isinstance(result, CompletedEvent) and result.trained_tokens == tokens[-1]
    assert metrics[-1].epoch == pytest.approx(4.0)


def _micro_spec(make_spec, micro_model_dir, **overrides):
    hp = {"n_epochs": 3, "batch_size": 2, "learning_rate": 5e-3, "warmup_ratio": 0.2} | overrides.pop("hyperparameters", {})
    return make_spec(str(micro_model_dir), adapter={"rank": 4, "alpha": 8.0, "dropout": 0.1} | overrides.pop("adapter", {}), hyperparameters=hp, **overrides)


@pytest.fixture
def micro_files(store, write_jsonl, sentiment_rows):
    write_jsonl(store, "files/train.jsonl", sentiment_rows(10))
    write_jsonl(store, "files/valid.jsonl", sentiment_rows(4, seed=3))
    return store


def test_same_seed_same_losses_other_seed_other_losses(micro_files, micro_model_dir, make_spec, tmp_path):
    spec = _micro_spec(make_spec, micro_model_dir)
    a, _ = _run(spec, micro_files, tmp_path)
    b, _ = _run(spec.model_copy(update={"output_prefix": "jobs/again"}), micro_files, tmp_path)
    c, _ = _run(spec.model_copy(update={"seed": 8, "output_prefix": "jobs/other"}), micro_files, tmp_path)
    assert len(a.losses) == 15 and a.losses == b.losses
    assert a.losses != c.losses


# 10 examples in batches of 2: 5 steps an epoch, or 3 with accumulation 2 (the third of one batch).
# k is off the checkpoint schedule (every 5) and, mid-step, followed by a step of two micro-batches.
@pytest.mark.parametrize("accumulation, stop_polls, k", [(1, 1, 8), (2, 3, 4)], ids=["after-a-step", "mid-step"])
def test_resumed_run_replays_the_uninterrupted_one(micro_files, micro_model_dir, make_spec, tmp_path, accumulation, stop_polls, k):
    """torchtune-style: N steps straight; k steps, stop, resume -> steps k+1..N have the same losses."""
    spec = _micro_spec(
        make_spec, micro_model_dir, validation_file_key="files/valid.jsonl",
        hyperparameters={"gradient_accumulation_steps": accumulation}, runtime={"eval_every_steps": 2, "checkpoint_every_steps": 5},
    )
    full, full_result = _run(spec, micro_files, tmp_path)
    n = len(full.losses)
    assert n == 15 // accumulation + (accumulation == 2) * 2  # 15 or 9

    # Stop once step k is done: `stop_polls` polls later, i.e. right after the step, or after the
    # first micro-batch of step k+1 (that half step must be thrown away, its random draws too).
    first = Recorder()
    polls = []

    def should_stop():
        if len(first.of(MetricsEvent)) >= k:
            polls.append(1)
        return len(polls) >= stop_polls

    stopped = run(spec.model_copy(update={"output_prefix": "jobs/interrupted"}), RunContext(micro_files, tmp_path, first, should_stop, "cpu"))
    assert isinstance(stopped, StoppedEvent) and stopped.step == k
    assert first.of(CheckpointEvent)[-1].key == stopped.checkpoint_key == f"jobs/interrupted/checkpoints/step-{k:06d}"
    assert first.losses == full.losses[:k]

    resumed, result = _run(spec.model_copy(update={"output_prefix": "jobs/interrupted", "resume_from_key": stopped.checkpoint_key}), micro_files, tmp_path)
    assert [m.step for m in resumed.of(MetricsEvent)] == list(range(k + 1, n + 1))
    assert resumed.losses == full.losses[k:]
    full_valid = [m.valid_loss for m in full.of(MetricsEvent)][k:]
    assert [m.valid_loss for m in resumed.of(MetricsEvent)] == full_valid
    assert isinstance(result, CompletedEvent) and result.steps == n
    assert result.trained_tokens == full.events[-1].trained_tokens
    # The best-checkpoint bookkeeping survives the interruption: same best step, same final adapter.
    assert result.best_step == full_result.best_step is not None
    adapter = "adapter/adapter_model.safetensors"
    assert micro_files.get_bytes(f"jobs/interrupted/{adapter}") == micro_files.get_bytes(f"jobs/ftjob-test/{adapter}")
    assert result.eval_report == full_result.eval_report


def test_gradient_accumulation_equals_one_big_batch(micro_files, micro_model_dir, make_spec, tmp_path):
    big = _micro_spec(make_spec, micro_model_dir, adapter={"dropout": 0.0}, hyperparameters={"batch_size": 4, "n_epochs": 1})
    small = big.model_copy(update={"hyperparameters": big.hyperparameters.model_copy(update={"batch_size": 2, "gradient_accumulation_steps": 2}), "output_prefix": "jobs/acc"})
    a, _ = _run(big, micro_files, tmp_path)
    b, _ = _run(small, micro_files, tmp_path)
    assert len(a.losses) == len(b.losses) == 3
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    assert [m.tokens for m in a.of(MetricsEvent)] == [m.tokens for m in b.of(MetricsEvent)]


def test_kernels_on_and_off_train_the_same(micro_files, micro_model_dir, make_spec, tmp_path):
    off = _micro_spec(make_spec, micro_model_dir, adapter={"dropout": 0.0}, hyperparameters={"n_epochs": 1})
    on = off.model_copy(update={"runtime": off.runtime.model_copy(update={"use_kernels": True}), "output_prefix": "jobs/kernels"})
    a, _ = _run(off, micro_files, tmp_path)
    b, _ = _run(on, micro_files, tmp_path)
    assert a.losses == pytest.approx(b.losses, rel=1e-4)
    assert any(isinstance(e, LogEvent) and "kernels" in e.message.lower() for e in b.events)


def test_checkpoints_land_on_schedule_and_the_adapter_at_the_end(micro_files, micro_model_dir, make_spec, tmp_path):
    from gpu_worker.checkpoint import is_complete

    spec = _micro_spec(make_spec, micro_model_dir, runtime={"checkpoint_every_steps": 4})
    rec, result = _run(spec, micro_files, tmp_path)
    steps = [e.step for e in rec.of(CheckpointEvent)]
    assert steps == [4, 8, 12, 15]
    assert all(is_complete(micro_files, e.key) for e in rec.of(CheckpointEvent))
    manifest = result.manifest
    assert manifest.key == "jobs/ftjob-test/adapter" and manifest.files == ("adapter_config.json", "adapter_model.safetensors", "reference_logits.safetensors")
    assert sorted(micro_files.list("jobs/ftjob-test/adapter/")) == [f"{manifest.key}/{f}" for f in manifest.files]
    # Every event before the CheckpointEvent: its files were complete when it was announced.
    assert rec.events.index(rec.of(CheckpointEvent)[-1]) < rec.events.index(result)


@pytest.mark.parametrize("with_validation", [True, False])
def test_fp8_reports_each_loss_in_bf16_beside_it(micro_files, micro_model_dir, make_spec, tmp_path, with_validation):
    # FP8 runs emulated on CPU (tuneforge_kernels.fp8): the events say how many projections took it and what
    # it changed in each validation loss (without a validation set: in the first batch's loss, once)
    over = {"validation_file_key": "files/valid.jsonl"} if with_validation else {}
    bf16 = _micro_spec(make_spec, micro_model_dir, adapter={"dropout": 0.0}, hyperparameters={"n_epochs": 1},
                       runtime={"use_kernels": True}, **over)
    fp8 = bf16.model_copy(update={"runtime": bf16.runtime.model_copy(update={"fp8": True}), "output_prefix": "jobs/fp8"})
    a, _ = _run(bf16, micro_files, tmp_path)
    b, done = _run(fp8, micro_files, tmp_path)
    assert isinstance(done, CompletedEvent)
    messages = [e.message for e in b.of(LogEvent)]
    assert any(m.startswith("FP8: 14 frozen projections") for m in messages), messages
    reports = [m for m in messages if m.startswith("FP8 against bf16")]
    evals = [m for m in b.of(MetricsEvent) if m.valid_loss is not None]
    assert len(reports) == (len(evals) if with_validation else 1) and reports
    if with_validation:
        assert f"{evals[-1].valid_loss:.4f} with FP8 GEMMs" in reports[-1]
    # the FP8 run trains the same adapters within its rounding: its losses stay near bf16's
    assert b.losses == pytest.approx(a.losses, rel=5e-2)
    assert not any("FP8" in e.message for e in a.of(LogEvent))
