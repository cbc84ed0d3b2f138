"""The Kubernetes backend. Manifests are validated against the Kubernetes 1.37 OpenAPI schemas
(``kubernetes-validate``, strict: unknown fields are errors); the backend's calls go through the real
``kubernetes`` client to a fake API server on loopback that speaks the real ``batch/v1`` REST paths
(create 201 / 409 AlreadyExists, read 404, list by label selector, delete with propagationPolicy) and
itself rejects (422) a Job the schema refuses. (The client's own pydantic models already refuse
unknown fields and wrong types before a request leaves; the schema check covers the rest.)"""

from __future__ import annotations

import math
import threading
import time
import uuid
from datetime import datetime, timezone

import kubernetes_validate
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kubernetes import client
from sqlalchemy import create_engine

from gpu_worker.contract import AdapterConfig, Hyperparameters, JobSpec, Runtime
from scheduler.db import session_scope
from scheduler.fleet import parse_fleet
from scheduler.kube import (
    GPU_RESOURCE,
    KubeBackend,
    KubeDispatcher,
    KubeSettings,
    batch_api,
    build_job,
    job_name,
    job_state,
    reconcile,
)
from scheduler.models import Base, Job, JobStatus, Organization, new_id
from scheduler.routing import route
from tests.conftest import free_port

K8S_VERSION = "1.37.0"
FLEET = parse_fleet({"classes": [
    {"name": "l4", "memory_gb": 24, "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}},
    {"name": "h100", "memory_gb": 80, "gpus_per_node": 8, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
     "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}]},
]})
CFG = KubeSettings(namespace="ml", image="registry.example/tuneforge-worker:1.0", image_pull_secrets=["regcred"], priority_class_name="training")


def spec(model="meta-llama/Llama-3.1-8B", adapter="lora", quant="none") -> JobSpec:
    return JobSpec(job_id="ftjob-abc", org_id="org-1", base_model=model, adapter=AdapterConfig(type=adapter), quantization=quant,
                   hyperparameters=Hyperparameters(n_epochs=1, batch_size=8, learning_rate=1e-4, max_seq_length=2048),
                   seed=1, training_file_key="k", output_prefix="p")


def manifest(s: JobSpec, attempt=0, cfg=CFG) -> dict:
    plan = route(s, None, FLEET)
    return client.ApiClient().sanitize_for_serialization(build_job("ftjob-AbC_1", "org-1", plan, FLEET.get(plan.gpu_class), cfg, attempt))


PLANS = {
    "single-gpu LoRA on l4": spec(),
    "multi-gpu full FT on h100": spec(adapter="full"),
    "70B full FT with offload": spec("meta-llama/Llama-3.1-70B", adapter="full"),
}


@pytest.mark.parametrize("s", PLANS.values(), ids=PLANS.keys())
def test_manifests_are_valid_batch_v1_jobs(s):
    m = manifest(s)
    kubernetes_validate.validate(m, K8S_VERSION, strict=True)  # raises ValidationError with the path
    plan = route(s, None, FLEET)
    pod = m["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    assert worker["resources"]["limits"][GPU_RESOURCE] == worker["resources"]["requests"][GPU_RESOURCE] == str(plan.gpu_count)
    assert pod["nodeSelector"] == FLEET.get(plan.gpu_class).node_selector
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert m["spec"]["backoffLimit"] == 1 and m["spec"]["activeDeadlineSeconds"] > 0 and m["spec"]["ttlSecondsAfterFinished"] == 3600
    assert pod["restartPolicy"] == "Never"
    assert m["metadata"]["labels"]["tuneforge.dev/worker-kind"] == plan.worker_kind
    assert m["metadata"]["labels"]["tuneforge.dev/job-id"] == "ftjob-AbC_1"


def test_secrets_are_referenced_never_copied():
    m = manifest(spec())
    worker = m["spec"]["template"]["spec"]["containers"][0]
    db = next(e for e in worker["env"] if e["name"] == "TUNEFORGE_DATABASE_URL")
    assert db == {"name": "TUNEFORGE_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "tuneforge-database", "key": "url"}}}
    assert {"secretRef": {"name": "tuneforge-storage"}} in worker["envFrom"]
    assert {"name": "TUNEFORGE_JOB_ID", "value": "ftjob-AbC_1"} in worker["env"]
    assert worker["args"] == ["--job-id", "ftjob-AbC_1"]


def test_tolerations_of_the_class_and_host_memory_for_offload():
    m = manifest(spec("meta-llama/Llama-3.1-70B", adapter="full"))
    pod = m["spec"]["template"]["spec"]
    assert {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"} in pod["tolerations"]
    plan = route(spec("meta-llama/Llama-3.1-70B", adapter="full"), None, FLEET)
    assert plan.offload
    assert pod["containers"][0]["resources"]["requests"]["memory"] == f"{64 * plan.gpu_count * 2}Gi"
    assert pod["priorityClassName"] == "training" and pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_the_memory_request_adds_what_the_offload_memory_mode_pins():
    s = spec().model_copy(update={"runtime": Runtime(memory_mode="offload")})
    plan = route(s, None, FLEET)
    assert plan.memory_mode == "offload" and plan.host_memory_gb > 7  # 8B at the spec's tokens per step
    pod = manifest(s)["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"]["memory"] == f"{64 + math.ceil(plan.host_memory_gb)}Gi"
    assert pod["containers"][0]["resources"]["limits"]["memory"] == f"{64 + math.ceil(plan.host_memory_gb)}Gi"


def test_names_are_dns_labels_unique_per_attempt():
    names = {job_name("ftjob-AbC_1", a) for a in range(3)}
    assert len(names) == 3
    for n in names:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}, K8S_VERSION, strict=True)
        assert len(n) <= 63 and n == n.lower()


def test_the_schema_check_catches_a_broken_manifest():
    m = manifest(spec())
    m["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] = "8"  # must be a map
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(m, K8S_VERSION, strict=True)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="backoff_limit"):
        KubeSettings(backoff_limit=-1)


def _job(conditions=(), active=None) -> client.V1Job:
    conds = [client.V1JobCondition(type=t, status=st, reason=r, message=m) for t, st, r, m in conditions]
    return client.V1Job(metadata=client.V1ObjectMeta(name="j"), status=client.V1JobStatus(active=active, conditions=conds or None))


@pytest.mark.parametrize("job,phase,reason", [
    (_job(), "pending", None),
    (_job(active=1), "running", None),
    (_job([("Complete", "True", None, None)]), "succeeded", None),
    (_job([("Failed", "True", "DeadlineExceeded", "Job was active longer than specified deadline")], active=1), "failed", "DeadlineExceeded"),
    (_job([("FailureTarget", "True", "BackoffLimitExceeded", "x")]), "failed", "BackoffLimitExceeded"),
    (_job([("Failed", "False", None, None)], active=1), "running", None),
    (_job([("Suspended", "True", "JobSuspended", None)]), "pending", None),
])
def test_job_status_maps_to_a_state(job, phase, reason):
    state = job_state(job)
    assert (state.phase, state.reason) == (phase, reason)
    assert state.terminal == (phase in ("succeeded", "failed"))


# --- the fake API server --------------------------------------------------------------------------


def _status(code: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": message, "reason": reason, "code": code}, status_code=code)


def fake_api_server() -> tuple[FastAPI, dict]:
    app = FastAPI()
    state: dict = {"jobs": {}, "deletes": []}
    base = "/apis/batch/v1/namespaces/{ns}/jobs"

    @app.post(base)
    async def create(ns: str, request: Request):
        body = await request.json()
        name = body["metadata"]["name"]
        if ns != "ml":  # the scheduler's Role grants Jobs in its own namespace only
            return _status(403, "Forbidden", f'jobs.batch is forbidden: User cannot create resource "jobs" in namespace "{ns}"')
        if body["metadata"].get("namespace", ns) != ns:
            return _status(400, "BadRequest", "the namespace of the object does not match the namespace on the request")
        try:
            kubernetes_validate.validate(body, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            return _status(422, "Invalid", f'Job.batch "{name}" is invalid: {e}')
        if (ns, name) in state["jobs"]:
            return _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
        body["metadata"] |= {"uid": str(uuid.uuid4()), "resourceVersion": "1", "namespace": ns,
                             "creationTimestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        body["status"] = {}
        state["jobs"][(ns, name)] = body
        return JSONResponse(body, status_code=201)

    @app.get(base)
    def list_jobs(ns: str, labelSelector: str = ""):
        wanted = dict(p.split("=", 1) for p in labelSelector.split(",") if p)
        items = [j for (n, _), j in state["jobs"].items() if n == ns and wanted.items() <= j["metadata"]["labels"].items()]
        return {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {"resourceVersion": "1"}, "items": items}

    @app.get(base + "/{name}")
    def read(ns: str, name: str):
        job = state["jobs"].get((ns, name))
        return job if job else _status(404, "NotFound", f'jobs.batch "{name}" not found')

    @app.delete(base + "/{name}")
    async def delete(ns: str, name: str, request: Request):
        options = await request.json() if await request.body() else {}  # DeleteOptions, or query parameters
        policy = options.get("propagationPolicy") or request.query_params.get("propagationPolicy")
        if state["jobs"].pop((ns, name), None) is None:
            return _status(404, "NotFound", f'jobs.batch "{name}" not found')
        state["deletes"].append((name, policy))
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": name, "group": "batch", "kind": "jobs"}}

    return app, state


@pytest.fixture(scope="module")
def api_server():
    app, state = fake_api_server()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def backend(api_server):
    host, state = api_server
    state["jobs"].clear()
    state["deletes"].clear()
    return KubeBackend(batch_api(host), CFG), state


def test_launch_read_and_delete_through_the_real_client(backend):
    kube, state = backend
    plan = route(spec(), None, FLEET)
    name = kube.launch("ftjob-abc", "org-1", plan, FLEET.get(plan.gpu_class))
    assert ("ml", name) in state["jobs"]
    assert kube.launch("ftjob-abc", "org-1", plan, FLEET.get(plan.gpu_class)) == name  # 409: already there
    assert len(state["jobs"]) == 1
    assert kube.state("ftjob-abc").phase == "pending"
    state["jobs"][("ml", name)]["status"] = {"active": 1, "startTime": "2026-11-22T08:00:00Z"}
    assert kube.read("ftjob-abc").phase == "running"
    state["jobs"][("ml", name)]["status"] = {"failed": 2, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}
    failed = kube.state("ftjob-abc")
    assert (failed.phase, failed.reason) == ("failed", "BackoffLimitExceeded")
    # a re-queued job's second attempt is a new Job; state follows the latest attempt
    second = kube.launch("ftjob-abc", "org-1", plan, FLEET.get(plan.gpu_class), attempt=1)
    assert second != name and kube.state("ftjob-abc") .phase == "pending"
    assert kube.delete("ftjob-abc") == 2
    assert sorted(state["deletes"]) == sorted([(name, "Background"), (second, "Background")])
    assert kube.delete("ftjob-abc") == 0
    assert kube.state("ftjob-abc").phase == "missing" and kube.read("ftjob-abc").phase == "missing"


def test_errors_other_than_already_exists_reach_the_caller(backend):
    kube, state = backend
    elsewhere = KubeBackend(kube.api, CFG.model_copy(update={"namespace": "kube-system"}))
    plan = route(spec(), None, FLEET)
    with pytest.raises(client.exceptions.ApiException) as e:
        elsewhere.launch("ftjob-x", "org-1", plan, FLEET.get(plan.gpu_class))
    assert e.value.status == 403 and "forbidden" in e.value.body
    assert state["jobs"] == {}


@pytest.fixture(scope="module")
def kube_db(scratch_database):
    url = scratch_database("kube")
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    return url


def _add_jobs(url, statuses, attempts=1) -> dict:
    ids = {}
    with session_scope(url) as s:
        org = Organization(id=new_id("org-"), name=f"org-{uuid.uuid4().hex[:6]}")
        s.add(org)
        s.flush()
        for status in statuses:
            job_id = new_id("ftjob-")
            s.add(Job(id=job_id, org_id=org.id, model="meta-llama/Llama-3.1-8B", training_file_id="f", seed=1,
                      method={"type": "supervised"}, spec=spec().model_copy(update={"job_id": job_id}).model_dump(mode="json"),
                      status=status, attempts=attempts))
            ids[status] = job_id
    return ids


def test_dispatcher_launches_queued_jobs_once_per_attempt(backend, kube_db):
    kube, state = backend
    ids = _add_jobs(kube_db, (JobStatus.queued, JobStatus.running))
    dispatcher = KubeDispatcher(kube, kube_db, FLEET)
    dispatcher.nudge(ids[JobStatus.queued], "tuneforge.single-gpu.l4")
    dispatcher.nudge(ids[JobStatus.queued], "tuneforge.single-gpu.l4")
    dispatcher.nudge(ids[JobStatus.running], "tuneforge.single-gpu.l4")
    assert [n for _, n in state["jobs"]] == [job_name(ids[JobStatus.queued], 1)]
    launched = next(iter(state["jobs"].values()))
    assert launched["metadata"]["labels"]["tuneforge.dev/gpu-class"] == "l4"


def _set_status(state, name, status):
    state["jobs"][("ml", name)]["status"] = status


def test_reconcile_fails_jobs_whose_pod_never_claimed_and_deletes_cancelled_ones(backend, kube_db):
    kube, state = backend
    ids = _add_jobs(kube_db, (JobStatus.queued, JobStatus.cancelled, JobStatus.running, JobStatus.succeeded))
    plan = route(spec(), None, FLEET)
    names = {st: kube.launch(job_id, "org-1", plan, FLEET.get("l4"), attempt=1) for st, job_id in ids.items()}
    # an earlier attempt of the running job failed long ago: not its current attempt, ignored
    kube.launch(ids[JobStatus.running], "org-1", plan, FLEET.get("l4"), attempt=0)
    _set_status(state, job_name(ids[JobStatus.running], 0), {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
    _set_status(state, names[JobStatus.queued], {"failed": 2, "conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]})
    _set_status(state, names[JobStatus.running], {"active": 1})
    _set_status(state, names[JobStatus.succeeded], {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})

    assert reconcile(kube, kube_db) == {"failed": 1, "deleted": 1}
    with session_scope(kube_db) as s:
        failed = s.get(Job, ids[JobStatus.queued])
        assert failed.status == JobStatus.failed and failed.error["code"] == "worker_failed"
        assert names[JobStatus.queued] in failed.error["message"] and "DeadlineExceeded" in failed.error["message"]
        assert s.get(Job, ids[JobStatus.running]).status == JobStatus.running
    assert ("ml", names[JobStatus.cancelled]) not in state["jobs"]
    assert ("ml", names[JobStatus.running]) in state["jobs"] and ("ml", names[JobStatus.succeeded]) in state["jobs"]
    assert reconcile(kube, kube_db) == {"failed": 0, "deleted": 0}  # a second pass changes nothing


def test_a_multi_gpu_job_gets_one_pod_with_all_its_gpus():
    """The DeepSpeed worker runs every rank of a job in one pod (torchrun on one node), so the pod
    asks for the plan's whole GPU count, and the CPUs and host memory that go with it."""
    s = spec("meta-llama/Llama-3.1-70B", adapter="full")
    plan = route(s, None, FLEET)
    assert plan.worker_kind == "multi-gpu" and plan.gpu_count > 1, plan.reasons
    m = manifest(s)
    worker = m["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["requests"][GPU_RESOURCE] == str(plan.gpu_count)
    assert worker["resources"]["requests"]["cpu"] == str(CFG.cpu_per_gpu * plan.gpu_count)
    assert {"name": "TUNEFORGE_GPU_COUNT", "value": str(plan.gpu_count)} in worker["env"]
    assert {"name": "TUNEFORGE_WORKER_KIND", "value": "multi-gpu"} in worker["env"]
