"""Optional experiment loggers a job can turn on (``spec.integrations``): TensorBoard, MLflow, W&B.

Each backend is imported only when asked for, and none of them can fail the job: a backend that is
not installed, cannot start, or raises while logging is switched off with a LogEvent warning, and
training goes on. ``Loggers.close`` returns the job artifacts the loggers produced:

- TensorBoard: ``torch.utils.tensorboard`` event files, uploaded under
  ``{output_prefix}/artifacts/tensorboard/`` (artifact kind ``report``).
- MLflow: a run in experiment ``tuneforge`` at ``mlflow_tracking_uri`` (a ``file:`` URI works
  offline), with the job's hyperparameters as params and every metric per step.
- W&B: a run in ``wandb_project`` (entity, name as given). Without ``WANDB_API_KEY`` (no account or
  no network on the worker) it runs with ``WANDB_MODE=offline`` and the offline run folder is
  uploaded under ``{output_prefix}/artifacts/wandb/`` so the user can ``wandb sync`` it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from gpu_worker.contract import Artifact, JobSpec, LogEvent


def _params(spec: JobSpec) -> dict[str, Any]:
    flat = {"method": spec.method.value, "base_model": spec.base_model, "adapter": spec.adapter.type.value, "rank": spec.adapter.rank,
            "alpha": spec.adapter.alpha, "use_rslora": spec.adapter.use_rslora, "quantization": spec.quantization.value, "seed": spec.seed}
    flat.update(spec.hyperparameters.model_dump(mode="json"))
    return flat


class _TensorBoard:
    name = "TensorBoard"

    def __init__(self, spec: JobSpec, workdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = workdir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.writer.add_text("job", f"{spec.job_id}: {spec.method.value} on {spec.base_model}")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, store, prefix: str) -> list[Artifact]:
        self.writer.close()
        return [_upload_folder(store, self.dir, f"{prefix}/tensorboard", "tensorboard", {"format": "tensorboard"})]


class _MLflow:
    name = "MLflow"

    def __init__(self, spec: JobSpec, workdir: Path):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = spec.integrations.mlflow_tracking_uri
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless told otherwise; the platform documents file:
            # URIs as the offline option (one job per trainer process, so the setting stays local).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # An explicit client, not mlflow's global active run: a worker process may host several jobs.
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("tuneforge")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("tuneforge")
        self.run_id = self.client.create_run(experiment_id, run_name=spec.job_id, tags={"tuneforge.job_id": spec.job_id}).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in _params(spec).items()])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self, store, prefix: str) -> list[Artifact]:
        self.client.set_terminated(self.run_id)
        return []


class _WandB:
    name = "W&B"

    def __init__(self, spec: JobSpec, workdir: Path):
        import wandb

        integ = spec.integrations
        self.offline = not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "offline"
        self.dir = workdir / "wandb-root"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=integ.wandb_project, entity=integ.wandb_entity, name=integ.wandb_name or spec.job_id, tags=list(integ.wandb_tags) or None,
            config=_params(spec), dir=str(self.dir), mode="offline" if self.offline else "online", reinit="create_new",
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, store, prefix: str) -> list[Artifact]:
        self.run.finish()
        if not self.offline:
            return []
        return [_upload_folder(store, self.dir, f"{prefix}/wandb", "wandb", {"format": "wandb-offline", "sync": "wandb sync <folder>/wandb/offline-run-*"})]


def _upload_folder(store, folder: Path, key: str, filename: str, detail: dict) -> Artifact:
    from gpu_worker.storage import put_dir

    keys = put_dir(store, folder, key)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return Artifact(kind="report", key=key, filename=filename, bytes=size, detail={**detail, "files": len(keys)})


class Loggers:
    """The job's enabled loggers; every call is safe (a failing backend is dropped with a warning)."""

    def __init__(self, backends: list, emit: Callable):
        self._backends = backends
        self._emit = emit

    @classmethod
    def open(cls, spec: JobSpec, emit: Callable, workdir: Path) -> "Loggers":
        integ = spec.integrations
        wanted = [(integ.tensorboard, _TensorBoard), (bool(integ.mlflow_tracking_uri), _MLflow), (bool(integ.wandb_project), _WandB)]
        backends = []
        for on, kind in wanted:
            if not on:
                continue
            try:
                backends.append(kind(spec, Path(workdir)))
                emit(LogEvent(message=f"{kind.name} logging on"))
            except Exception as err:  # ImportError included: an optional integration never fails the job
                emit(LogEvent(level="warn", message=f"{kind.name} logging is off: {type(err).__name__}: {err}".splitlines()[0]))
        return cls(backends, emit)

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        for backend in list(self._backends):
            try:
                backend.log(step, values)
            except Exception as err:
                self._drop(backend, err)

    def close(self, store, output_prefix: str) -> list[Artifact]:
        artifacts = []
        prefix = f"{output_prefix.rstrip('/')}/artifacts"
        for backend in list(self._backends):
            try:
                artifacts += backend.close(store, prefix)
            except Exception as err:
                self._drop(backend, err)
        self._backends = []
        return artifacts

    def _drop(self, backend, err: Exception) -> None:
        self._backends.remove(backend)
        self._emit(LogEvent(level="warn", message=f"{backend.name} logging stopped: {type(err).__name__}: {err}".splitlines()[0]))
