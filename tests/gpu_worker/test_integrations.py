"""Optional loggers: each records the job's metrics exactly as the MetricsEvents report them, and
none of them can fail a job (missing package, bad configuration, a backend raising mid-run).

mlflow-skinny and wandb are in the test extra (pyproject.toml), so these tests run, never skip: MLflow
against a local file store (a ``file://`` tracking URI), W&B in its offline mode (no key, no network)."""

from __future__ import annotations

import sys

import pytest

from gpu_worker.contract import CompletedEvent, LogEvent, MetricsEvent
from gpu_worker.integrations import Loggers
from gpu_worker.recipes import RunContext
from gpu_worker.recipes.sft import run


@pytest.fixture
def job(store, write_jsonl, sentiment_rows, micro_model_dir, make_spec, tmp_path):
    write_jsonl(store, "files/train.jsonl", sentiment_rows(8))

    def go(**integrations):
        spec = make_spec(str(micro_model_dir), hyperparameters={"n_epochs": 2, "batch_size": 4}, integrations=integrations,
                         evaluation={"gate": False})  # no validation data: the gate would warn it evaluated nothing
        events = []
        result = run(spec, RunContext(store=store, data_dir=tmp_path, emit=events.append, device="cpu"))
        assert isinstance(result, CompletedEvent)
        return events, result

    return go


def _losses(events):
    return [(m.step, m.train_loss) for m in events if isinstance(m, MetricsEvent)]


def _warnings(events):
    return [e.message for e in events if isinstance(e, LogEvent) and e.level == "warn"]


def test_tensorboard_event_files_hold_the_metrics_and_are_an_artifact(job, store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gpu_worker.storage import get_dir

    events, result = job(tensorboard=True)
    art = next(a for a in result.artifacts if a.filename == "tensorboard")
    assert art.kind == "report" and art.key == "jobs/ftjob-test/artifacts/tensorboard" and art.bytes > 0
    local = tmp_path / "tb"
    get_dir(store, art.key, local)
    acc = EventAccumulator(str(local)).Reload()
    logged = [(s.step, s.value) for s in acc.Scalars("train_loss")]
    assert [s for s, _ in logged] == [s for s, _ in _losses(events)]
    assert [v for _, v in logged] == pytest.approx([v for _, v in _losses(events)], rel=1e-6)  # stored as float32
    assert "learning_rate" in acc.Tags()["scalars"] and not _warnings(events)


def test_mlflow_file_store_records_params_and_metric_history(job, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    events, _ = job(mlflow_tracking_uri=uri)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tuneforge").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "ftjob-test" and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["learning_rate"] == "0.002" and runs[0].data.params["adapter"] == "lora"
    history = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train_loss"))
    assert [s for s, _ in history] == [s for s, _ in _losses(events)]
    assert [v for _, v in history] == pytest.approx([v for _, v in _losses(events)])
    assert not _warnings(events)


def test_wandb_runs_offline_without_an_api_key_and_uploads_the_run(job, store, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    events, result = job(wandb_project="tuneforge-test", wandb_name="run-1")
    art = next(a for a in result.artifacts if a.filename == "wandb")
    keys = store.list(art.key + "/")
    assert art.detail["format"] == "wandb-offline" and any(k.endswith(".wandb") and "/offline-run-" in k for k in keys), keys
    assert not _warnings(events)


def test_an_unusable_tracking_uri_is_a_warning(job):
    events, result = job(mlflow_tracking_uri="bogus-scheme://nowhere")
    assert any(w.startswith("MLflow logging is off") for w in _warnings(events)), _warnings(events)


def test_a_missing_package_never_fails_the_job(job, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    events, result = job(wandb_project="p", mlflow_tracking_uri="file:///nowhere")
    warnings = _warnings(events)
    assert any(w.startswith("W&B logging is off: ModuleNotFoundError") for w in warnings), warnings
    assert any(w.startswith("MLflow logging is off: ModuleNotFoundError") for w in warnings), warnings
    assert not [a for a in result.artifacts if a.kind == "report"]


def test_a_backend_that_raises_is_dropped_and_the_others_go_on(tmp_path):
    class Flaky:
        name = "Flaky"

        def log(self, step, metrics):
            raise OSError("disk full")

        def close(self, store, prefix):
            return []

    class Steady:
        name = "Steady"
        seen: list = []

        def log(self, step, metrics):
            self.seen.append((step, metrics))

        def close(self, store, prefix):
            return []

    events = []
    steady = Steady()
    loggers = Loggers([Flaky(), steady], events.append)
    loggers.log(1, {"train_loss": 2.0, "valid_loss": None})
    loggers.log(2, {"train_loss": 1.5})
    assert steady.seen == [(1, {"train_loss": 2.0}), (2, {"train_loss": 1.5})]
    assert [e.message for e in events] == ["Flaky logging stopped: OSError: disk full"]
    assert loggers.close(None, "p") == []
