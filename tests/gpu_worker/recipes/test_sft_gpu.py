"""The SFT recipe on a CUDA GPU: bf16 base model, Triton kernels, CUDA RNG in checkpoints."""

from __future__ import annotations

import pytest

from gpu_worker.contract import CompletedEvent, LogEvent, MetricsEvent, StoppedEvent
from gpu_worker.recipes import RunContext
from gpu_worker.recipes.sft import run

pytestmark = pytest.mark.gpu


def _run(spec, store, data_dir, should_stop=lambda: False):
    events = []
    result = run(spec, RunContext(store=store, data_dir=data_dir, emit=events.append, should_stop=should_stop, device="cuda"))
    return events, result


def _losses(events):
    return [e.train_loss for e in events if isinstance(e, MetricsEvent)]


def test_learns_in_bf16_with_kernels_and_resumes(builtin_data_dir, store, write_jsonl, sentiment_rows, make_spec):
    import torch

    from gpu_worker.builtin import TINY

    write_jsonl(store, "files/train.jsonl", sentiment_rows(64))
    spec = make_spec(TINY, hyperparameters={"n_epochs": 4, "batch_size": 8, "learning_rate": 3e-3},
                     adapter={"dropout": 0.05}, runtime={"use_kernels": True, "checkpoint_every_steps": 1000})
    events, result = _run(spec, store, builtin_data_dir)
    assert isinstance(result, CompletedEvent), events[-3:]
    assert any(isinstance(e, LogEvent) and e.message.startswith("Training kernels applied") for e in events), [e for e in events if isinstance(e, LogEvent)]
    losses = _losses(events)
    assert len(losses) == 32 and sum(losses[-4:]) / 4 < 0.5 * sum(losses[:3]) / 3, losses
    assert torch.cuda.is_available()

    k = 13
    first = []
    stopped = run(spec.model_copy(update={"output_prefix": "jobs/cut"}),
                  RunContext(store, builtin_data_dir, first.append, lambda: len(_losses(first)) >= k, "cuda"))
    assert isinstance(stopped, StoppedEvent) and stopped.step == k
    resumed, done = _run(spec.model_copy(update={"output_prefix": "jobs/cut", "resume_from_key": stopped.checkpoint_key}), store, builtin_data_dir)
    assert isinstance(done, CompletedEvent)
    # bf16 GPU kernels may reduce in a different order from run to run: close, not bit-equal.
    assert _losses(first) == pytest.approx(losses[:k], rel=2e-2, abs=2e-3)
    assert _losses(resumed) == pytest.approx(losses[k:], rel=5e-2, abs=5e-3)


def test_packed_rows_replay_the_cuda_graphs(builtin_data_dir, store, write_jsonl, sentiment_rows, make_spec):
    # packed rows are padded to the packing width, so every step has one shape and the decoder layers'
    # graphs capture once and replay (gpu_worker/patching/graphs.py); a plain-rows run pads each batch to
    # its own longest row and stays eager
    from gpu_worker.builtin import BUILTIN_MODELS, TINY

    write_jsonl(store, "files/train.jsonl", sentiment_rows(256))
    spec = make_spec(TINY, hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate": 3e-3, "max_seq_length": 96},
                     runtime={"use_kernels": True, "checkpoint_every_steps": 1000})
    # no held-out split (256 examples would get an automatic one): every step and nothing else is measured
    packed = spec.model_copy(update={"data": spec.data.model_copy(update={"packing": True, "validation_split": 0.0})})
    events, result = _run(packed, store, builtin_data_dir)
    assert isinstance(result, CompletedEvent), events[-3:]
    graphs = [e.message for e in events if isinstance(e, LogEvent) and e.message.startswith("CUDA graphs")]
    assert graphs and graphs[0].startswith("CUDA graphs: 1 capture(s)"), graphs
    # every step replays but the first (eager: its shape is seen; the second captures and replays); a shorter last batch
    # (an odd number of rows) runs eagerly
    steps, layers = len(_losses(events)), BUILTIN_MODELS[TINY].num_hidden_layers
    replays = int(graphs[0].split(", ")[1].split()[0])
    assert steps >= 10 and replays >= (steps - 2) * layers, (steps, graphs)
