"""Training jobs as Kubernetes Jobs: the scheduler backend for clusters.

For each platform job the scheduler creates one ``batch/v1`` Job (``build_job``): one pod on one node
of the plan's GPU class, requesting ``nvidia.com/gpu`` × the plan's GPU count, with the class's node
selector and tolerations. The pod runs the worker agent for that one job id (``TUNEFORGE_JOB_ID``);
the agent claims the job from the database with a lease, as every worker does, so a duplicate pod or
a stale Job can never run a job twice. Credentials are never copied into the manifest: the database
URL comes from a ``secretKeyRef`` and the object store's settings and keys from ``envFrom`` a Secret.

Kubernetes retries a pod that dies before it claims (``backoffLimit``), ends one that overruns
(``activeDeadlineSeconds``) and deletes finished Jobs (``ttlSecondsAfterFinished``). ``KubeBackend``
creates, reads and deletes Jobs through the official client's ``BatchV1Api`` and maps a Job's status
back to a ``KubeJobState`` the scheduler reconciles with the database (the database stays the source
of truth: a Job that failed before its agent could report is what the scheduler learns from here).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Literal

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpu_worker.contract import JobSpec
from scheduler import jobs
from scheduler.db import session_scope
from scheduler.fleet import Fleet, GpuClass, get_fleet
from scheduler.models import Job, JobStatus
from scheduler.routing import Plan, route

GPU_RESOURCE = "nvidia.com/gpu"
LABEL_PREFIX = "tuneforge.dev"
JOB_ID_LABEL = f"{LABEL_PREFIX}/job-id"


class KubeSettings(BaseSettings):
    """Where and how training Jobs run (environment prefix ``TUNEFORGE_KUBE_``)."""

    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_KUBE_", extra="ignore")

    namespace: str = "tuneforge"
    image: str = "tuneforge/worker:latest"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    service_account: str = "tuneforge-worker"
    command: list[str] = Field(default_factory=lambda: ["tuneforge", "run-job"])
    # Secrets are referenced by name; the manifest never holds their values.
    database_secret: str = "tuneforge-database"  # key "url" → TUNEFORGE_DATABASE_URL
    database_secret_key: str = "url"
    broker_secret: str | None = "tuneforge-redis"  # key "url" → TUNEFORGE_BROKER_URL (production settings need it)
    broker_secret_key: str = "url"
    storage_secret: str = "tuneforge-storage"  # envFrom: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...
    config_map: str = "tuneforge-config"  # envFrom: the non-secret settings
    backoff_limit: int = Field(1, ge=0)  # pod retries before Kubernetes marks the Job failed
    active_deadline_seconds: int = Field(3 * 24 * 3600, ge=60)
    ttl_seconds_after_finished: int = Field(3600, ge=0)
    termination_grace_seconds: int = Field(300, ge=30)  # SIGTERM → the trainer saves a checkpoint
    cpu_per_gpu: int = Field(8, ge=1)
    memory_gb_per_gpu: int = Field(64, ge=1)  # host memory; doubled when the optimizer is offloaded, plus the plan's host_memory_gb
    shm_gb: int = Field(16, ge=1)  # /dev/shm for data loaders and NCCL
    priority_class_name: str | None = None


def job_name(job_id: str, attempt: int = 0) -> str:
    """A DNS-1123 name, unique per attempt: a re-queued job gets a new Job while the old one is kept
    for its logs until its TTL."""
    base = re.sub(r"[^a-z0-9-]", "-", job_id.lower()).strip("-")[:50]
    return f"tf-{base}-a{attempt}"


def _label_value(v: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", v)[:63].strip("-_.")


def build_job(job_id: str, org_id: str, plan: Plan, gpu: GpuClass, cfg: KubeSettings, attempt: int = 0) -> client.V1Job:
    labels = {
        "app.kubernetes.io/name": "tuneforge",
        "app.kubernetes.io/component": "training-job",
        "app.kubernetes.io/managed-by": "tuneforge-scheduler",
        JOB_ID_LABEL: _label_value(job_id),
        f"{LABEL_PREFIX}/org-id": _label_value(org_id),
        f"{LABEL_PREFIX}/gpu-class": gpu.name,
        f"{LABEL_PREFIX}/worker-kind": plan.worker_kind,
    }
    gpus = str(plan.gpu_count)
    # the process's allowance (doubled for DeepSpeed's offloaded optimizer) plus what the memory mode pins
    host_memory = cfg.memory_gb_per_gpu * plan.gpu_count * (2 if plan.offload else 1) + math.ceil(plan.host_memory_gb * plan.gpu_count)
    env = [
        client.V1EnvVar(name="TUNEFORGE_JOB_ID", value=job_id),
        client.V1EnvVar(name="TUNEFORGE_WORKER_KIND", value=plan.worker_kind),
        client.V1EnvVar(name="TUNEFORGE_GPU_CLASS", value=gpu.name),
        client.V1EnvVar(name="TUNEFORGE_GPU_COUNT", value=gpus),
        client.V1EnvVar(name="TUNEFORGE_DATA_DIR", value="/scratch"),
        client.V1EnvVar(name="TUNEFORGE_DATABASE_URL", value_from=client.V1EnvVarSource(
            secret_key_ref=client.V1SecretKeySelector(name=cfg.database_secret, key=cfg.database_secret_key))),
        *([client.V1EnvVar(name="TUNEFORGE_BROKER_URL", value_from=client.V1EnvVarSource(
            secret_key_ref=client.V1SecretKeySelector(name=cfg.broker_secret, key=cfg.broker_secret_key)))] if cfg.broker_secret else []),
        client.V1EnvVar(name="POD_NAME", value_from=client.V1EnvVarSource(
            field_ref=client.V1ObjectFieldSelector(field_path="metadata.name"))),
    ]
    container = client.V1Container(
        name="worker",
        image=cfg.image,
        image_pull_policy=cfg.image_pull_policy,
        command=list(cfg.command),
        args=["--job-id", job_id],
        env=env,
        env_from=[
            client.V1EnvFromSource(config_map_ref=client.V1ConfigMapEnvSource(name=cfg.config_map)),
            client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name=cfg.storage_secret)),
        ],
        resources=client.V1ResourceRequirements(
            # extended resources: request == limit; host memory limited so a leak cannot take the node
            requests={GPU_RESOURCE: gpus, "cpu": str(cfg.cpu_per_gpu * plan.gpu_count), "memory": f"{host_memory}Gi"},
            limits={GPU_RESOURCE: gpus, "memory": f"{host_memory}Gi"},
        ),
        volume_mounts=[client.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
                       client.V1VolumeMount(name="scratch", mount_path="/scratch")],
        security_context=client.V1SecurityContext(allow_privilege_escalation=False),
    )
    tolerations = [client.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
    tolerations += [client.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in gpu.tolerations]
    pod = client.V1PodSpec(
        restart_policy="Never",  # the Job's backoffLimit retries, in a fresh pod
        service_account_name=cfg.service_account,
        containers=[container],
        node_selector=dict(gpu.node_selector) or None,
        tolerations=tolerations,
        termination_grace_period_seconds=cfg.termination_grace_seconds,
        priority_class_name=cfg.priority_class_name,
        image_pull_secrets=[client.V1LocalObjectReference(name=n) for n in cfg.image_pull_secrets] or None,
        volumes=[
            client.V1Volume(name="dshm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory", size_limit=f"{cfg.shm_gb}Gi")),
            client.V1Volume(name="scratch", empty_dir=client.V1EmptyDirVolumeSource()),
        ],
    )
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(
            name=job_name(job_id, attempt), namespace=cfg.namespace, labels={**labels, f"{LABEL_PREFIX}/attempt": str(attempt)},
            annotations={f"{LABEL_PREFIX}/job-id": job_id, f"{LABEL_PREFIX}/plan": json.dumps(plan.to_dict(), sort_keys=True)},
        ),
        spec=client.V1JobSpec(
            backoff_limit=cfg.backoff_limit,
            active_deadline_seconds=cfg.active_deadline_seconds,
            ttl_seconds_after_finished=cfg.ttl_seconds_after_finished,
            template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels=labels), spec=pod),
        ),
    )


@dataclass(frozen=True)
class KubeJobState:
    phase: Literal["missing", "pending", "running", "succeeded", "failed"]
    name: str | None = None
    reason: str | None = None  # Kubernetes' reason for a failure: BackoffLimitExceeded, DeadlineExceeded, ...
    message: str | None = None

    @property
    def terminal(self) -> bool:
        return self.phase in ("succeeded", "failed")


def job_state(job: client.V1Job) -> KubeJobState:
    """A Job's status as the scheduler sees it. Conditions decide; counters only say it started."""
    status = job.status or client.V1JobStatus()
    name = job.metadata.name if job.metadata else None
    for cond in status.conditions or []:
        if cond.status != "True":
            continue
        if cond.type == "Complete":
            return KubeJobState("succeeded", name)
        if cond.type in ("Failed", "FailureTarget"):
            return KubeJobState("failed", name, cond.reason, cond.message)
    if status.active:
        return KubeJobState("running", name)
    return KubeJobState("pending", name)


class KubeBackend:
    """Creates, reads and deletes training Jobs. Every call is idempotent: creating a Job that
    exists is a no-op, deleting one that does not is too."""

    def __init__(self, api: client.BatchV1Api, cfg: KubeSettings):
        self.api = api
        self.cfg = cfg

    def launch(self, job_id: str, org_id: str, plan: Plan, gpu: GpuClass, attempt: int = 0) -> str:
        try:
            self.api.create_namespaced_job(self.cfg.namespace, build_job(job_id, org_id, plan, gpu, self.cfg, attempt))
        except ApiException as e:
            if e.status != 409:  # 409 AlreadyExists: an earlier nudge launched it
                raise
        return job_name(job_id, attempt)

    def _jobs(self, job_id: str) -> list[client.V1Job]:
        found = self.api.list_namespaced_job(self.cfg.namespace, label_selector=f"{JOB_ID_LABEL}={_label_value(job_id)}")
        return sorted(found.items, key=lambda j: int((j.metadata.labels or {}).get(f"{LABEL_PREFIX}/attempt", "0")))

    def state(self, job_id: str) -> KubeJobState:
        """The state of the job's latest attempt."""
        jobs = self._jobs(job_id)
        return job_state(jobs[-1]) if jobs else KubeJobState("missing")

    def read(self, job_id: str, attempt: int = 0) -> KubeJobState:
        try:
            return job_state(self.api.read_namespaced_job(job_name(job_id, attempt), self.cfg.namespace))
        except ApiException as e:
            if e.status == 404:
                return KubeJobState("missing", job_name(job_id, attempt))
            raise

    def delete(self, job_id: str) -> int:
        """Delete every attempt's Job and, in the background, its pods (cancel of a job no agent has
        claimed yet; a running agent stops its trainer itself and saves a checkpoint)."""
        deleted = 0
        for job in self._jobs(job_id):
            try:
                self.api.delete_namespaced_job(job.metadata.name, self.cfg.namespace, propagation_policy="Background")
                deleted += 1
            except ApiException as e:
                if e.status != 404:
                    raise
        return deleted


def batch_api(host: str | None = None) -> client.BatchV1Api:
    """In a pod: the service account's credentials; elsewhere: ``host`` or the kubeconfig."""
    from kubernetes import config

    if host:
        conf = client.Configuration()
        conf.host = host
        return client.BatchV1Api(client.ApiClient(conf))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.BatchV1Api()


class KubeDispatcher:
    """The scheduler's dispatcher on a cluster: a nudge launches the job's Kubernetes Job (once per
    attempt; repeated nudges find it already there). Queued jobs only: a nudge that arrives after the
    job moved on does nothing."""

    def __init__(self, backend: KubeBackend, database_url: str, fleet: Fleet | None = None):
        self.backend = backend
        self.database_url = database_url
        self.fleet = fleet

    def nudge(self, job_id: str, queue: str) -> None:
        fleet = self.fleet or get_fleet()
        with session_scope(self.database_url) as session:
            job = session.get(Job, job_id)
            if job is None or job.status != JobStatus.queued:
                return
            plan = route(JobSpec.model_validate(job.spec), None, fleet)
            self.backend.launch(job.id, job.org_id, plan, fleet.get(plan.gpu_class), attempt=job.attempts)


def reconcile(backend: KubeBackend, database_url: str) -> dict[str, int]:
    """One pass of Kubernetes → database and database → Kubernetes, for the scheduler's tick:
    - a job still queued whose latest Job failed (its pod never claimed it: image pull, unschedulable
      until the deadline, crash before the claim) fails with Kubernetes' reason;
    - a job cancelled, failed or paused in the database whose Job still runs or waits is deleted (a cancel
      or pause reaches a pod that has not claimed yet; one that has stops itself at its next heartbeat).
    Running jobs are left to their lease: if the pod died, the reaper re-queues the job."""
    listed = backend.api.list_namespaced_job(backend.cfg.namespace, label_selector="app.kubernetes.io/managed-by=tuneforge-scheduler")
    latest: dict[str, tuple[int, client.V1Job]] = {}
    for kjob in listed.items:
        meta = kjob.metadata
        job_id = (meta.annotations or {}).get(JOB_ID_LABEL)
        attempt = int((meta.labels or {}).get(f"{LABEL_PREFIX}/attempt", "0"))
        if job_id and (job_id not in latest or attempt > latest[job_id][0]):
            latest[job_id] = (attempt, kjob)
    counts = {"failed": 0, "deleted": 0}
    with session_scope(database_url) as session:
        for job_id, (attempt, kjob) in latest.items():
            row = session.get(Job, job_id)
            state = job_state(kjob)
            if row is None or row.status in (JobStatus.cancelled, JobStatus.failed, JobStatus.paused):
                if not state.terminal:
                    backend.delete(job_id)
                    counts["deleted"] += 1
            elif row.status == JobStatus.queued and state.phase == "failed" and attempt == row.attempts:
                detail = f"{state.reason}: {state.message}" if state.message else (state.reason or "failed")
                if jobs.fail(session, row, "worker_failed", f"Kubernetes Job {state.name} failed before the job started ({detail})"):
                    counts["failed"] += 1
    return counts
