"""/v1/organizations/{org}/entitlements: the platform operator's admins (the ``default`` organization)
grant and revoke base models for any organization; an organization's own admins read theirs; nobody
else learns the organization exists; what is stored is what the gateway enforces."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.deps import get_session
from api.main import create_app
from scheduler import entitlements
from scheduler.models import Role
from scheduler.tenancy import DEFAULT_ORG, create_api_key

TINY, LLAMA = "tuneforge-tiny", "meta-llama/Llama-3.2-1B"  # the catalog of tests/api/conftest.py


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def operator(make_org):
    return make_org(DEFAULT_ORG)


def _table(answer) -> dict:
    assert answer.status_code == 200, answer.text
    return {e["model"]: (e["entitled"], e["source"]) for e in answer.json()["data"]}


def test_the_operator_grants_and_revokes_for_one_org_and_the_other_is_unaffected(http, operator, make_org, db_session):
    _, op_key = operator
    org_a, key_a = make_org("org-a")
    org_b, key_b = make_org("org-b")

    assert _table(http.get(f"/v1/organizations/{org_a.id}/entitlements", headers=_auth(op_key))) == {TINY: (True, "default"), LLAMA: (True, "default")}
    answer = http.delete(f"/v1/organizations/{org_a.id}/entitlements/{LLAMA}", headers=_auth(op_key))
    assert answer.status_code == 200
    assert answer.json() == {"object": "organization.entitlement", "organization": org_a.id, "model": LLAMA, "entitled": False, "source": "revoked"}
    # by name as well as by id; an org's own admin reads its entitlements
    assert _table(http.get("/v1/organizations/org-a/entitlements", headers=_auth(op_key)))[LLAMA] == (False, "revoked")
    assert _table(http.get(f"/v1/organizations/{org_a.id}/entitlements", headers=_auth(key_a)))[LLAMA] == (False, "revoked")
    assert _table(http.get(f"/v1/organizations/{org_b.id}/entitlements", headers=_auth(key_b)))[LLAMA] == (True, "default")
    assert entitlements.entitled_bases(db_session, org_a.id, [TINY, LLAMA], None) == [TINY]  # what the gateway reads

    granted = http.put(f"/v1/organizations/{org_a.id}/entitlements/{LLAMA}", headers=_auth(op_key))
    assert granted.json()["entitled"] is True and granted.json()["source"] == "granted"
    again = http.put(f"/v1/organizations/{org_a.id}/entitlements/{LLAMA}", headers=_auth(op_key))  # idempotent
    assert again.status_code == 200 and entitlements.entitled_bases(db_session, org_a.id, [TINY, LLAMA], None) == [TINY, LLAMA]


def test_a_grant_reaches_beyond_a_restrictive_default(settings, db_session, operator, make_org):
    app = create_app(settings.model_copy(update={"default_base_models": [TINY]}))
    app.dependency_overrides[get_session] = lambda: (yield db_session)
    _, op_key = operator
    org_a, _ = make_org("org-a")
    org_b, _ = make_org("org-b")
    with TestClient(app) as http:
        assert _table(http.get(f"/v1/organizations/{org_a.id}/entitlements", headers=_auth(op_key))) == {TINY: (True, "default"), LLAMA: (False, "default")}
        http.put(f"/v1/organizations/{org_a.id}/entitlements/{LLAMA}", headers=_auth(op_key))
        assert _table(http.get(f"/v1/organizations/{org_a.id}/entitlements", headers=_auth(op_key)))[LLAMA] == (True, "granted")
        assert _table(http.get(f"/v1/organizations/{org_b.id}/entitlements", headers=_auth(op_key)))[LLAMA] == (False, "default")


def test_only_the_operators_admins_change_entitlements(http, operator, make_org, db_session):
    op_org, _ = operator
    _, op_member = create_api_key(db_session, op_org, "member", Role.member)
    org_a, key_a = make_org("org-a")
    _, viewer_a = create_api_key(db_session, org_a, "viewer", Role.viewer)
    _, key_b = make_org("org-b")
    db_session.flush()
    url = f"/v1/organizations/{org_a.id}/entitlements"

    own_admin = http.put(f"{url}/{TINY}", headers=_auth(key_a))  # a tenant cannot entitle itself
    assert own_admin.status_code == 403 and own_admin.json()["error"]["code"] == "insufficient_permissions"
    assert own_admin.json()["error"]["type"] == "permission_error"
    assert http.delete(f"{url}/{TINY}", headers=_auth(viewer_a)).status_code == 403
    assert http.get(url, headers=_auth(viewer_a)).status_code == 403
    # The operator's organization without the admin role: a tenant like any other.
    assert http.put(f"/v1/organizations/{op_org.id}/entitlements/{TINY}", headers=_auth(op_member)).status_code == 403
    assert http.delete(f"{url}/{TINY}", headers=_auth(op_member)).status_code == 404
    for method in ("GET", "PUT", "DELETE"):  # another tenant: as if the organization did not exist
        path = url if method == "GET" else f"{url}/{TINY}"
        answer = http.request(method, path, headers=_auth(key_b))
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "organization_not_found"
    missing = http.get("/v1/organizations/org-nope/entitlements", headers=_auth(key_b))
    assert missing.json()["error"] == http.get(url, headers=_auth(key_b)).json()["error"] | {"message": missing.json()["error"]["message"]}
    assert entitlements.entitlements(db_session, org_a.id, [TINY], None)[0].source == "default"  # nothing was stored
    assert http.get(url).status_code == 401


def test_a_base_model_outside_the_catalog_is_a_404_naming_the_model_and_stores_nothing(http, operator, make_org, db_session):
    _, op_key = operator
    org_a, _ = make_org("org-a")
    answer = http.put(f"/v1/organizations/{org_a.id}/entitlements/acme/unknown-7b", headers=_auth(op_key))
    assert answer.status_code == 404
    assert answer.json()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    assert "acme/unknown-7b" in answer.json()["error"]["message"]
    assert entitlements.entitlements(db_session, org_a.id, ["acme/unknown-7b"], None)[0].source == "default"
    missing_org = http.put(f"/v1/organizations/org-nope/entitlements/{TINY}", headers=_auth(op_key))
    assert missing_org.status_code == 404 and missing_org.json()["error"]["param"] == "organization"


def test_a_base_the_org_is_not_entitled_to_is_not_offered_for_fine_tuning(http, operator, make_org):
    _, op_key = operator
    _, key_a = make_org("org-a")
    _, key_b = make_org("org-b")
    http.delete(f"/v1/organizations/org-a/entitlements/{TINY}", headers=_auth(op_key))
    body = {"model": TINY, "training_file": "file-missing"}

    for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/estimate"):
        refused = http.post(path, json=body, headers=_auth(key_a))
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("model", "model_not_available")
        assert error["message"] == f"Model {TINY!r} is not available for fine-tuning. Available: {LLAMA}."
        # the other org gets past the model to its (missing) file
        other = http.post(path, json=body, headers=_auth(key_b)).json()["error"]
        assert other["param"] == "training_file", other


@pytest.mark.parametrize("method,path", [("GET", "/v1/organizations/%00/entitlements"),
                                         ("PUT", "/v1/organizations/%00/entitlements/tuneforge-tiny"),
                                         ("DELETE", "/v1/organizations/%00/entitlements/tuneforge-tiny"),
                                         ("PUT", "/v1/organizations/ORG/entitlements/tuneforge-tiny%00")])
def test_a_name_with_a_nul_character_is_a_404_not_a_failed_lookup(http, operator, make_org, method, path):
    # the organization's lookup by a NUL-holding name was a 500 (PostgreSQL refuses NUL characters); a model
    # that is no base model is refused before any lookup
    org, _ = make_org("org-a")
    answer = http.request(method, path.replace("ORG", org.id), headers=_auth(operator[1]))
    assert answer.status_code in (400, 404) and answer.json()["error"]["type"] == "invalid_request_error", answer.text
    if "%00/" in path:
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "organization_not_found"
