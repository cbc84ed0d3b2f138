"""GRPO rewards are checked at job creation: whatever a tenant puts in a reward (a malformed JSON
Schema, NaN, Infinity) is a 400 naming the field, and no job is stored; a bad reward never reaches a
GPU and never answers a 500."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from api.services.hyperparameters import reward_problem
from gpu_worker.contract import Reward, RewardKind
from scheduler.models import Job


def _deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"items": schema}
    return schema


# Each once made jsonschema raise something other than SchemaError (a 500).
MALFORMED_SCHEMAS = {
    "schema-uri-a-list": {"$schema": []},  # TypeError: unhashable list
    "schema-uri-a-number": {"$schema": 5},  # AttributeError: 'int' has no 'decode'
    "schema-uri-an-object": {"$schema": {}},
    "nested-400-deep": _deep(400),  # RecursionError in check_schema
    # compiled fine, then Unresolvable at the first completion that reached it: a crash mid-run
    "ref-to-nowhere": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    "ref-to-the-network": {"$ref": "https://example.com/schema.json"},  # the worker fetches nothing
}


@pytest.mark.parametrize("schema", MALFORMED_SCHEMAS.values(), ids=MALFORMED_SCHEMAS.keys())
def test_a_malformed_schema_is_a_problem_not_an_exception(schema):
    problem = reward_problem(Reward(kind=RewardKind.json_schema, json_schema=schema))
    assert problem and "json_schema" in problem


def test_a_valid_schema_has_no_problem():
    assert reward_problem(Reward(kind=RewardKind.json_schema, json_schema={"type": "object", "required": ["a"]})) is None


def _create(http, key: str, file_id: str, rewards_json: str):
    # Raw bytes: Python's json (and the API's parser) read the NaN and Infinity tokens, which is how a
    # client sends one; the SDK would not show what goes over the wire.
    body = f'{{"model": "tuneforge-tiny", "training_file": "{file_id}", "method": {{"type": "grpo", "grpo": {{"rewards": {rewards_json}}}}}}}'
    return http.post("/v1/fine_tuning/jobs", content=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


BAD_REWARDS = {
    "weight-nan": ('[{"kind": "exact_match", "weight": NaN}]', "method.grpo.rewards.0.weight"),
    "weight-infinity": ('[{"kind": "exact_match", "weight": Infinity}]', "method.grpo.rewards.0.weight"),
    # finite, but summed past float32 in training (a crash after the first step): refused at creation
    "weight-1e308": ('[{"kind": "regex_match", "pattern": ".", "weight": 1e308}]', "method.grpo.rewards.0.weight"),
    "scale-1e300": ('[{"kind": "length_penalty", "target_length": 5, "scale": 1e300}]', "method.grpo.rewards.0.scale"),
    "scale-minus-infinity": ('[{"kind": "length_penalty", "target_length": 5, "scale": -Infinity}]', "method.grpo.rewards.0.scale"),
    "schema-const-nan": ('[{"kind": "json_schema", "json_schema": {"const": NaN}}]', "method.grpo.rewards.0.json_schema"),
    "schema-deep-infinity": ('[{"kind": "json_schema", "json_schema": {"enum": [1, [Infinity]]}}]', "method.grpo.rewards.0.json_schema"),
    **{name: (json.dumps([{"kind": "json_schema", "json_schema": s}]), "method.grpo.rewards[0]") for name, s in MALFORMED_SCHEMAS.items()},
}


@pytest.mark.parametrize(("rewards", "param"), BAD_REWARDS.values(), ids=BAD_REWARDS.keys())
def test_a_bad_reward_is_400_naming_the_field_and_stores_nothing(http, upload, org_a, db_session, rewards, param):
    response = _create(http, org_a[1], upload(), rewards)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error") and error["message"]
    assert db_session.scalars(select(Job).where(Job.org_id == org_a[0].id)).first() is None


def test_the_same_request_with_finite_rewards_creates_the_job(http, upload, org_a, db_session):
    rewards = '[{"kind": "exact_match", "weight": 0.5}, {"kind": "json_schema", "json_schema": {"const": 1.5}}]'
    response = _create(http, org_a[1], upload(), rewards)
    assert response.status_code == 200, response.text
    stored = response.json()["method"]["grpo"]["rewards"]
    assert (stored[0]["weight"], stored[1]["json_schema"]) == (0.5, {"const": 1.5})


# A multiplier the schema accepts (positive, at most 10) but so small that base rate x multiplier
# rounds to 0.0, which the worker contract refuses: once a pydantic ValidationError, a 500.
TINY_MULTIPLIERS = {
    "method-1e-320": ('"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 1e-320}}}', "method.supervised.hyperparameters.learning_rate_multiplier"),
    "legacy-5e-324": ('"hyperparameters": {"learning_rate_multiplier": 5e-324}', "hyperparameters.learning_rate_multiplier"),
    "full-1e-320": ('"method": {"type": "supervised", "supervised": {"hyperparameters": {"adapter_type": "full", "learning_rate_multiplier": 1e-320}}}', "method.supervised.hyperparameters.learning_rate_multiplier"),
}


@pytest.mark.parametrize(("fragment", "param"), TINY_MULTIPLIERS.values(), ids=TINY_MULTIPLIERS.keys())
def test_a_multiplier_that_rounds_the_learning_rate_to_zero_is_400_and_stores_nothing(http, upload, org_a, db_session, fragment, param):
    body = f'{{"model": "tuneforge-tiny", "training_file": "{upload()}", {fragment}}}'
    response = http.post("/v1/fine_tuning/jobs", content=body, headers={"Authorization": f"Bearer {org_a[1]}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"], error["code"]) == (param, "invalid_request_error", "invalid_value") and error["message"]
    assert db_session.scalars(select(Job).where(Job.org_id == org_a[0].id)).first() is None


def test_the_smallest_multiplier_that_still_gives_a_positive_rate_creates_the_job(http, upload, org_a):
    body = f'{{"model": "tuneforge-tiny", "training_file": "{upload()}", "hyperparameters": {{"learning_rate_multiplier": 1e-300}}}}'
    response = http.post("/v1/fine_tuning/jobs", content=body, headers={"Authorization": f"Bearer {org_a[1]}", "Content-Type": "application/json"})
    assert response.status_code == 200, response.text


def test_full_fine_tuning_of_a_preference_or_grpo_method_is_refused_at_creation(http, upload, org_a, db_session):
    """The worker refuses it (its reference model is the adapter switched off): a 400 before anything queues."""
    body = ('{"model": "tuneforge-tiny", "training_file": "%s", "method": {"type": "grpo", "grpo": {"hyperparameters": '
            '{"adapter_type": "full"}, "rewards": [{"kind": "exact_match"}]}}}' % upload())
    response = http.post("/v1/fine_tuning/jobs", content=body,
                         headers={"Authorization": f"Bearer {org_a[1]}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "adapter_type" and "trains an adapter" in error["message"]
    assert db_session.scalars(select(Job).where(Job.org_id == org_a[0].id)).first() is None

