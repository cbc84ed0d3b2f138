"""The closed GRPO reward set: each reward's score, weights, and every bad parameter refused with the
field it names (before any model is loaded)."""

from __future__ import annotations

import pytest

from gpu_worker.contract import MethodParams, Reward
from gpu_worker.recipes.rewards import FAILURE_CODE, MethodParamsError, build_rewards


def _set(*rewards: Reward):
    return build_rewards(MethodParams(rewards=rewards))


def test_exact_match_compares_stripped_text_with_the_rows_reference_field():
    rs = _set(Reward(kind="exact_match", reference_field="label"))
    assert rs.reference_fields == ("label",)
    assert rs.score("  Paris\n", 3, {"label": "Paris "}) == 1.0
    assert rs.score("paris", 1, {"label": "Paris"}) == 0.0
    assert rs.score("42", 1, {"label": 42}) == 1.0  # a non-string reference compares as its JSON


def test_regex_match_searches_the_completion():
    rs = _set(Reward(kind="regex_match", pattern=r"^\d+$"))
    assert [rs.score(s, 1, {}) for s in ("123", "12a", "")] == [1.0, 0.0, 0.0]
    assert _set(Reward(kind="regex_match", pattern="yes")).score("I say yes.", 3, {}) == 1.0


def test_json_schema_needs_valid_json_matching_the_schema():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    rs = _set(Reward(kind="json_schema", json_schema=schema))
    assert rs.score(' {"n": 3} ', 5, {}) == 1.0
    assert rs.score('{"n": "3"}', 5, {}) == 0.0
    assert rs.score("{n: 3", 5, {}) == 0.0
    assert rs.score("[" * 100000, 5, {}) == 0.0  # too deep to parse is simply not valid
    assert rs.score('{"n": ' + "1" * 5000 + "}", 5, {}) == 0.0  # past Python's 4300-digit limit: not valid


def test_json_schema_references_inside_the_schema_resolve():
    schema = {"$defs": {"n": {"type": "integer"}}, "type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}}
    rs = _set(Reward(kind="json_schema", json_schema=schema))
    assert rs.score('{"n": 3}', 5, {}) == 1.0 and rs.score('{"n": "x"}', 5, {}) == 0.0


def test_length_penalty_is_linear_in_the_token_distance_to_the_target():
    rs = _set(Reward(kind="length_penalty", target_length=10, scale=0.5))
    assert [rs.score("x", n, {}) for n in (10, 7, 14)] == [0.0, -1.5, -2.0]


def test_rewards_are_summed_with_their_weights_and_broken_down_unweighted():
    rs = _set(Reward(kind="regex_match", pattern="a", weight=2.0), Reward(kind="length_penalty", target_length=2, scale=1.0, weight=0.5))
    assert rs.score("a", 4, {}) == pytest.approx(2.0 - 1.0)
    assert rs.breakdown("a", 4, {}) == {"0:regex_match": 1.0, "1:length_penalty": -2.0}


@pytest.mark.parametrize(
    "rewards, param, words",
    [
        ((), "method_params.rewards", "at least one reward"),
        ((Reward(kind="regex_match", pattern="(unclosed"),), "method_params.rewards[0].pattern", "invalid regular expression"),
        ((Reward(kind="exact_match"), Reward(kind="regex_match")), "method_params.rewards[1].pattern", "needs a pattern"),
        ((Reward(kind="json_schema", json_schema={"type": "no-such-type"}),), "method_params.rewards[0].json_schema", "not a valid JSON Schema"),
        ((Reward(kind="json_schema", json_schema={"properties": {"a": {"minimum": "zero"}}}),), "method_params.rewards[0].json_schema", "properties/a/minimum"),
        ((Reward(kind="json_schema"),), "method_params.rewards[0].json_schema", "needs a json_schema"),
        # resolved only when a completion reaches it: refused before training, not a crash mid-run
        ((Reward(kind="json_schema", json_schema={"$ref": "#/$defs/nope"}),), "method_params.rewards[0].json_schema",
         "does not resolve"),
        ((Reward(kind="json_schema", json_schema={"$ref": "https://example.com/s.json"}),),
         "method_params.rewards[0].json_schema", "does not resolve"),
        ((Reward(kind="json_schema", json_schema={"$schema": 5}),), "method_params.rewards[0].json_schema",
         "must be a string"),
        ((Reward(kind="length_penalty"),), "method_params.rewards[0].target_length", "needs target_length"),
        ((Reward(kind="exact_match", reference_field=" "),), "method_params.rewards[0].reference_field", "non-empty"),
        ((Reward(kind="exact_match", weight=0),), "method_params.rewards", "weight 0"),
    ],
)
def test_bad_reward_parameters_name_the_field(rewards, param, words):
    with pytest.raises(MethodParamsError) as err:
        build_rewards(MethodParams(rewards=rewards))
    assert err.value.param == param and err.value.code == FAILURE_CODE == "invalid_method_params"
    assert words in str(err.value) and str(err.value).startswith(param)


def test_the_reward_module_does_not_need_torch():
    import subprocess
    import sys

    code = "import sys, gpu_worker.recipes.rewards; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.timeout(60)  # with the stdlib's re this search would not end in the test's lifetime
def test_a_catastrophically_backtracking_pattern_times_out_scores_zero_and_warns_once():
    import time

    from gpu_worker.recipes.rewards import REGEX_TIMEOUT_S

    warnings = []
    rs = build_rewards(MethodParams(rewards=(Reward(kind="regex_match", pattern="^(a|a)*$"), Reward(kind="length_penalty", target_length=3, scale=1.0))),
                       warn=warnings.append)
    hostile = "a" * 40 + "b"  # 2^40 ways to fail: days of backtracking without a time limit
    started = time.perf_counter()
    scores = [rs.scored(hostile, 5, {}) for _ in range(3)]
    elapsed = time.perf_counter() - started
    assert scores == [(-2.0, {"0:regex_match": 0.0, "1:length_penalty": -2.0})] * 3
    assert elapsed < 3 * REGEX_TIMEOUT_S + 5, elapsed  # each search stopped at its limit (slack for a loaded machine)
    assert len(warnings) == 1 and warnings[0].startswith("method_params.rewards[0].pattern: a search took longer than")
    assert rs.score("aaaa", 3, {}) == 1.0  # the same reward still matches what it can decide in time


def test_grpo_reports_a_timed_out_search_as_one_warning_event(make_spec):
    from gpu_worker.contract import LogEvent
    from gpu_worker.recipes import RunContext
    from gpu_worker.recipes.grpo import GRPOObjective

    events = []
    spec = make_spec("m", method="grpo", method_params=MethodParams(rewards=(Reward(kind="regex_match", pattern="^(a|a)*$"),)))
    objective = GRPOObjective(spec, RunContext(store=None, data_dir=".", emit=events.append, device="cpu"))
    assert [objective.rewards.score("a" * 40 + "b", 1, {}) for _ in range(2)] == [0.0, 0.0]
    assert [(e.level, type(e)) for e in events] == [("warn", LogEvent)]
