"""Rules that join several fields of a job spec, which the contract's per-field validation cannot state:
options that would be silently meaningless for the job's method or data.

- ``data.train_on_inputs`` is for supervised jobs only. The preference losses (DPO, IPO, ORPO,
  SimPO), KTO and GRPO score the answer's (or the generated completion's) log-probabilities given
  the prompt; a loss on the prompt's tokens is not part of any of them, so the option is refused
  rather than ignored.
- ``evaluation.fail_on_regression`` and ``evaluation.early_stopping_patience`` act on validation
  results: a job that can have no validation data is refused rather than left to "pass" a gate that
  compared nothing, or to never stop early. Validation data exists with a validation file, or with a
  held-out split: ``data.validation_split`` above 0, or the automatic one (unset), which needs
  ``mixing.AUTO_SPLIT_MIN_EXAMPLES`` training examples.

``spec_problem(spec, training_examples=...)`` is the API's check at job creation (the count of the
training files' examples, when known, decides whether the automatic split can happen);
``check_spec`` raises it as ``SpecError`` at the start of every recipe, and ``check_validation_data``
once the data is loaded, when the split's size is known for sure (after duplicates are removed).
Standard library and the contract only: the API imports this without torch.
"""

from __future__ import annotations

from gpu_worker.contract import JobSpec, Method
from gpu_worker.data.mixing import AUTO_SPLIT_MIN_EXAMPLES


class SpecError(ValueError):
    """The job spec's options contradict each other; ``param`` names the field to change."""

    failure_code = "invalid_job_spec"  # the trainer's FailedEvent code (gpu_worker.train._failure)

    def __init__(self, message: str, *, param: str):
        super().__init__(message)
        self.param = param


def _needs_validation(spec: JobSpec) -> list[tuple[str, str]]:
    """``(param, what it does)`` of each option the job set that acts on validation results."""
    evo, out = spec.evaluation, []
    if evo.fail_on_regression:
        out.append(("evaluation.fail_on_regression", "fail_on_regression compares the tuned model with its base on validation data"))
    if evo.early_stopping_patience is not None:
        out.append(("evaluation.early_stopping_patience", "early_stopping_patience counts validation evaluations without improvement"))
    return out


def _no_validation(spec: JobSpec, why: str) -> tuple[str, str] | None:
    needs = _needs_validation(spec)
    if not needs:
        return None
    param, what = needs[0]
    return param, (f"{what}, and this job has none: {why}. Give a validation_file or a data.validation_split above 0, "
                   f"or unset {param.split('.', 1)[1]}")


def spec_problem(spec: JobSpec, *, training_examples: int | None = None) -> tuple[str, str] | None:
    """``(param, message)`` of the first contradiction in ``spec``, or None. ``training_examples``:
    the training files' example count, if known (None: assume the automatic split can happen)."""
    if spec.data.train_on_inputs and spec.method != Method.supervised:
        return "data.train_on_inputs", (
            f"train_on_inputs applies to supervised jobs only: the {spec.method.value} loss scores the answer given the prompt, "
            "never the prompt's own tokens; leave it unset (false)")
    if spec.validation_file_key:
        return None
    split = spec.data.validation_split
    if split is not None and split <= 0:
        return _no_validation(spec, "no validation_file, and data.validation_split is 0")
    if split is None and training_examples is not None and training_examples < AUTO_SPLIT_MIN_EXAMPLES:
        return _no_validation(spec, f"no validation_file, and the automatic split holds out examples only from "
                                    f"{AUTO_SPLIT_MIN_EXAMPLES} training examples up (the training data has {training_examples})")
    return None


def check_spec(spec: JobSpec) -> None:
    """``spec_problem`` as an exception (``SpecError``), before the job loads anything."""
    problem = spec_problem(spec)
    if problem is not None:
        raise SpecError(problem[1], param=problem[0])


def check_validation_data(spec: JobSpec, validation_examples: int, training_examples: int) -> None:
    """Once the data is loaded: options that act on validation results need some. Raises ``SpecError``."""
    if validation_examples:
        return
    if spec.data.validation_split is None:
        why = (f"no validation_file, and the automatic split holds out examples only from {AUTO_SPLIT_MIN_EXAMPLES} "
               f"training examples up ({training_examples} after duplicates were removed)")
    else:
        why = "no validation_file, and data.validation_split held out nothing"
    problem = _no_validation(spec, why)
    if problem is not None:
        raise SpecError(problem[1], param=problem[0])
