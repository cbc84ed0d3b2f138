"""Authentication and model scoping: a caller sees and uses only the base catalog and its own
organization's fine-tuned models; another org's model is indistinguishable from a missing one."""

from __future__ import annotations

import time

import openai
import pytest

from scheduler.models import ApiKey, Role
from scheduler.settings import BUILTIN_BASE_MODEL
from scheduler.tenancy import hash_key, revoke

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer tf-not-a-real-key-000000000"}, {"Authorization": "Basic abc"}])
def test_requests_without_a_valid_key_are_401_with_a_request_id(engines, gateway, headers):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})

    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
        response = gw.http().request(method, path, json={"model": BUILTIN_BASE_MODEL, "messages": MESSAGES}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["x-request-id"].startswith("req_")
    assert engine.state.served == []


def test_the_sdk_raises_authentication_error_for_a_wrong_key(engines, gateway):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})

    with pytest.raises(openai.AuthenticationError):
        gw.client("tf-wrong-key-aaaaaaaaaaaaaaaaaaaa").models.list()


def test_a_revoked_key_is_rejected_within_the_auth_cache_ttl(engines, gateway, make_org, db_session):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]}, auth_cache_ttl_s=0.5)
    _, key = make_org()
    assert gw.client(key).models.list().data
    revoke(db_session, db_session.query(ApiKey).filter_by(key_hash=hash_key(key)).one())
    db_session.flush()
    time.sleep(0.6)

    with pytest.raises(openai.AuthenticationError):
        gw.client(key).models.list()


def test_without_the_auth_cache_a_revoked_key_is_rejected_at_once(engines, gateway, make_org, db_session):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]}, auth_cache_ttl_s=0)
    _, key = make_org()
    assert gw.client(key).models.list().data
    revoke(db_session, db_session.query(ApiKey).filter_by(key_hash=hash_key(key)).one())
    db_session.flush()

    with pytest.raises(openai.AuthenticationError):
        gw.client(key).models.list()


def test_models_list_has_the_catalog_and_only_the_callers_adapters(engines, gateway, make_org, make_adapter):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org_a, key_a = make_org()
    org_b, key_b = make_org()
    a1, a2 = make_adapter(org_a, suffix="one"), make_adapter(org_a, suffix="two")
    b1 = make_adapter(org_b)

    seen_by_a = {m.id: m.owned_by for m in gw.client(key_a).models.list()}
    seen_by_b = {m.id: m.owned_by for m in gw.client(key_b).models.list()}

    # Each version by its id, and each versionless name (which runs its active version).
    name = lambda model: model.rsplit(":", 1)[0]  # noqa: E731
    assert seen_by_a == {BUILTIN_BASE_MODEL: "system", a1: org_a.name, a2: org_a.name, name(a1): org_a.name, name(a2): org_a.name}
    assert seen_by_b == {BUILTIN_BASE_MODEL: "system", b1: org_b.name, name(b1): org_b.name}


def test_a_viewer_key_may_list_and_call_models(engines, gateway, make_org):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    _, key = make_org(role=Role.viewer)

    answer = gw.client(key).chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES, max_tokens=1)

    assert answer.choices[0].message.content == BUILTIN_BASE_MODEL


def test_retrieve_model_is_scoped_like_the_list(engines, gateway, make_org, make_adapter):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org_a, key_a = make_org()
    _, key_b = make_org()
    mine = make_adapter(org_a)

    assert gw.client(key_a).models.retrieve(mine).owned_by == org_a.name
    assert gw.client(key_a).models.retrieve(BUILTIN_BASE_MODEL).owned_by == "system"
    with pytest.raises(openai.NotFoundError) as foreign:
        gw.client(key_b).models.retrieve(mine)
    with pytest.raises(openai.NotFoundError) as missing:
        gw.client(key_b).models.retrieve(mine.replace(":demo:", ":other:"))
    assert foreign.value.body["code"] == missing.value.body["code"] == "model_not_found"


def test_calling_another_orgs_adapter_is_404_exactly_like_a_missing_model(engines, gateway, make_org, make_adapter):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org_a, _ = make_org()
    _, key_b = make_org()
    theirs = make_adapter(org_a)
    missing = theirs[:-4] + "zzzz"

    errors = []
    for model in (theirs, missing):
        with pytest.raises(openai.NotFoundError) as err:
            gw.client(key_b).chat.completions.create(model=model, messages=MESSAGES)
        errors.append(err.value.body)

    assert errors[0]["code"] == errors[1]["code"] == "model_not_found"
    assert errors[0]["message"].replace(theirs, "X") == errors[1]["message"].replace(missing, "X")
    assert engine.state.load_calls == {} and engine.state.served == []  # nothing reached the engine


def test_unknown_base_model_is_404(engines, gateway, make_org):
    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    _, key = make_org()

    with pytest.raises(openai.NotFoundError) as err:
        gw.client(key).completions.create(model="gpt-4o", prompt="x")

    assert err.value.body["param"] == "model"


def test_models_list_marks_a_fine_tuned_version_until_its_check_passed(engines, gateway, make_org, make_adapter, db_session):
    """A version not checked yet is listed (as OpenAI lists a fine-tuned model once its job succeeded) and
    marked "unchecked" (its first request checks it); a failed one is not listed; base models carry no mark."""
    from serving.adapter_registry import record_check

    gw = gateway({BUILTIN_BASE_MODEL: [engines().url]})
    org, key = make_org()
    unchecked, failed = make_adapter(org, suffix="new", checked=False), make_adapter(org, suffix="bad", checked=False)
    record_check(db_session, org.id, failed, {"passed": False, "reason": "rank too large", "code": "rank_too_large"})
    client = gw.client(key)

    assert {m.id: m.model_extra["compatibility"] for m in client.models.list()} == {BUILTIN_BASE_MODEL: None, unchecked: "unchecked"}
    assert client.models.retrieve(unchecked).model_extra["compatibility"] == "unchecked"
    record_check(db_session, org.id, unchecked, {"passed": True, "static": {}, "logits": {"status": "match"}})
    name = unchecked.rsplit(":", 1)[0]
    assert {m.id: m.model_extra["compatibility"] for m in client.models.list()} == {BUILTIN_BASE_MODEL: None, unchecked: "passed", name: "passed"}
    assert client.models.retrieve(failed).model_extra["compatibility"] == "failed"
