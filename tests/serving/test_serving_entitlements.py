"""Base-model entitlements at the gateway, with two organizations: a base the caller's org is not
entitled to (by the platform default or by a revocation of its own) is a 404 ``model_not_found`` on
inference and on /v1/models list and retrieve, exactly as a model that does not exist, and so are the
org's fine-tuned models and checkpoints of that base; the other org is unaffected."""

from __future__ import annotations

import time

import openai
import pytest

from scheduler.entitlements import set_entitlement
from scheduler.models import Adapter, Checkpoint
from scheduler.settings import BUILTIN_BASE_MODEL

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]
OTHER = "acme/other-base-1b"


def _refused(call) -> dict:
    with pytest.raises(openai.NotFoundError) as err:
        call()
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    return err.value.body


def _ids(client) -> set[str]:
    return {m.id for m in client.models.list()}


@pytest.fixture
def two_bases(engines, gateway):
    """A gateway over two base models, each with its engine; ``gw(**settings)``."""
    tiny, other = engines(), engines(base=OTHER)

    def start(**settings):
        settings.setdefault("model_cache_ttl_s", 0)
        return gateway({BUILTIN_BASE_MODEL: [tiny.url], OTHER: [other.url]}, base_models=[BUILTIN_BASE_MODEL, OTHER], **settings), tiny, other

    return start


def test_a_default_list_entitles_only_its_bases_and_a_grant_adds_one_for_one_org(two_bases, make_org, db_session):
    gw, _, other = two_bases(default_base_models=[BUILTIN_BASE_MODEL])
    org_a, key_a = make_org()
    _, key_b = make_org()
    set_entitlement(db_session, org_a.id, OTHER, True)
    a, b = gw.client(key_a), gw.client(key_b)

    assert _ids(a) == {BUILTIN_BASE_MODEL, OTHER} and _ids(b) == {BUILTIN_BASE_MODEL}
    assert a.chat.completions.create(model=OTHER, messages=MESSAGES).choices and a.models.retrieve(OTHER).id == OTHER
    refused = _refused(lambda: b.chat.completions.create(model=OTHER, messages=MESSAGES))
    missing = _refused(lambda: b.chat.completions.create(model="acme/no-such-model", messages=MESSAGES))
    assert refused["message"].replace(OTHER, "X") == missing["message"].replace("acme/no-such-model", "X")  # indistinguishable
    _refused(lambda: b.completions.create(model=OTHER, prompt="x"))
    _refused(lambda: b.embeddings.create(model=OTHER, input="x"))
    _refused(lambda: b.models.retrieve(OTHER))
    _refused(lambda: b.models.delete(OTHER))  # not a 403 "is a base model": that would say it exists
    with pytest.raises(openai.PermissionDeniedError):
        a.models.delete(OTHER)  # an entitled base: not the tenant's to delete
    assert other.state.served == [OTHER]  # only org A's request reached the engine
    assert b.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES).choices


def test_a_revocation_overrides_the_default_for_that_org_only(two_bases, make_org, db_session):
    gw, tiny, _ = two_bases()  # no default configured: every base model, as before entitlements
    org_a, key_a = make_org()
    _, key_b = make_org()
    a, b = gw.client(key_a), gw.client(key_b)
    assert _ids(a) == _ids(b) == {BUILTIN_BASE_MODEL, OTHER}

    set_entitlement(db_session, org_a.id, BUILTIN_BASE_MODEL, False)
    _refused(lambda: a.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES))
    _refused(lambda: a.models.retrieve(BUILTIN_BASE_MODEL))
    assert _ids(a) == {OTHER} and _ids(b) == {BUILTIN_BASE_MODEL, OTHER}
    assert b.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES).choices
    assert tiny.state.served == [BUILTIN_BASE_MODEL]

    set_entitlement(db_session, org_a.id, BUILTIN_BASE_MODEL, True)  # granted again
    assert a.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES).choices


def test_an_empty_default_entitles_nothing_without_a_grant(two_bases, make_org, db_session):
    gw, _, _ = two_bases(default_base_models=[])
    org_a, key_a = make_org()
    _, key_b = make_org()
    set_entitlement(db_session, org_a.id, BUILTIN_BASE_MODEL, True)
    assert _ids(gw.client(key_a)) == {BUILTIN_BASE_MODEL} and _ids(gw.client(key_b)) == set()
    _refused(lambda: gw.client(key_b).chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES))


def test_fine_tuned_models_of_a_base_no_longer_entitled_are_404_and_serve_again_once_granted(two_bases, make_org, make_adapter, db_session):
    """Versions, versionless names and checkpoints of a revoked base: 404 on inference, list, retrieve
    and the check route; the org still sees them in /v1/adapters (and may delete them). The other org's
    adapters of the same base are unaffected."""
    gw, tiny, _ = two_bases()
    org_a, key_a = make_org()
    org_b, key_b = make_org()
    mine, theirs = make_adapter(org_a), make_adapter(org_b)
    db_session.add(Checkpoint(job_id=db_session.get(Adapter, mine).job_id, org_id=org_a.id, step=10, storage_key="jobs/x/ckpt-10"))
    db_session.flush()
    name, ckpt = mine.rsplit(":", 1)[0], f"{mine}:ckpt-step-10"
    a, b = gw.client(key_a), gw.client(key_b)
    assert a.chat.completions.create(model=mine, messages=MESSAGES).choices

    set_entitlement(db_session, org_a.id, BUILTIN_BASE_MODEL, False)
    for model in (mine, name, ckpt):
        _refused(lambda: a.chat.completions.create(model=model, messages=MESSAGES))
        _refused(lambda: a.models.retrieve(model))
    assert _ids(a) == {OTHER}
    check = gw.http().post(f"/v1/adapters/{mine}/check", headers={"Authorization": f"Bearer {key_a}"})
    assert check.status_code == 404 and check.json()["error"]["code"] == "model_not_found"
    listed = gw.http().get("/v1/adapters", headers={"Authorization": f"Bearer {key_a}"}).json()["data"]
    assert [v["id"] for group in listed for v in group["versions"]] == [mine]
    assert b.chat.completions.create(model=theirs, messages=MESSAGES).choices and theirs in _ids(b)

    set_entitlement(db_session, org_a.id, BUILTIN_BASE_MODEL, True)
    assert a.chat.completions.create(model=name, messages=MESSAGES).choices and tiny.state.served[-1] == mine
    assert {mine, name} <= _ids(a)


def test_a_revocation_reaches_a_gateway_that_cached_the_base_within_the_model_cache_ttl(two_bases, make_org, db_session):
    gw, _, _ = two_bases(model_cache_ttl_s=0.5)
    org_a, key_a = make_org()
    a = gw.client(key_a)
    assert a.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES).choices
    set_entitlement(db_session, org_a.id, BUILTIN_BASE_MODEL, False)
    time.sleep(0.6)
    _refused(lambda: a.chat.completions.create(model=BUILTIN_BASE_MODEL, messages=MESSAGES))
