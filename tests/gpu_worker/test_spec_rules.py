"""Options that would be silently meaningless are refused, naming the field: train_on_inputs outside
supervised jobs, fail_on_regression and early stopping without validation data; and a gate with no
validation example reports "not evaluated", never "passed"."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpu_worker.contract import DataOptions, EvalOptions, EvalReport, JobSpec, LogEvent, Method, MethodParams, Reward
from gpu_worker.spec_rules import SpecError, check_spec, spec_problem


def _spec(make_spec, method="supervised", **kw):
    if method == "grpo":
        kw.setdefault("method_params", MethodParams(rewards=(Reward(kind="exact_match"),)))
    return make_spec("/nonexistent/model", method=method, **kw)


@pytest.mark.parametrize("method", [m.value for m in Method if m != Method.supervised])
def test_train_on_inputs_is_refused_outside_supervised_jobs(make_spec, method):
    param, message = spec_problem(_spec(make_spec, method, data=DataOptions(train_on_inputs=True)))
    assert param == "data.train_on_inputs" and f"the {method} loss scores the answer given the prompt" in message
    assert spec_problem(_spec(make_spec, "supervised", data=DataOptions(train_on_inputs=True))) is None
    assert spec_problem(_spec(make_spec, method)) is None


@pytest.mark.parametrize("evaluation, param", [
    (EvalOptions(fail_on_regression=True), "evaluation.fail_on_regression"),
    (EvalOptions(early_stopping_patience=2), "evaluation.early_stopping_patience"),
])
def test_options_that_act_on_validation_results_need_validation_data(make_spec, evaluation, param):
    no_split = _spec(make_spec, evaluation=evaluation, data=DataOptions(validation_split=0))
    got, message = spec_problem(no_split)
    assert got == param and "no validation_file, and data.validation_split is 0" in message and "Give a validation_file" in message
    assert spec_problem(no_split.model_copy(update={"validation_file_key": "files/v.jsonl"})) is None
    assert spec_problem(_spec(make_spec, evaluation=evaluation, data=DataOptions(validation_split=0.1))) is None
    auto = _spec(make_spec, evaluation=evaluation)  # the automatic split: needs 100 training examples
    assert spec_problem(auto) is None and spec_problem(auto, training_examples=100) is None
    got, message = spec_problem(auto, training_examples=99)
    assert got == param and "(the training data has 99)" in message
    assert spec_problem(_spec(make_spec, data=DataOptions(validation_split=0))) is None  # nothing asked of validation
    with pytest.raises(SpecError) as err:
        check_spec(no_split)
    assert err.value.param == param and err.value.failure_code == "invalid_job_spec"


def test_the_trainer_reports_a_refused_option_as_a_failed_event_naming_it(make_spec, store, tmp_path):
    from gpu_worker.recipes import RunContext, recipe_for
    from gpu_worker.train import _failure

    spec = _spec(make_spec, "dpo", data=DataOptions(train_on_inputs=True))
    with pytest.raises(SpecError) as err:  # before anything loads: the base model does not even exist
        recipe_for(spec.method)(spec, RunContext(store=store, data_dir=tmp_path, emit=lambda e: None, device="cpu"))
    event = _failure(err.value)
    assert (event.code, event.param) == ("invalid_job_spec", "data.train_on_inputs")


def test_the_rules_do_not_need_torch():
    code = "import sys, gpu_worker.spec_rules; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_specs_stored_before_keep_their_split_and_reports_their_verdict(make_spec):
    stored = json.loads(make_spec("m").model_dump_json())
    assert stored["data"]["validation_split"] is None  # new specs: automatic
    stored["data"]["validation_split"] = 0.0  # what every spec stored before said
    assert JobSpec.model_validate(stored).data.validation_split == 0.0
    assert EvalReport.model_validate_json(EvalReport(examples=0, passed=None, reason="not evaluated").model_dump_json()).passed is None
    assert EvalReport.model_validate_json('{"examples": 3, "passed": true}').passed is True


# --- the recipes ---------------------------------------------------------------------------------------


def _events(kind, events):
    return [e for e in events if isinstance(e, kind)]


def test_an_sft_job_without_validation_data_is_not_evaluated(micro_model_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    from gpu_worker.recipes import RunContext
    from gpu_worker.recipes.sft import run

    write_jsonl(store, "files/train.jsonl", sentiment_rows(8))
    events = []
    result = run(make_spec(str(micro_model_dir)), RunContext(store=store, data_dir=tmp_path, emit=events.append, device="cpu"))
    report = result.eval_report
    assert report.passed is None and report.examples == 0 and report.reason.startswith("not evaluated")
    assert any(e.level == "warn" and e.message.startswith("Eval gate not evaluated") for e in _events(LogEvent, events))


def _pairs(sentiment_rows, n: int) -> list[dict]:
    return [{"prompt": r["messages"][:-1], "chosen": f"It is {r['messages'][-1]['content']}.", "rejected": "No."} for r in sentiment_rows(n)]


def test_a_dpo_job_without_validation_data_is_not_evaluated(micro_model_dir, store, write_jsonl, sentiment_rows, make_spec, tmp_path):
    from gpu_worker.recipes import RunContext, recipe_for

    write_jsonl(store, "files/train.jsonl", _pairs(sentiment_rows, 4))
    events = []
    result = recipe_for(Method.dpo)(make_spec(str(micro_model_dir), method="dpo"), RunContext(store=store, data_dir=tmp_path, emit=events.append, device="cpu"))
    assert result.eval_report.passed is None and result.eval_report.examples == 0
    assert any(e.level == "warn" and e.message.startswith("Eval gate not evaluated") for e in _events(LogEvent, events))


@pytest.mark.parametrize("method", ["supervised", "dpo"])
def test_fail_on_regression_with_too_few_examples_for_the_automatic_split_fails_before_training(micro_model_dir, store, write_jsonl, sentiment_rows,
                                                                                              make_spec, tmp_path, method):
    from gpu_worker.contract import MetricsEvent
    from gpu_worker.recipes import RunContext, recipe_for

    write_jsonl(store, "files/train.jsonl", sentiment_rows(8) if method == "supervised" else _pairs(sentiment_rows, 8))
    spec = make_spec(str(micro_model_dir), method=method, evaluation=EvalOptions(fail_on_regression=True))
    events = []
    with pytest.raises(SpecError) as err:
        recipe_for(spec.method)(spec, RunContext(store=store, data_dir=tmp_path, emit=events.append, device="cpu"))
    assert err.value.param == "evaluation.fail_on_regression"
    assert "holds out examples only from 100 training examples up (8 after duplicates were removed)" in str(err.value)
    assert not _events(MetricsEvent, events)  # refused before a step was trained
