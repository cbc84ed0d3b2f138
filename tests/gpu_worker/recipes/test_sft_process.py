"""SFT variants through the trainer process (``python -m gpu_worker.train``): every event a rich job
produces (eval metrics, artifacts, eval report, best step) crosses the JSON-lines protocol, and the
recipe's own failures reach the agent as FailedEvents with their codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gpu_worker.contract import CompletedEvent, FailedEvent, MetricsEvent, parse_event

try:
    import llama_cpp  # noqa: F401
except ImportError:  # pragma: no cover
    llama_cpp = None


def _trainer(spec, store, data_dir, timeout=180):
    env = {**os.environ, "TUNEFORGE_STORAGE_URL": store.url, "TUNEFORGE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gpu_worker.train"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdin.write(spec.model_dump_json().encode() + b"\n")
    proc.stdin.flush()  # stdin stays open: its end would mean the agent died
    try:
        out = proc.stdout.read()
        code = proc.wait(timeout=timeout)
        err = proc.stderr.read().decode(errors="replace")
    finally:
        proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
    return code, [parse_event(line) for line in out.splitlines()], err


@pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (GGUF verification)")
def test_a_dora_job_with_eval_gate_loggers_and_gguf_completes(store, write_jsonl, sentiment_rows, micro_model_dir, make_spec, tmp_path):
    write_jsonl(store, "files/train.jsonl", sentiment_rows(16))
    write_jsonl(store, "files/valid.jsonl", sentiment_rows(4, seed=5))
    spec = make_spec(str(micro_model_dir), adapter={"type": "dora", "use_rslora": True}, validation_file_key="files/valid.jsonl",
                     hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate": 1e-2, "lr_scheduler": "cosine", "warmup_ratio": 0.1},
                     runtime={"eval_every_steps": 4, "checkpoint_every_steps": 4}, integrations={"tensorboard": True},
                     export={"merged": True, "gguf": ["q8_0"]})
    code, events, err = _trainer(spec, store, tmp_path)
    assert code == 0, err[-3000:]
    done = events[-1]
    assert isinstance(done, CompletedEvent)
    assert {a.kind for a in done.artifacts} == {"adapter", "merged", "gguf", "modelfile", "report"}
    assert done.eval_report.passed and done.eval_report.examples == 4
    evals = [m for m in events if isinstance(m, MetricsEvent) and m.valid_loss is not None]
    assert [m.step for m in evals] == [4, 8, 12] and done.best_step in (4, 8, 12)
    assert all(m.exact_match is not None for m in evals)
    gguf = next(a for a in done.artifacts if a.kind == "gguf")
    assert gguf.detail["verified"] and store.size(gguf.key) == gguf.bytes


def test_nf4_on_a_cpu_worker_fails_as_unsupported_on_device(store, write_jsonl, sentiment_rows, micro_model_dir, make_spec, tmp_path):
    write_jsonl(store, "files/train.jsonl", sentiment_rows(4))
    code, events, err = _trainer(make_spec(str(micro_model_dir), quantization="nf4"), store, tmp_path)
    assert code == 1 and isinstance(events[-1], FailedEvent), err[-2000:]
    assert (events[-1].code, events[-1].param) == ("unsupported_on_device", "quantization")
    assert "CUDA" in events[-1].message
