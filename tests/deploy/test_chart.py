"""The Helm chart, rendered and linted by Helm itself (Helm v4's Go SDK through ``helm-python-sdk``:
the real template engine, Sprig functions and values.schema.json validation), then every rendered
manifest validated against the Kubernetes 1.37 schemas (``kubernetes-validate``, strict), and the
chart's settings cross-checked with the code that reads them."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from scheduler.fleet import parse_fleet
from scheduler.kube import KubeSettings

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "tuneforge"
K8S_VERSION = "1.37.0"
NAMESPACE = "ml"

CELERY = {
    "scheduler": {"backend": "celery"},
    "fleet": {"classes": [
        {"name": "l4", "memory_gb": 24, "gpus_per_node": 1, "nodes": 4, "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}},
        {"name": "h100", "memory_gb": 80, "gpus_per_node": 8, "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}],
         "queues": {"multi-gpu": "big-jobs"}},
    ]},
    "workers": {"pools": [
        {"name": "l4-single", "gpuClass": "l4", "kind": "single-gpu", "replicas": 4, "gpus": 1},
        {"name": "h100-multi", "gpuClass": "h100", "kind": "multi-gpu", "replicas": 1, "gpus": 8},
    ]},
    "vllm": {"pools": [
        {"name": "llama-8b", "model": "meta-llama/Llama-3.1-8B-Instruct", "gpuClass": "h100", "replicas": 2, "gpus": 1, "maxLoras": 8, "maxLoraRank": 64},
        {"name": "llama-8b-l4", "model": "meta-llama/Llama-3.1-8B-Instruct", "gpuClass": "l4", "replicas": 1, "gpus": 1, "maxLoras": 4, "maxLoraRank": 16},
        {"name": "qwen-7b", "model": "Qwen/Qwen2.5-7B-Instruct", "gpuClass": "l4", "replicas": 1, "gpus": 1, "maxLoras": 4, "maxLoraRank": 16},
    ]},
}


def render(values: dict | None = None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values or {})
        files = chart.render(values or {}, name="tf", namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in files.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs, kind) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            yield d, d["spec"]["template"]["spec"]["containers"]


def test_helm_lint_is_clean():
    report = helm.lint(str(CHART), strict=True, namespace=NAMESPACE, kube_version="v1.37.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [{}, CELERY], ids=["kube-backend", "celery-pools"])
def test_every_rendered_manifest_is_valid_kubernetes(values):
    docs = render(values)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_default_install_has_every_deployable_and_jobs_rbac():
    docs = render()
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {"tf-tuneforge-api", "tf-tuneforge-scheduler", "tf-tuneforge-gateway", "tf-tuneforge-vllm-llama-8b"}
    assert set(by_kind(docs, "Service")) == {"tf-tuneforge-api", "tf-tuneforge-gateway", "tf-tuneforge-vllm-llama-8b"}
    (migrate,) = by_kind(docs, "Job").values()
    assert "pre-install" in migrate["metadata"]["annotations"]["helm.sh/hook"]
    role = by_kind(docs, "Role")["tf-tuneforge-scheduler"]
    jobs_rule = next(r for r in role["rules"] if r["apiGroups"] == ["batch"])
    # exactly what scheduler/kube.py's KubeBackend calls
    assert jobs_rule["resources"] == ["jobs"] and {"create", "get", "list", "delete"} <= set(jobs_rule["verbs"])
    binding = by_kind(docs, "RoleBinding")["tf-tuneforge-scheduler"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tf-tuneforge-scheduler", "namespace": NAMESPACE}]
    assert deployments["tf-tuneforge-scheduler"]["spec"]["template"]["spec"]["serviceAccountName"] == "tf-tuneforge-scheduler"


def test_celery_backend_has_pools_and_no_jobs_rbac():
    docs = render(CELERY)
    assert "Role" not in {d["kind"] for d in docs}
    workers = {n: d for n, d in by_kind(docs, "Deployment").items() if "-worker-" in n}
    fleet = parse_fleet(CELERY["fleet"])
    for pool in CELERY["workers"]["pools"]:
        dep = workers[f"tf-tuneforge-worker-{pool['name']}"]
        pod = dep["spec"]["template"]["spec"]
        worker = pod["containers"][0]
        gpu = fleet.get(pool["gpuClass"])
        # the queue each pool consumes is the one the scheduler routes to (scheduler/fleet.py)
        assert worker["args"] == ["worker", "--queue", gpu.queue(pool["kind"])]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == str(pool["gpus"])
        assert pod.get("nodeSelector", {}) == gpu.node_selector
        for t in gpu.tolerations:
            assert t.model_dump(exclude_none=True) in pod["tolerations"]
    assert workers["tf-tuneforge-worker-h100-multi"]["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "big-jobs"


def test_no_secret_is_created_and_every_reference_names_a_configured_secret():
    for values in ({}, CELERY):
        docs = render(values)
        assert "Secret" not in {d["kind"] for d in docs}
        allowed = {"tuneforge-database", "tuneforge-redis", "tuneforge-storage"}
        for _, cs in containers(docs):
            for c in cs:
                for e in c.get("env", []):
                    assert "value" in e or "valueFrom" in e
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] in allowed
                    if e["name"] in ("TUNEFORGE_DATABASE_URL", "TUNEFORGE_BROKER_URL"):
                        assert ref, f"{e['name']} must come from a Secret"
                for src in c.get("envFrom", []):
                    if "secretRef" in src:
                        assert src["secretRef"]["name"] in allowed


def _config(docs) -> dict[str, str]:
    return by_kind(docs, "ConfigMap")["tf-tuneforge-config"]["data"]


def test_config_map_settings_parse_with_the_code_that_reads_them(monkeypatch):
    docs = render(CELERY)
    data = _config(docs)
    assert parse_fleet(data["TUNEFORGE_FLEET"]) == parse_fleet(CELERY["fleet"])
    engines = json.loads(data["TUNEFORGE_ENGINES"])
    assert engines == {
        "meta-llama/Llama-3.1-8B-Instruct": ["http://tf-tuneforge-vllm-llama-8b:8000", "http://tf-tuneforge-vllm-llama-8b-l4:8000"],
        "Qwen/Qwen2.5-7B-Instruct": ["http://tf-tuneforge-vllm-qwen-7b:8000"],
    }
    services = by_kind(docs, "Service")
    for urls in engines.values():
        for url in urls:
            assert url.split("//")[1].split(":")[0] in services
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    kube = KubeSettings()
    assert (kube.namespace, kube.image, kube.service_account, kube.config_map) == (NAMESPACE, "tuneforge/worker:0.1.0", "tf-tuneforge-worker", "tf-tuneforge-config")
    assert (kube.database_secret, kube.broker_secret, kube.storage_secret) == ("tuneforge-database", "tuneforge-redis", "tuneforge-storage")
    assert kube.backoff_limit == 1 and kube.ttl_seconds_after_finished == 3600
    assert data["TUNEFORGE_SERVING_URL"] == "http://tf-tuneforge-gateway:8001" and "tf-tuneforge-gateway" in services


@pytest.mark.parametrize("values,message", [
    ({"scheduler": {"backend": "slurm"}}, "backend"),
    ({"fleet": {"classes": [{"name": "H100", "memory_gb": 80}]}}, "name"),
    ({"fleet": {"classes": [{"name": "h100", "memory_gb": 80, "vram": 80}]}}, "vram"),
    ({"config": {"baseModels": [], "storageUrl": "s3://b"}}, "baseModels"),
    ({"config": {"baseModels": ["m"], "storageUrl": "/tmp/objects"}}, "storageUrl"),
    ({"externalDatabase": {"existingSecret": ""}}, "existingSecret"),
    ({"vllm": {"loraCacheMaxBytes": 0}}, "loraCacheMaxBytes"),
])
def test_bad_values_are_refused_naming_the_key(values, message):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match=message):
        chart.validate_schema(values)


def test_a_pool_on_an_unknown_gpu_class_fails_rendering_with_its_name():
    values = {**CELERY, "workers": {"pools": [{"name": "a100", "gpuClass": "a100", "kind": "single-gpu", "replicas": 1, "gpus": 1}]}}
    with pytest.raises(helm.HelmRenderError, match='gpuClass "a100" is not in fleet.classes'):
        render(values)


def test_every_deployable_starts_from_the_rendered_environment(monkeypatch, tmp_path):
    """The ConfigMap plus the referenced Secrets' keys are a complete production configuration for
    the API, the gateway, the scheduler and the training Jobs (each refuses to start otherwise)."""
    from api.settings import ApiSettings
    from scheduler.settings import Settings
    from serving.settings import ServingSettings

    docs = render()
    for key, value in _config(docs).items():
        monkeypatch.setenv(key, value)
    # what the Secrets would inject (the chart only names them)
    monkeypatch.setenv("TUNEFORGE_DATABASE_URL", "postgresql+psycopg://u:p@db:5432/tuneforge")
    monkeypatch.setenv("TUNEFORGE_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(tmp_path))  # /data in the pods
    api, serving, scheduler = ApiSettings(), ServingSettings(), Settings()
    assert api.environment == serving.environment == scheduler.environment == "production"
    assert api.serving_url == "http://tf-tuneforge-gateway:8001"
    assert serving.engines == {"meta-llama/Llama-3.1-8B-Instruct": ["http://tf-tuneforge-vllm-llama-8b:8000"]}
    assert serving.engine_kind == "vllm"
    # the vLLM pool runs the resolver plugin with the environment serving.vllm_plugin.config.vllm_env names
    from serving.vllm_plugin.config import vllm_env

    [container] = by_kind(docs, "Deployment")["tf-tuneforge-vllm-llama-8b"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    expected = vllm_env(serving.storage_url, "meta-llama/Llama-3.1-8B-Instruct")
    assert {k: env.get(k) for k in expected if k != "TUNEFORGE_LORA_CACHE_DIR"} == {k: v for k, v in expected.items() if k != "TUNEFORGE_LORA_CACHE_DIR"}
    assert "--served-model-name=meta-llama/Llama-3.1-8B-Instruct" in container["args"]
    assert api.base_models == ["meta-llama/Llama-3.1-8B-Instruct"] and api.storage_url.startswith("s3://")
