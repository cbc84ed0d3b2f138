"""The multi-GPU worker on 2 CPU ranks (DeepSpeed's CPU accelerator over gloo): the trainer process
launched with a placement gives the single-GPU worker's losses, events, checkpoints and artifacts;
a cancel reaches every rank and checkpoints; a resumed run (on 2 ranks, or on the single-GPU
worker) replays the uninterrupted one.

Tolerance: the 2-rank and 1-process runs do the same float32 arithmetic in a different order
(gloo sums two partial gradients; ZeRO's AdamW runs over flat shards): the losses measured agree to
~1e-7 relative over 12 steps, so ``rtol=1e-5`` is two orders of margin, and still far below any real
divergence (a wrong loss scale or a lost micro-batch moves the second step's loss by >1e-2).

The first run on a machine builds DeepSpeed's CPU shared-memory op with ninja (~1-2 min on 2 busy
cores; cached in ~/.cache/torch_extensions); afterwards a 2-rank run of the micro model takes ~25 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_worker.contract import (
    AdapterConfig,
    AdapterType,
    CheckpointEvent,
    DataOptions,
    EvalOptions,
    Hyperparameters,
    JobSpec,
    Runtime,
    CompletedEvent,
    Distributed,
    FailedEvent,
    LogEvent,
    MetricsEvent,
    StoppedEvent,
    parse_event,
)
from gpu_worker.recipes import RunContext
from gpu_worker.recipes.sft import run

deepspeed = pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

RTOL = 1e-5


def _spec(model_dir, prefix: str, *, ranks: int = 0, stage: int = 2, full: bool = False, **overrides) -> JobSpec:
    runtime = {"checkpoint_every_steps": 4, "use_kernels": False}
    if ranks:
        runtime["distributed"] = Distributed(gpus_per_node=ranks, zero_stage=stage, micro_batch_size=2)
    # 13 examples, 3 × 2 a step: the last step of each epoch has one example, so rank 1 runs a
    # weight-0 pass there; train_on_inputs gives every token a loss (more arithmetic to compare).
    fields = dict(
        job_id="ftjob-ds", org_id="org-test", base_model=str(model_dir), seed=7, training_file_key="files/train.jsonl",
        output_prefix=prefix, data=DataOptions(train_on_inputs=True),
        hyperparameters=Hyperparameters(n_epochs=4, batch_size=3, gradient_accumulation_steps=2, learning_rate=5e-3, warmup_ratio=0.1, max_seq_length=128),
        adapter=AdapterConfig(rank=4, alpha=8.0, type=AdapterType.full if full else AdapterType.lora),
        runtime=Runtime(**runtime), evaluation=EvalOptions(gate=False),
    )
    return JobSpec(**(fields | overrides))


class _Trainer:
    """``python -m gpu_worker.train`` as the worker agent runs it; stdout must be JobEvents only."""

    def __init__(self, spec, store, data_dir: Path, stderr: Path):
        env = {**os.environ, "TUNEFORGE_STORAGE_URL": store.url, "TUNEFORGE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "TUNEFORGE_TORCH_THREADS": "1"}
        self.stderr = stderr
        self.proc = subprocess.Popen([sys.executable, "-m", "gpu_worker.train"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(stderr, "wb"), env=env)
        self.proc.stdin.write((spec.model_dump_json() + "\n").encode())
        self.proc.stdin.flush()
        self.events = []

    def events_until_end(self, on_event=lambda e: None, timeout: float = 400) -> int:
        for line in self.proc.stdout:
            event = parse_event(line)  # anything else on stdout fails the test
            self.events.append(event)
            on_event(event)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc.stdin.close()

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]

    def losses(self) -> list[float]:
        return [e.train_loss for e in self.of(MetricsEvent)]

    def log_tail(self) -> str:
        return self.stderr.read_text(errors="replace")[-4000:]


def _in_process(spec, store, data_dir):
    events = []
    result = run(spec, RunContext(store=store, data_dir=data_dir, emit=events.append, device="cpu"))
    return events, result


def _losses(events):
    return [e.train_loss for e in events if isinstance(e, MetricsEvent)]


def make_store(root: Path):
    """An object store holding the 13 training examples every test here trains on."""
    from gpu_worker.storage import LocalStore
    from scheduler.demo_data import make_dataset

    store = LocalStore(root)
    rows, _, _ = make_dataset(13, 0, 0, 0)
    store.put_bytes("files/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return store


@pytest.fixture(scope="module")
def ds_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("ds-objects"))


@pytest.fixture(scope="module")
def two_rank_lora(ds_store, micro_model_dir, tmp_path_factory):
    """One uninterrupted 2-rank ZeRO-2 LoRA run through the trainer process, shared by the tests."""
    spec = _spec(micro_model_dir, "jobs/ds2", ranks=2)
    tmp = tmp_path_factory.mktemp("ds2")
    trainer = _Trainer(spec, ds_store, tmp, tmp / "stderr")
    code = trainer.events_until_end()
    assert code == 0 and isinstance(trainer.events[-1], CompletedEvent), trainer.log_tail()
    return spec, trainer



def test_two_ranks_train_the_single_gpu_job(two_rank_lora, ds_store, micro_model_dir, tmp_path):
    from safetensors.torch import load_file

    spec, trainer = two_rank_lora
    single_events, single = _in_process(_spec(micro_model_dir, "jobs/single"), ds_store, tmp_path)
    assert len(trainer.losses()) == 12
    assert trainer.losses() == pytest.approx(_losses(single_events), rel=RTOL)
    assert trainer.losses()[-1] < 0.95 * trainer.losses()[0]  # it learns (7.08 -> 6.36 measured)
    # Rank 0 alone reports: one event per step and per checkpoint, one setup log, one result.
    assert [m.step for m in trainer.of(MetricsEvent)] == list(range(1, 13))
    assert [c.step for c in trainer.of(CheckpointEvent)] == [4, 8, 12]
    assert sum(e.message.startswith("Training 12 steps") and "2 rank(s), DeepSpeed ZeRO-2" in e.message for e in trainer.of(LogEvent)) == 1
    done = trainer.events[-1]
    assert done.trained_tokens == single.trained_tokens and done.steps == 12
    assert done.manifest.files == single.manifest.files and [a.kind for a in done.artifacts] == [a.kind for a in single.artifacts]
    # The same adapter, written once, in the same place of the job's prefix.
    ds_adapter = load_file(Path(ds_store.root, done.manifest.key, "adapter_model.safetensors"))
    one_adapter = load_file(Path(ds_store.root, single.manifest.key, "adapter_model.safetensors"))
    assert ds_adapter.keys() == one_adapter.keys()
    for name in ds_adapter:
        assert ds_adapter[name].allclose(one_adapter[name], rtol=1e-4, atol=1e-6), name
    # The checkpoint has the single-GPU layout, plus rank 1's random state.
    state = json.loads(Path(ds_store.root, "jobs/ds2/checkpoints/step-000004/trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rank_rng"]) == 1
    assert sorted(os.listdir(Path(ds_store.root, "jobs/ds2/checkpoints/step-000004"))) == sorted(
        os.listdir(Path(ds_store.root, "jobs/single/checkpoints/step-000004")))


def test_cancel_reaches_every_rank_and_the_resumed_run_replays_the_uninterrupted_one(two_rank_lora, ds_store, micro_model_dir, tmp_path):
    spec, full_run = two_rank_lora
    reference = full_run.losses()
    stopped_spec = spec.model_copy(update={"output_prefix": "jobs/ds2-stop"})
    trainer = _Trainer(stopped_spec, ds_store, tmp_path, tmp_path / "stop.stderr")
    # SIGTERM (the agent's cancel) as soon as the first step is reported.
    code = trainer.events_until_end(lambda e: isinstance(e, MetricsEvent) and e.step == 1 and trainer.proc.send_signal(signal.SIGTERM))
    stopped = trainer.events[-1]
    assert code == 0 and isinstance(stopped, StoppedEvent), trainer.log_tail()
    assert 1 <= stopped.step < 12 and stopped.checkpoint_key == trainer.of(CheckpointEvent)[-1].key
    assert trainer.losses() == pytest.approx(reference[: stopped.step], rel=RTOL)

    # Resumed on 2 ranks: the remaining steps are the uninterrupted run's.
    resumed = _Trainer(stopped_spec.model_copy(update={"resume_from_key": stopped.checkpoint_key}), ds_store, tmp_path, tmp_path / "resume.stderr")
    assert resumed.events_until_end() == 0 and isinstance(resumed.events[-1], CompletedEvent), resumed.log_tail()
    assert [m.step for m in resumed.of(MetricsEvent)] == list(range(stopped.step + 1, 13))
    assert resumed.losses() == pytest.approx(reference[stopped.step :], rel=RTOL)

    # The same checkpoint resumes on the single-GPU worker too (one layout for both).
    single_spec = _spec(micro_model_dir, "jobs/ds2-stop", resume_from_key=stopped.checkpoint_key)
    events, result = _in_process(single_spec, ds_store, tmp_path)
    assert isinstance(result, CompletedEvent)
    assert _losses(events) == pytest.approx(reference[stopped.step :], rel=RTOL)


@pytest.mark.parametrize("full", [True, False], ids=["full", "lora"])
def test_zero3_on_two_ranks_matches_one_process(ds_store, micro_model_dir, tmp_path, full):
    """ZeRO-3 shards the weights: full fine-tuning, and adapters too big for ZeRO-2. The saved
    result is whole (gathered from the shards) and is the trained one; a checkpoint of the
    single-GPU worker resumes on the shards."""
    from safetensors.torch import load_file

    kind = "full" if full else "lora"
    spec = _spec(micro_model_dir, f"jobs/ds3-{kind}", ranks=2, stage=3, full=full)
    trainer = _Trainer(spec, ds_store, tmp_path, tmp_path / "z3.stderr")
    assert trainer.events_until_end() == 0 and isinstance(trainer.events[-1], CompletedEvent), trainer.log_tail()
    single_events, single = _in_process(_spec(micro_model_dir, f"jobs/one-{kind}", full=full), ds_store, tmp_path)
    assert trainer.losses() == pytest.approx(_losses(single_events), rel=RTOL)
    assert any("2 rank(s), DeepSpeed ZeRO-3" in e.message for e in trainer.of(LogEvent))
    done = trainer.events[-1]
    assert done.manifest.key.endswith("/model" if full else "/adapter") and done.manifest.files == single.manifest.files
    weights = "model.safetensors" if full else "adapter_model.safetensors"
    ds_weights = load_file(Path(ds_store.root, done.manifest.key, weights))
    one_weights = load_file(Path(ds_store.root, single.manifest.key, weights))
    assert ds_weights.keys() == one_weights.keys()
    # Adam divides by the root of tiny second moments, so float32 noise in near-zero gradients moves
    # a weight by up to ~3e-6 (measured); 1e-5 is still 1/500 of one step's largest update (lr 5e-3).
    for name in ds_weights:
        assert ds_weights[name].shape == one_weights[name].shape and ds_weights[name].allclose(one_weights[name], rtol=0, atol=1e-5), name
    if full:
        # The single-GPU worker's checkpoint resumes on 2 ZeRO-3 ranks: moments go into the shards.
        resumed = _Trainer(spec.model_copy(update={"output_prefix": "jobs/ds3-resumed", "resume_from_key": "jobs/one-full/checkpoints/step-000004"}),
                           ds_store, tmp_path, tmp_path / "z3-resume.stderr")
        assert resumed.events_until_end() == 0 and isinstance(resumed.events[-1], CompletedEvent), resumed.log_tail()
        assert resumed.losses() == pytest.approx(_losses(single_events)[4:], rel=RTOL)


def test_zero3_with_the_optimizer_in_host_memory(ds_store, micro_model_dir, tmp_path):
    """Offload trains with DeepSpeed's CPU Adam (a C++ op ninja builds on first use, ~3 min on 2
    busy cores, then cached): its vectorised AdamW agrees with torch's within the same tolerance."""
    spec = _spec(micro_model_dir, "jobs/ds3-offload", ranks=2, stage=3, full=True)
    spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"distributed": spec.runtime.distributed.model_copy(update={"offload_optimizer": True})})})
    trainer = _Trainer(spec, ds_store, tmp_path, tmp_path / "offload.stderr")
    assert trainer.events_until_end() == 0 and isinstance(trainer.events[-1], CompletedEvent), trainer.log_tail()
    single_events, _ = _in_process(_spec(micro_model_dir, "jobs/one-full-offload-ref", full=True), ds_store, tmp_path)
    assert trainer.losses() == pytest.approx(_losses(single_events), rel=RTOL)


def test_evaluation_best_checkpoint_and_gate_on_two_ranks(ds_store, micro_model_dir, tmp_path):
    """Every rank evaluates and rank 0's numbers decide (best checkpoint, early stopping); rank 0
    alone runs the eval gate and the save phase: the same validation losses, exact match, best step
    and report as one process."""
    from scheduler.demo_data import make_dataset

    _, valid_rows, _ = make_dataset(0, 6, 0, 5)
    ds_store.put_bytes("files/valid.jsonl", "".join(json.dumps(r) + "\n" for r in valid_rows).encode())
    common = dict(validation_file_key="files/valid.jsonl", evaluation=EvalOptions(gate=True, keep_best=True, early_stopping_patience=2))
    spec = _spec(micro_model_dir, "jobs/ds2-eval", ranks=2, **common).model_copy(
        update={"data": DataOptions(train_on_inputs=False)})
    trainer = _Trainer(spec, ds_store, tmp_path, tmp_path / "eval.stderr")
    assert trainer.events_until_end() == 0 and isinstance(trainer.events[-1], CompletedEvent), trainer.log_tail()
    one = spec.model_copy(update={"output_prefix": "jobs/one-eval", "runtime": spec.runtime.model_copy(update={"distributed": None})})
    events, single = _in_process(one, ds_store, tmp_path)
    ds_metrics, one_metrics = trainer.of(MetricsEvent), [e for e in events if isinstance(e, MetricsEvent)]
    assert [m.step for m in ds_metrics] == [m.step for m in one_metrics]
    evaluated = [m.step for m in ds_metrics if m.valid_loss is not None]
    assert evaluated == [m.step for m in one_metrics if m.valid_loss is not None] and len(evaluated) >= 2
    assert [m.valid_loss for m in ds_metrics if m.valid_loss is not None] == pytest.approx(
        [m.valid_loss for m in one_metrics if m.valid_loss is not None], rel=RTOL)
    assert [m.exact_match for m in ds_metrics] == [m.exact_match for m in one_metrics]
    done = trainer.events[-1]
    assert done.best_step == single.best_step and done.eval_report.passed == single.eval_report.passed
    assert done.eval_report.tuned_valid_loss == pytest.approx(single.eval_report.tuned_valid_loss, rel=RTOL)
    assert done.eval_report.base_valid_loss == pytest.approx(single.eval_report.base_valid_loss, rel=RTOL)


def test_dpo_on_two_ranks_matches_one_process(ds_store, micro_model_dir, tmp_path):
    """The preference loop shares the engine: DPO's step loss is already a mean over the step's
    pairs, so the ranks' shares add up to one process's loss (the reference is the adapter off)."""
    from gpu_worker.contract import Method
    from gpu_worker.recipes import recipe_for
    from scheduler.demo_data import make_dataset

    rows = [{"prompt": r["messages"][:-1], "chosen": f"I think it is {r['messages'][-1]['content']}, thank you.", "rejected": "No."}
            for r in make_dataset(13, 0, 0, 0)[0]]
    ds_store.put_bytes("files/pref.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    spec = _spec(micro_model_dir, "jobs/ds2-dpo", ranks=2, method=Method.dpo, training_file_key="files/pref.jsonl", data=DataOptions())
    trainer = _Trainer(spec, ds_store, tmp_path, tmp_path / "dpo.stderr")
    assert trainer.events_until_end() == 0 and isinstance(trainer.events[-1], CompletedEvent), trainer.log_tail()
    one = spec.model_copy(update={"output_prefix": "jobs/one-dpo", "runtime": spec.runtime.model_copy(update={"distributed": None})})
    events = []
    assert isinstance(recipe_for(Method.dpo)(one, RunContext(store=ds_store, data_dir=tmp_path, emit=events.append, device="cpu")), CompletedEvent)
    assert trainer.losses() == pytest.approx(_losses(events), rel=RTOL) and len(trainer.losses()) == 12
    assert trainer.losses()[-1] < trainer.losses()[0]


def test_a_failing_job_reports_one_failed_event(ds_store, micro_model_dir, tmp_path):
    """A bad training file fails on every rank; rank 0's FailedEvent is the one the agent sees."""
    spec = _spec(micro_model_dir, "jobs/ds-bad", ranks=2, training_file_key="files/missing.jsonl")
    trainer = _Trainer(spec, ds_store, tmp_path, tmp_path / "bad.stderr")
    assert trainer.events_until_end() == 1, trainer.log_tail()
    failed = trainer.of(FailedEvent)
    assert len(failed) == 1 and failed[0] is trainer.events[-1] and failed[0].code == "invalid_training_file", trainer.events
