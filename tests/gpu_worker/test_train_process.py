"""The trainer process protocol end to end: spec on stdin, only JobEvents on stdout, SIGTERM saves and
stops, stdin EOF exits at once, failures are FailedEvents with the right code and exit status."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from gpu_worker.contract import CheckpointEvent, CompletedEvent, FailedEvent, MetricsEvent, StoppedEvent, parse_event
from gpu_worker.train import EXIT_FAILED, EXIT_OK, EXIT_ORPHANED, EXIT_USAGE


class Trainer:
    """A ``python -m gpu_worker.train`` child; every stdout line must parse as a JobEvent."""

    def __init__(self, spec_line: str, *, store, data_dir, tmp_path):
        env = {
            **os.environ,
            "TUNEFORGE_STORAGE_URL": store.url,
            "TUNEFORGE_DATA_DIR": str(data_dir),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",  # see tests/gpu_worker/conftest.py
        }
        self.stderr_path = tmp_path / "trainer.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_worker.train"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "wb"), env=env,
        )
        self.events: list = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.proc.stdin.write(spec_line.encode() + b"\n")
        self.proc.stdin.flush()

    def _pump(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next_event(self, timeout: float = 120):
        line = self._lines.get(timeout=timeout)
        if line is None:
            return None
        event = parse_event(line)  # raises on anything that is not a JobEvent
        self.events.append(event)
        return event

    def wait_for(self, kind, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while (event := self.next_event(max(deadline - time.monotonic(), 0.01))) is not None:
            if isinstance(event, kind):
                return event
        raise AssertionError(f"no {kind.__name__}; events: {self.events}\n{self.stderr()}")

    def finish(self, timeout: float = 120) -> int:
        while self.next_event(timeout) is not None:
            pass
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def trainer(store, tmp_path):
    started = []

    def start(spec_line: str, data_dir):
        started.append(Trainer(spec_line, store=store, data_dir=data_dir, tmp_path=tmp_path))
        return started[-1]

    yield start
    for t in started:
        t.kill()


def test_trains_and_delivers_a_loadable_adapter(trainer, store, builtin_data_dir, write_jsonl, sentiment_rows, make_spec, tmp_path):
    import torch
    from peft import PeftModel

    from gpu_worker.builtin import TINY
    from gpu_worker.loading import load_base_model
    from gpu_worker.storage import get_dir

    write_jsonl(store, "files/train.jsonl", sentiment_rows(16))
    spec = make_spec(TINY, runtime={"use_kernels": True, "checkpoint_every_steps": 2})
    t = trainer(spec.model_dump_json(), builtin_data_dir)
    assert t.finish() == EXIT_OK, t.stderr()
    done = t.events[-1]
    assert isinstance(done, CompletedEvent) and done.steps == 4
    assert [e.step for e in t.events if isinstance(e, MetricsEvent)] == [1, 2, 3, 4]
    assert [e.step for e in t.events if isinstance(e, CheckpointEvent)] == [2, 4]

    folder = tmp_path / "adapter"
    get_dir(store, done.manifest.key, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(done.manifest.files)
    base, tok = load_base_model(TINY, data_dir=builtin_data_dir, device="cpu")
    ids = torch.tensor([tok("Review: The food was great.")["input_ids"]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, folder)
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after)  # the adapter learned something


def _long_job(make_spec, micro_model_dir):
    return make_spec(str(micro_model_dir), hyperparameters={"n_epochs": 100, "batch_size": 2}, runtime={"checkpoint_every_steps": 10_000})


def test_sigterm_saves_a_checkpoint_and_stops(trainer, store, micro_model_dir, write_jsonl, sentiment_rows, make_spec, tmp_path):
    from gpu_worker.checkpoint import is_complete

    write_jsonl(store, "files/train.jsonl", sentiment_rows(8))
    t = trainer(_long_job(make_spec, micro_model_dir).model_dump_json(), tmp_path)
    t.wait_for(MetricsEvent)
    signalled = time.monotonic()
    t.proc.send_signal(signal.SIGTERM)
    assert t.finish(timeout=30) == EXIT_OK, t.stderr()
    assert time.monotonic() - signalled < 15
    stopped, saved = t.events[-1], t.events[-2]
    assert isinstance(stopped, StoppedEvent) and isinstance(saved, CheckpointEvent)
    assert stopped.checkpoint_key == saved.key and saved.step == stopped.step >= 1
    assert stopped.step < 400 and is_complete(store, saved.key)


def test_stdin_eof_means_the_agent_died(trainer, store, micro_model_dir, write_jsonl, sentiment_rows, make_spec, tmp_path):
    write_jsonl(store, "files/train.jsonl", sentiment_rows(8))
    t = trainer(_long_job(make_spec, micro_model_dir).model_dump_json(), tmp_path)
    t.wait_for(MetricsEvent)
    closed = time.monotonic()
    t.proc.stdin.close()
    assert t.finish(timeout=30) == EXIT_ORPHANED
    assert time.monotonic() - closed < 10
    assert not [e for e in t.events if isinstance(e, (CheckpointEvent, StoppedEvent, FailedEvent, CompletedEvent))]


def test_bad_training_file_fails_naming_the_line(trainer, store, micro_model_dir, write_jsonl, sentiment_rows, make_spec, tmp_path):
    write_jsonl(store, "files/train.jsonl", sentiment_rows(3) + ['{"messages": "oops"}'])
    t = trainer(make_spec(str(micro_model_dir)).model_dump_json(), tmp_path)
    assert t.finish() == EXIT_FAILED
    failed = t.events[-1]
    assert isinstance(failed, FailedEvent) and failed.code == "invalid_training_file" and failed.param == "training_file"
    assert failed.message.startswith("line 4:")


def test_unknown_model_fails_with_model_load_failed(trainer, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    write_jsonl(store, "files/train.jsonl", sentiment_rows(3))
    t = trainer(make_spec("no-such-org/no-such-model").model_dump_json(), tmp_path)
    assert t.finish() == EXIT_FAILED
    failed = t.events[-1]
    assert isinstance(failed, FailedEvent) and failed.code == "model_load_failed"
    assert "no-such-org/no-such-model" in failed.message


def test_unreadable_spec_is_refused(trainer, tmp_path):
    t = trainer('{"job_id": "x"}', tmp_path)
    assert t.finish() == EXIT_USAGE
    assert [e.code for e in t.events] == ["invalid_job_spec"]
