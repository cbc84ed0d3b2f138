"""The job spec holds only finite numbers: NaN and Infinity are not JSON, so a spec holding one could
not be stored and read back as the same spec (it came back with null, "unreadable job spec"). What a
run measures may still be NaN or Infinity (a diverged loss), and says so."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from gpu_worker.contract import (
    AdapterConfig,
    DataOptions,
    EvalReport,
    Hyperparameters,
    JobSpec,
    MethodParams,
    MetricsEvent,
    Reward,
    RewardKind,
    TrainingFile,
    dump_event,
    parse_event,
)

NOT_FINITE = [math.nan, math.inf, -math.inf]
HP = {"n_epochs": 1, "batch_size": 1, "learning_rate": 1e-4}


def _spec(**kw) -> JobSpec:
    return JobSpec(job_id="ftjob-1", org_id="org-1", base_model="tuneforge-tiny", hyperparameters=Hyperparameters(**HP), seed=0, training_file_key="k", output_prefix="p", **kw)


# One float field of each spec model, and the field pydantic names when it refuses it.
FLOAT_FIELDS = {
    "reward-weight": (lambda x: Reward(kind=RewardKind.exact_match, weight=x), "weight"),
    "reward-scale": (lambda x: Reward(kind=RewardKind.length_penalty, target_length=5, scale=x), "scale"),
    "learning-rate": (lambda x: Hyperparameters(**{**HP, "learning_rate": x}), "learning_rate"),
    "max-grad-norm": (lambda x: Hyperparameters(**HP, max_grad_norm=x), "max_grad_norm"),
    "lora-alpha": (lambda x: AdapterConfig(alpha=x), "alpha"),
    "beta": (lambda x: MethodParams(beta=x), "beta"),
    "file-weight": (lambda x: TrainingFile(key="k", weight=x), "weight"),
    "validation-split": (lambda x: DataOptions(validation_split=x), "validation_split"),
}


@pytest.mark.parametrize("value", NOT_FINITE, ids=repr)
@pytest.mark.parametrize(("make", "field"), FLOAT_FIELDS.values(), ids=FLOAT_FIELDS.keys())
def test_spec_floats_refuse_nan_and_infinity(make, field, value):
    with pytest.raises(ValidationError) as err:
        make(value)
    assert err.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize(("make", "field"), [
    (lambda: Reward(kind=RewardKind.regex_match, pattern=".", weight=1e308), "weight"),
    (lambda: Reward(kind=RewardKind.regex_match, pattern=".", weight=-1e5), "weight"),
    (lambda: Reward(kind=RewardKind.length_penalty, target_length=5, scale=1e300), "scale"),
    (lambda: Reward(kind=RewardKind.length_penalty, target_length=10**7), "target_length"),
    (lambda: MethodParams(rewards=(Reward(kind=RewardKind.exact_match),) * 33), "rewards"),
], ids=["weight-1e308", "weight--1e5", "scale-1e300", "target-1e7", "33-rewards"])
def test_rewards_stay_within_what_float32_sums(make, field):
    """Each finite, but a 1e308 weight's rewards summed to infinity in GRPO's float32, the loss went NaN and the
    next sampling step crashed: refused with the spec instead. The bounds' worst reward squares below 3.4e38."""
    with pytest.raises(ValidationError) as err:
        make()
    assert err.value.errors()[0]["loc"][0] == field
    from gpu_worker.contract import REWARD_SCALE_MAX, REWARD_TARGET_LENGTH_MAX, REWARD_WEIGHT_MAX

    worst = 32 * REWARD_WEIGHT_MAX * REWARD_SCALE_MAX * REWARD_TARGET_LENGTH_MAX
    assert worst**2 < 3.4e38


@pytest.mark.parametrize("schema", [{"const": math.nan}, {"enum": [1, [math.inf]]}, {"properties": {"x": {"maximum": -math.inf}}}], ids=repr)
def test_a_reward_schema_holds_only_json(schema):
    with pytest.raises(ValidationError) as err:
        Reward(kind=RewardKind.json_schema, json_schema=schema)
    assert err.value.errors()[0]["loc"] == ("json_schema",) and "NaN and Infinity" in err.value.errors()[0]["msg"]


def test_a_spec_round_trips_through_json_unchanged():
    rewards = (Reward(kind=RewardKind.exact_match, weight=0.5), Reward(kind=RewardKind.json_schema, json_schema={"const": 1.5, "maximum": 1e308}))
    spec = _spec(method="grpo", method_params=MethodParams(rewards=rewards))
    assert spec.schema_version == 1
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert _spec() == JobSpec.model_validate_json(_spec().model_dump_json())  # every default is finite


@pytest.mark.parametrize("value", NOT_FINITE, ids=repr)
def test_what_a_run_measures_may_be_nan_or_infinity(value):
    event = MetricsEvent(step=1, total_steps=2, epoch=0.5, train_loss=value, learning_rate=1e-4, tokens=8, grad_norm=value)
    assert math.isnan(event.train_loss) if math.isnan(value) else event.train_loss == value
    assert dump_event(event)  # emitting never raises: a diverged run reports, it does not crash
    arrived = parse_event(dump_event(event))  # JSON has no NaN: the step arrives, its loss as None
    assert (arrived.step, arrived.train_loss, arrived.grad_norm) == (1, None, None)
    report = EvalReport(base_valid_loss=1.0, tuned_valid_loss=value, passed=False)
    assert report.tuned_valid_loss is value or math.isnan(report.tuned_valid_loss)
