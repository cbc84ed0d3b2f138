"""GRPO rewards: the closed set a job spec can name (``contract.RewardKind``), never user code.

``build_rewards(method_params)`` checks every reward's parameters (a regex must compile, a JSON schema
must be a valid schema, a length penalty needs its target) and returns a ``RewardSet`` that scores a
completion against its data row. A bad parameter is a ``MethodParamsError`` naming the field
(``method_params.rewards[1].pattern``), raised at job start before any weight is loaded; the trainer
reports it as FailedEvent ``invalid_method_params``. Standard library, ``jsonschema`` and (imported
when a regex_match reward is built) ``regex`` only, no torch: the API can run the same checks when a
job is created.

Scores, before each reward's ``weight`` (the set's score is the weighted sum):

- exact_match: 1.0 if the completion, stripped, equals the row's ``reference_field`` (stripped), else 0
- regex_match: 1.0 if ``search(pattern, completion)`` finds a match (anchor it to match it all), with
  the ``regex`` package and a time limit per match (``REGEX_TIMEOUT_S``): a pattern that backtracks
  catastrophically (``^(a|a)*$`` doubles its work with every character) would otherwise hold the
  worker inside C code, where SIGTERM is never looked at. A match that runs out of time scores 0, and
  the first such match of each reward is a warning (``build_rewards(..., warn=)``)
- json_schema: 1.0 if the completion (stripped) parses as JSON valid against the schema, else 0
- length_penalty: ``-scale * |completion tokens - target_length|``
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

from gpu_worker.contract import MethodParams, Reward, RewardKind

FAILURE_CODE = "invalid_method_params"

# Each regex_match search may run this long. Measured: sane patterns (\d+, \b(yes|no)\b, anchored
# JSON or answer patterns) search a 45,000-character completion (8,192 tokens, the largest
# grpo_max_completion_length) in under 1 ms; 100 ms is 100x that, and bounds a hostile pattern's cost
# to 0.1 s per completion (6.4 s for a step of 16 prompts x 4 generations) instead of forever.
REGEX_TIMEOUT_S = 0.1


class MethodParamsError(ValueError):
    """``spec.method_params`` cannot be used; ``param`` names the field (dotted, from the spec)."""

    code = failure_code = FAILURE_CODE  # failure_code: the convention of model_setup.UnsupportedOnDevice

    def __init__(self, message: str, *, param: str):
        super().__init__(f"{param}: {message}")
        self.param = param

    def to_event(self):
        """The FailedEvent the trainer reports for this error."""
        from gpu_worker.contract import FailedEvent

        return FailedEvent(code=self.code, message=str(self), param=self.param)


@dataclasses.dataclass(frozen=True)
class _Scorer:
    reward: Reward
    score: Callable[[str, int, Mapping[str, Any]], float]  # (completion text, token count, row) -> score


@dataclasses.dataclass(frozen=True)
class RewardSet:
    """The job's rewards, checked; ``score`` is their weighted sum for one completion."""

    scorers: tuple[_Scorer, ...]

    @property
    def reference_fields(self) -> tuple[str, ...]:
        """Row fields the rewards read: every prompt row must have them."""
        return tuple(dict.fromkeys(s.reward.reference_field for s in self.scorers if s.reward.kind == RewardKind.exact_match))

    def score(self, completion: str, n_tokens: int, row: Mapping[str, Any]) -> float:
        return self.scored(completion, n_tokens, row)[0]

    def breakdown(self, completion: str, n_tokens: int, row: Mapping[str, Any]) -> dict[str, float]:
        """Unweighted score per reward, keyed ``"<index>:<kind>"`` (for metrics)."""
        return self.scored(completion, n_tokens, row)[1]

    def scored(self, completion: str, n_tokens: int, row: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
        """``score`` and ``breakdown`` at once: each reward runs once (a regex search may take its
        whole time limit)."""
        parts = {f"{i}:{s.reward.kind.value}": s.score(completion, n_tokens, row) for i, s in enumerate(self.scorers)}
        return sum(s.reward.weight * v for s, v in zip(self.scorers, parts.values())), parts


def build_rewards(params: MethodParams, *, warn: Callable[[str], None] | None = None) -> RewardSet:
    """Check ``params.rewards`` and build their scorers; raises ``MethodParamsError``. ``warn(message)``
    hears of a scorer's trouble that is not the completion's fault (a regex search that timed out), once
    per reward."""
    if not params.rewards:
        raise MethodParamsError("GRPO needs at least one reward (exact_match, regex_match, json_schema or length_penalty)", param="method_params.rewards")
    scorers = tuple(_build_one(r, f"method_params.rewards[{i}]", warn) for i, r in enumerate(params.rewards))
    if all(r.weight == 0 for r in params.rewards):
        raise MethodParamsError("every reward has weight 0: nothing to learn from", param="method_params.rewards")
    return RewardSet(scorers)


def _build_one(reward: Reward, where: str, warn: Callable[[str], None] | None) -> _Scorer:
    if reward.kind == RewardKind.regex_match:
        return _Scorer(reward, _regex_match(reward, where, warn))
    builder = {
        RewardKind.exact_match: _exact_match,
        RewardKind.json_schema: _json_schema,
        RewardKind.length_penalty: _length_penalty,
    }[reward.kind]
    return _Scorer(reward, builder(reward, where))


def _exact_match(reward: Reward, where: str):
    field = reward.reference_field
    if not field or not field.strip():
        raise MethodParamsError("exact_match needs a non-empty reference_field", param=f"{where}.reference_field")

    def score(completion: str, n_tokens: int, row: Mapping[str, Any]) -> float:
        expected = row[field]
        expected = expected if isinstance(expected, str) else json.dumps(expected)
        return float(completion.strip() == expected.strip())

    return score


def _regex_match(reward: Reward, where: str, warn: Callable[[str], None] | None):
    import regex  # re's syntax (VERSION0), plus a timeout the C matcher honours

    if reward.pattern is None:
        raise MethodParamsError("regex_match needs a pattern", param=f"{where}.pattern")
    try:
        compiled = regex.compile(reward.pattern)
    except (regex.error, OverflowError, RecursionError) as err:
        raise MethodParamsError(f"invalid regular expression {reward.pattern!r}: {err}", param=f"{where}.pattern") from None
    warned = False

    def score(completion: str, n_tokens: int, row: Mapping[str, Any]) -> float:
        nonlocal warned
        try:
            return float(compiled.search(completion, timeout=REGEX_TIMEOUT_S) is not None)
        except TimeoutError:
            if not warned and warn is not None:
                warn(f"{where}.pattern: a search took longer than {REGEX_TIMEOUT_S:g} s (a pattern that backtracks "
                     f"catastrophically?) and scored 0; every search that times out scores 0, without a further warning")
            warned = True
            return 0.0

    return score


def json_schema_problem(schema: dict) -> str | None:
    """Why no validator can be built from a tenant's JSON Schema, or None. The API checks a job's rewards
    with this before storing it (api/services/hyperparameters.py), and the worker again before training."""
    import jsonschema

    if not isinstance(schema.get("$schema", ""), str):
        return "'json_schema': '$schema' must be a string (the URI of a JSON Schema draft)"
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        validator = cls(schema)
        unresolved = next((ref for ref in _refs(schema) if not _resolves(validator, ref)), None)
    except jsonschema.SchemaError as err:
        at = "/".join(str(p) for p in err.absolute_path)
        return f"'json_schema' is not a valid JSON Schema{f' at {at}' if at else ''}: {err.message}"
    except RecursionError:  # the checker walks subschemas recursively: {"items": {"items": ...}}
        return "'json_schema' is nested too deeply to check"
    except (TypeError, AttributeError, ValueError, LookupError) as err:
        # jsonschema reads keywords on trust: a malformed one fails with whatever its lookup raises. The
        # input is the tenant's alone, so this is their schema's fault, not ours.
        return f"'json_schema' is not a valid JSON Schema ({type(err).__name__}: {err})"
    if unresolved is not None:
        # resolved lazily, only when a completion reaches it: found here, not as a crash mid-run. The worker
        # fetches nothing, so a reference must point inside the schema
        return f"'json_schema': its $ref {unresolved!r} does not resolve within the schema"
    return None


def _refs(node: Any):
    """Every ``$ref`` string in a schema, depth first."""
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _resolves(validator, ref: str) -> bool:
    from referencing.exceptions import Unresolvable

    try:
        validator._resolver.lookup(ref)  # jsonschema's own resolver: the one validation uses
    except Unresolvable:
        return False
    return True


def _json_schema(reward: Reward, where: str):
    import jsonschema

    if reward.json_schema is None:
        raise MethodParamsError("json_schema needs a json_schema", param=f"{where}.json_schema")
    problem = json_schema_problem(reward.json_schema)
    if problem is not None:
        raise MethodParamsError(problem, param=f"{where}.json_schema")
    validator = jsonschema.validators.validator_for(reward.json_schema)(reward.json_schema)

    def score(completion: str, n_tokens: int, row: Mapping[str, Any]) -> float:
        try:
            value = json.loads(completion.strip())
        except (ValueError, RecursionError):  # not JSON, too deep, or a number past Python's 4300 digits
            return 0.0
        try:
            return float(validator.is_valid(value))
        except RecursionError:  # a completion nested deeper than validation can walk is not the object asked for
            return 0.0

    return score


def _length_penalty(reward: Reward, where: str):
    if reward.target_length is None:
        raise MethodParamsError("length_penalty needs target_length (in tokens)", param=f"{where}.target_length")
    target, scale = reward.target_length, reward.scale
    return lambda completion, n_tokens, row: -scale * abs(n_tokens - target)
