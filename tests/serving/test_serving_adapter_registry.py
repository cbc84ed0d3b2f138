"""The adapter registry through the gateway: a versionless name runs its active version, promote and
rollback move it, delete unloads the version on every replica and makes it a 404, the compatibility
check runs at first use and refuses what cannot be served, and only the org's admins change anything."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest

from gpu_worker.storage import LocalStore
from scheduler.models import Role
from scheduler.settings import BUILTIN_BASE_MODEL
from serving.compatibility import Incompatible, check_files
from serving.vllm_plugin import index

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]


def name_of(version: str) -> str:
    return version.rsplit(":", 1)[0]


def test_name_runs_active_version_promote_rollback(engines, gateway, make_org, make_adapter):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    v1, v2 = make_adapter(org), make_adapter(org)
    client, name = gw.client(key), name_of(v1)
    assert name == name_of(v2)

    listed = gw.http().get("/v1/adapters", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert [(a["id"], a["active_version"], [(v["id"], v["version"], v["status"]) for v in a["versions"]]) for a in listed] == [
        (name, v1, [(v1, 1, "active"), (v2, 2, "ready")])
    ]
    client.chat.completions.create(model=name, messages=MESSAGES)
    assert engine.state.served[-1] == v1

    admin = {"Authorization": f"Bearer {key}"}
    answer = gw.http().post(f"/v1/adapters/{name}/promote", json={"model": v2}, headers=admin)
    assert answer.status_code == 200 and answer.json() == {"name": name, "previous": v1, "active": v2}
    client.chat.completions.create(model=name, messages=MESSAGES)
    assert engine.state.served[-1] == v2
    client.chat.completions.create(model=v1, messages=MESSAGES)  # a version id stays pinned
    assert engine.state.served[-1] == v1

    answer = gw.http().post(f"/v1/adapters/{name}/rollback", headers=admin)
    assert answer.json() == {"name": name, "previous": v2, "active": v1}
    client.chat.completions.create(model=name, messages=MESSAGES)
    assert engine.state.served[-1] == v1
    again = gw.http().post(f"/v1/adapters/{name}/rollback", headers=admin)
    assert again.status_code == 400 and again.json()["error"]["code"] == "no_previous_version"


def test_delete_unloads_on_every_replica(engines, gateway, make_org, make_adapter):
    e1, e2 = engines(), engines()
    gw = gateway({BUILTIN_BASE_MODEL: [e1.url, e2.url]})
    org, key = make_org()
    v1, v2 = make_adapter(org), make_adapter(org)
    client = gw.client(key)
    for _ in range(4):  # both replicas end up with v1 (routing spreads, then prefers loaded replicas)
        client.chat.completions.create(model=v1, messages=MESSAGES)
    for engine in (e1, e2):
        engine.state.loaded.setdefault(v1, "store:x")

    answer = gw.http().delete(f"/v1/adapters/{v1}", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200 and answer.json()["versions"] == [v1]
    assert v1 not in e1.state.loaded and v1 not in e2.state.loaded
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=v1, messages=MESSAGES)
    client.chat.completions.create(model=name_of(v1), messages=MESSAGES)  # the name fell back to v2
    assert e1.state.served[-1:] == [v2] or e2.state.served[-1:] == [v2]

    gw.http().delete(f"/v1/adapters/{name_of(v1)}", headers={"Authorization": f"Bearer {key}"})
    for model in (v2, name_of(v1)):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=model, messages=MESSAGES)


def test_only_the_orgs_admins_change_the_registry(engines, gateway, make_org, make_adapter, db_session):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org, admin_key = make_org()
    from scheduler.tenancy import create_api_key

    _, member_key = create_api_key(db_session, org, "member", Role.member)
    _, other_key = make_org()
    db_session.flush()
    v1 = make_adapter(org)

    member = gw.http().delete(f"/v1/adapters/{v1}", headers={"Authorization": f"Bearer {member_key}"})
    assert member.status_code == 403 and member.json()["error"]["code"] == "insufficient_permissions"
    assert member.json()["error"]["type"] == "permission_error"  # as the management API's 403s
    other = gw.http().delete(f"/v1/adapters/{v1}", headers={"Authorization": f"Bearer {other_key}"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    assert gw.http().get("/v1/adapters", headers={"Authorization": f"Bearer {other_key}"}).json()["data"] == []
    assert gw.client(admin_key).chat.completions.create(model=v1, messages=MESSAGES).choices


def test_openai_models_delete_deletes_a_fine_tuned_model_but_never_a_base_model(engines, gateway, make_org, make_adapter, db_session):
    """The SDK's ``models.delete``: one version, then a name with the rest of its versions, as
    ``DELETE /v1/adapters`` deletes them; an admin's only, and never a base model."""
    from scheduler.tenancy import create_api_key

    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    _, member_key = create_api_key(db_session, org, "member", Role.member)
    db_session.flush()
    v1, v2 = make_adapter(org), make_adapter(org)
    client = gw.client(key)
    client.chat.completions.create(model=v1, messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError):
        gw.client(member_key).models.delete(v1)

    deleted = client.models.delete(v1)
    assert (deleted.id, deleted.deleted, deleted.object) == (v1, True, "model")
    assert v1 not in engine.state.loaded
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(v1)
    assert client.models.retrieve(name_of(v1)).id == name_of(v1)  # the name now runs v2
    client.models.delete(name_of(v1))
    for model in (v2, name_of(v1)):
        with pytest.raises(openai.NotFoundError):
            client.models.delete(model)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.models.delete(BUILTIN_BASE_MODEL)
    assert err.value.body["param"] == "model"
    assert client.models.retrieve(BUILTIN_BASE_MODEL).id == BUILTIN_BASE_MODEL


def test_a_jobs_checkpoints_are_models_as_in_openais_api(engines, gateway, make_org, make_adapter, db_session):
    """``{fine-tuned model}:ckpt-step-{N}`` (the job's checkpoint list names it) runs the adapter saved at
    step N, under its own name; a step the job never saved, a versionless name, another org's model and
    a failed final check are refused; deleting the model unloads its checkpoints too."""
    from scheduler.models import Adapter, Checkpoint
    from serving.adapter_registry import record_check

    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    model = make_adapter(org, storage_key="jobs/x/adapter")
    db_session.add(Checkpoint(job_id=db_session.get(Adapter, model).job_id, org_id=org.id, step=20, storage_key="jobs/x/checkpoints/step-000020"))
    db_session.flush()
    client = gw.client(key)
    ckpt = f"{model}:ckpt-step-20"

    assert client.chat.completions.create(model=ckpt, messages=MESSAGES).choices
    assert engine.state.loaded[ckpt] == "store:jobs/x/checkpoints/step-000020" and engine.state.served[-1] == ckpt
    assert client.models.retrieve(ckpt).id == ckpt
    _, other_key = make_org()
    for missing, who in ((f"{model}:ckpt-step-21", key), (f"{name_of(model)}:ckpt-step-20", key), (f"{model}:ckpt-step-9999999999", key),
                         (ckpt, other_key)):
        with pytest.raises(openai.NotFoundError):
            gw.client(who).chat.completions.create(model=missing, messages=MESSAGES)

    client.models.delete(model)
    assert ckpt not in engine.state.loaded
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=ckpt, messages=MESSAGES)

    failed = make_adapter(org, suffix="bad", checked=False)
    db_session.add(Checkpoint(job_id=db_session.get(Adapter, failed).job_id, org_id=org.id, step=5, storage_key="k"))
    record_check(db_session, org.id, failed, {"passed": False, "reason": "rank 512 above the serving limit"})
    db_session.flush()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=f"{failed}:ckpt-step-5", messages=MESSAGES)
    assert err.value.body["code"] == "adapter_incompatible"


def _put_adapter(store: LocalStore, prefix: str, *, config: dict | None = None, tensors: dict | None = None, extra: dict | None = None) -> None:
    config = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": BUILTIN_BASE_MODEL, **(config or {})}
    store.put_bytes(f"{prefix}/adapter_config.json", json.dumps(config).encode())
    tensors = tensors or {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]},
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": {"dtype": "F32", "shape": [64, 8], "data_offsets": [2048, 4096]},
    }
    header = json.dumps(tensors).encode()
    store.put_bytes(f"{prefix}/adapter_model.safetensors", len(header).to_bytes(8, "little") + header + bytes(4096))
    for name, data in (extra or {}).items():
        store.put_bytes(f"{prefix}/{name}", data)


def _put_reference(store: LocalStore, prefix: str) -> None:
    """A training-side reference (``gpu_worker.engine.compat.write_reference``'s layout): one prompt of
    two tokens, the top 2 next-token log-probabilities after each."""
    from safetensors.numpy import save

    tensors = {
        "ids_0": np.array([5, 6], dtype=np.int64),
        "top_ids_0": np.array([[1, 2], [3, 4]], dtype=np.int64),
        "top_logprobs_0": np.array([[-0.5, -1.5], [-0.25, -2.0]], dtype=np.float32),
    }
    store.put_bytes(f"{prefix}/reference_logits.safetensors", save(tensors))


def _trained_here(db_session, model: str) -> None:
    """Give the row the manifest a platform training run gives it (scheduler.agent: an AdapterManifest)."""
    from scheduler.models import Adapter

    row = db_session.get(Adapter, model)
    row.manifest = {"schema_version": 1, "job_id": row.job_id, "base_model": row.base_model, "key": row.storage_key, "files": []}
    db_session.flush()


def _versions(gw, key) -> dict:
    answer = gw.http().get("/v1/adapters", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    return {v["id"]: v for a in answer for v in a["versions"]}


def test_check_runs_at_first_use_and_refuses_pickles(engines, gateway, make_org, make_adapter, data_dir):
    """On vLLM (its resolver loads adapters by name from the index): the check publishes the adapter,
    vLLM loads it on the check's request, and a failed adapter is never published. ``good`` has no
    platform manifest (imported): without a reference it passes on loading and answering alone, and its
    report says so."""
    store = LocalStore(data_dir / "objects")
    engine = engines(resolver_store=str(data_dir / "objects"))
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]}, engine_kind="vllm")
    org, key = make_org()
    _put_adapter(store, "adapters/good")
    _put_adapter(store, "adapters/bad", extra={"adapter_model.bin": b"pickle"})
    good = make_adapter(org, suffix="good", checked=False, storage_key="adapters/good")
    bad = make_adapter(org, suffix="bad", checked=False, storage_key="adapters/bad")

    assert gw.client(key).chat.completions.create(model=good, messages=MESSAGES).choices
    with pytest.raises(openai.BadRequestError) as err:
        gw.client(key).chat.completions.create(model=bad, messages=MESSAGES)
    assert err.value.code == "adapter_incompatible" and "pickle" in err.value.message
    assert engine.state.load_calls == {good: 1} and engine.state.not_found == 0  # the bad one never reached it
    assert sum(engine.state.load_requests.values()) == 0  # vLLM is never sent a path
    listed = _versions(gw, key)
    assert listed[good]["status"] == "active" and listed[good]["compatibility"]["logits"] == {"status": "no_reference"}
    assert listed[good]["compatibility"]["reference"] == "none: imported adapter"
    assert listed[bad]["status"] == "incompatible" and listed[bad]["version"] is None
    # Published for vLLM's resolver by the check; withdrawn (and unloaded) when deleted.
    assert index.lookup(store, good).key == "adapters/good" and index.lookup(store, bad) is None
    gw.http().delete(f"/v1/adapters/{good}", headers={"Authorization": f"Bearer {key}"})
    assert index.lookup(store, good) is None and good not in engine.state.loaded


def test_a_platform_trained_adapter_without_its_reference_fails_the_check(engines, gateway, make_org, make_adapter, data_dir, db_session):
    """Trained here, an adapter must reproduce its training-side reference: without one it is refused (it
    used to pass as "no_reference"); with one it is compared and passes or fails on the comparison."""
    store = LocalStore(data_dir / "objects")
    engine = engines(resolver_store=str(data_dir / "objects"))
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]}, engine_kind="vllm")
    org, key = make_org()
    _put_adapter(store, "adapters/noref")
    _put_adapter(store, "adapters/ref")
    _put_reference(store, "adapters/ref")
    noref = make_adapter(org, suffix="noref", checked=False, storage_key="adapters/noref")
    ref = make_adapter(org, suffix="ref", checked=False, storage_key="adapters/ref")
    for model in (noref, ref):
        _trained_here(db_session, model)

    with pytest.raises(openai.BadRequestError) as err:
        gw.client(key).chat.completions.create(model=noref, messages=MESSAGES)
    assert err.value.code == "adapter_incompatible" and "reference_logits.safetensors" in err.value.message
    assert gw.client(key).chat.completions.create(model=ref, messages=MESSAGES).choices
    listed = _versions(gw, key)
    assert (listed[noref]["status"], listed[noref]["compatibility"]["code"]) == ("incompatible", "reference_missing")
    assert listed[ref]["status"] == "active" and listed[ref]["compatibility"]["logits"]["status"] == "match"
    assert noref not in engine.state.load_calls and index.lookup(store, noref) is None  # refused before any engine

    engine.state.logprob_shift = 1.0  # an engine that does not reproduce training: refused on the comparison
    again = gw.http().post(f"/v1/adapters/{ref}/check", params={"force": "true"}, headers={"Authorization": f"Bearer {key}"})
    assert again.status_code == 200 and again.json()["code"] == "logits_mismatch"


class _CheckRoute:
    """An engine that has the built-in engine's check route (the fake vLLM with the route added): it
    answers each check with the next of ``answers`` ((status, body) or a delay in seconds, then 200)."""

    MATCH = {"base_model": BUILTIN_BASE_MODEL, "logits": {"status": "match", "prompts": 1, "max_abs_diff": 0.0, "top1_agreement": 1.0}}

    def __init__(self, answers):
        from tests.serving.conftest import FakeEngine, LiveServer
        from fake_vllm import EngineState, create_engine_app
        from fastapi import FastAPI

        self.answers, self.calls = list(answers), 0
        state = EngineState(base_model=BUILTIN_BASE_MODEL)
        app = create_engine_app(state)
        routes = app if isinstance(app, FastAPI) else app.app  # the FastAPI app inside the fake's ASGI middleware
        routes.add_api_route("/v1/tuneforge/check_adapter", self._check, methods=["POST"])
        self.engine = FakeEngine(state, LiveServer(app).start())

    async def _check(self):
        import asyncio

        from fastapi.responses import JSONResponse

        self.calls += 1
        answer = self.answers.pop(0) if self.answers else (200, self.MATCH)
        if isinstance(answer, (int, float)):
            await asyncio.sleep(answer)
            answer = (200, self.MATCH)
        return JSONResponse(answer[1], status_code=answer[0])


@pytest.fixture
def check_engine():
    made = []

    def make(*answers) -> _CheckRoute:
        made.append(_CheckRoute(answers))
        return made[-1]

    yield make
    for route in made:
        route.engine.stop()


def test_an_engine_error_during_the_check_is_a_503_and_records_nothing(check_engine, gateway, make_org, make_adapter, data_dir, caplog):
    """5xx, a timeout or no replica say nothing about the adapter: the client gets a retryable 503
    without the engine's message, nothing is stored, and the next request checks again and passes."""
    internal = {"error": {"message": "Traceback: CUDA error at /srv/secret/path.py", "type": "InternalServerError", "code": 500}}
    route = check_engine((500, internal), 5.0, (502, "bad gateway"))
    gw = gateway({BUILTIN_BASE_MODEL: [route.engine.url]}, adapter_load_timeout_s=0.5)
    org, key = make_org()
    _put_adapter(LocalStore(data_dir / "objects"), "adapters/a")
    model = make_adapter(org, suffix="a", checked=False, storage_key="adapters/a")

    for _ in range(3):  # the 500, the timeout, the 502
        answer = gw.http().post("/v1/chat/completions", json={"model": model, "messages": MESSAGES}, headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        error = answer.json()["error"]
        assert (error["code"], error["type"], error["param"]) == ("adapter_check_unavailable", "server_error", "model")
        assert "secret" not in answer.text and "Traceback" not in answer.text
        assert _versions(gw, key)[model]["status"] == "unchecked"
    assert "/srv/secret/path.py" in caplog.text  # the operator sees it in the log
    assert gw.client(key).chat.completions.create(model=model, messages=MESSAGES).choices
    assert route.calls == 4 and _versions(gw, key)[model]["status"] == "active"


def test_no_replica_for_the_check_is_a_503(check_engine, gateway, make_org, make_adapter, data_dir):
    route = check_engine()
    gw = gateway({BUILTIN_BASE_MODEL: [route.engine.url]})
    org, key = make_org()
    _put_adapter(LocalStore(data_dir / "objects"), "adapters/a")
    model = make_adapter(org, suffix="a", checked=False, storage_key="adapters/a")
    route.engine.stop()

    answer = gw.http().post(f"/v1/adapters/{model}/check", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "adapter_check_unavailable"
    assert "retry-after" in answer.headers and _versions(gw, key)[model]["compatibility"] is None


def test_the_adapters_own_refusal_is_a_verdict_and_force_checks_again(check_engine, gateway, make_org, make_adapter, data_dir):
    """A 400 from the engine (the adapter's shapes, its base) is stored; POST /check returns the stored
    verdict without asking the engine, and ``?force=true`` asks it again and replaces the verdict."""
    refusal = {"error": {"message": "adapter weight 'x' has shape (8, 3), the base model needs (8, 64)", "type": "BadRequestError", "code": "shape_mismatch"}}
    route = check_engine((400, refusal))
    gw = gateway({BUILTIN_BASE_MODEL: [route.engine.url]})
    org, key = make_org()
    admin = {"Authorization": f"Bearer {key}"}
    _put_adapter(LocalStore(data_dir / "objects"), "adapters/a")
    model = make_adapter(org, suffix="a", checked=False, storage_key="adapters/a")

    with pytest.raises(openai.BadRequestError) as err:
        gw.client(key).chat.completions.create(model=model, messages=MESSAGES)
    assert err.value.code == "adapter_incompatible" and "shape (8, 3)" in err.value.message
    stored = gw.http().post(f"/v1/adapters/{model}/check", headers=admin).json()
    assert (stored["passed"], stored["code"], route.calls) == (False, "shape_mismatch", 1)

    fixed = gw.http().post(f"/v1/adapters/{model}/check", params={"force": "true"}, headers=admin)
    assert fixed.status_code == 200 and fixed.json()["passed"] is True and route.calls == 2
    assert _versions(gw, key)[model]["status"] == "active" and _versions(gw, key)[model]["version"] == 1
    assert gw.client(key).chat.completions.create(model=model, messages=MESSAGES).choices
    assert route.engine.state.served[-1] == model
    bad = gw.http().post(f"/v1/adapters/{model}/check", params={"force": "maybe"}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "force"


def test_a_forced_recheck_that_fails_stops_serving_the_version(check_engine, gateway, make_org, make_adapter, data_dir):
    route = check_engine((200, _CheckRoute.MATCH), (200, {"logits": {"status": "mismatch", "max_abs_diff": 2.5}}))
    gw = gateway({BUILTIN_BASE_MODEL: [route.engine.url]})
    org, key = make_org()
    _put_adapter(LocalStore(data_dir / "objects"), "adapters/a")
    model = make_adapter(org, suffix="a", checked=False, storage_key="adapters/a")
    assert gw.client(key).chat.completions.create(model=model, messages=MESSAGES).choices
    assert model in route.engine.state.loaded

    again = gw.http().post(f"/v1/adapters/{model}/check", params={"force": "true"}, headers={"Authorization": f"Bearer {key}"}).json()
    assert (again["passed"], again["code"]) == (False, "logits_mismatch")
    assert model not in route.engine.state.loaded  # unloaded everywhere
    with pytest.raises(openai.BadRequestError) as err:
        gw.client(key).chat.completions.create(model=model, messages=MESSAGES)
    assert err.value.code == "adapter_incompatible"
    assert _versions(gw, key)[model]["version"] == 1  # it keeps its number; promote another to replace it


def test_a_stored_legacy_no_route_failure_is_checked_again(check_engine, gateway, make_org, make_adapter, data_dir, db_session):
    """Earlier gateways stored "no check route" as a failure; it is not a verdict on the adapter."""
    from serving.adapter_registry import record_check

    route = check_engine()
    gw = gateway({BUILTIN_BASE_MODEL: [route.engine.url]})
    org, key = make_org()
    _put_adapter(LocalStore(data_dir / "objects"), "adapters/a")
    model = make_adapter(org, suffix="a", checked=False, storage_key="adapters/a")
    record_check(db_session, org.id, model, {"passed": False, "reason": "the engine has no adapter check route", "code": "engine_misconfigured"})
    assert _versions(gw, key)[model]["status"] == "unchecked"
    assert gw.client(key).chat.completions.create(model=model, messages=MESSAGES).choices
    assert route.calls == 1


def test_builtin_kind_refuses_an_engine_without_the_check_route(engines, gateway, make_org, make_adapter, data_dir, caplog):
    """A vLLM deployed as if it were the built-in engine cannot check (or load) adapters: a 503 to the
    client, the misconfiguration in the log, and nothing stored against the adapter."""
    engine = engines()  # the fake has no /v1/tuneforge/check_adapter, like vLLM
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    _put_adapter(LocalStore(data_dir / "objects"), "adapters/good")
    good = make_adapter(org, suffix="good", checked=False, storage_key="adapters/good")
    with pytest.raises(openai.InternalServerError) as err:
        gw.client(key).chat.completions.create(model=good, messages=MESSAGES)
    assert err.value.status_code == 503 and err.value.code == "adapter_check_unavailable"
    assert err.value.response.headers["retry-after"] == "5"
    assert "TUNEFORGE_ENGINE_KIND" in caplog.text and "TUNEFORGE_ENGINE_KIND" not in err.value.message
    assert _versions(gw, key)[good]["compatibility"] is None


@pytest.mark.parametrize(
    "change, code",
    [
        ({"config": {"r": 128}}, "rank_too_large"),
        ({"config": {"target_modules": ["q_proj", "lm_head"]}}, "vocabulary_change"),
        ({"config": {"target_modules": ["q_proj", "conv1d"]}}, "unsupported_modules"),
        ({"tensors": {"base_model.model.lm_head.lora_A.weight": {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]}}}, "vocabulary_change"),
        ({"extra": {"sub/optimizer.pt": b"x"}}, "unsafe_adapter_format"),
        ({"config": {"peft_type": "IA3"}}, "adapter_incompatible"),
    ],
)
def test_static_check_rules(tmp_path, change, code):
    store = LocalStore(tmp_path)
    _put_adapter(store, "a", **change)
    with pytest.raises(Incompatible) as err:
        check_files(store, "a", max_rank=64, supported_modules=["q_proj", "v_proj"])
    assert err.value.code == code


def test_static_check_passes_and_reports_facts(tmp_path):
    store = LocalStore(tmp_path)
    _put_adapter(store, "a")
    assert check_files(store, "a", max_rank=8, supported_modules=["q_proj", "v_proj"]) == {"rank": 8, "target_modules": ["q_proj", "v_proj"], "tensors": 2}
