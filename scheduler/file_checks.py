"""What the scheduler checks in a job's files before queueing it (``loop.validate_files``): everything a
worker would refuse them for that can be known without a GPU, so that a file that cannot train never
starts one. In order:

1. the files still exist, in the job's org; the training file has at least ``MIN_EXAMPLES`` examples;
2. a supervised job's declared format (``data.format``, an extra file's ``format``) other than the one
   detected at upload: every line is read in it, as the trainer reads it (the API checked the first);
3. GRPO: every prompt row has each exact_match reward's reference field (``gpu_worker.recipes.rewards``
   names them; a row of ``messages`` ending with the assistant's reply has ``answer``, as the trainer
   reads it in ``gpu_worker.data_preference.parse_prompt``);
4. with the base model's tokenizer on this machine (``tokencount.local_tokenizer_dir``: a built-in
   model's folder, a local folder or the Hugging Face cache): the trainer's tokenization counts the job's
   ``estimated_tokens`` and finds a supervised file left with no usable example (every one truncated
   to nothing, or a duplicate). Without one no count is made, and the job's events say so;
5. the rules joining the spec's fields (``gpu_worker.spec_rules.spec_problem``), with the training
   examples the trainer keeps (the count's, after truncation and duplicates; else the upload's): the
   API checked them with the upload's count, which duplicates can bring under the automatic held-out
   split's minimum. Said as the worker says it: ``invalid_job_spec``, the field as ``param``.

A problem is said as the worker would say it, ``{code, message, param}``: ``invalid_training_file`` (or
``invalid_validation_file``), the file named by its job field (``training_file``,
``extra_training_files[i]``, ``validation_file``), the message naming the line.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpu_worker.contract import DataFormat, JobSpec, Method
from gpu_worker.recipes.rewards import MethodParamsError, build_rewards
from gpu_worker.spec_rules import SpecError, spec_problem
from gpu_worker.storage import ObjectNotFound, ObjectStore, iter_lines
from gpu_worker.tokencount import TokenCountError, count_job_files, job_tokens, local_tokenizer_dir, unusable_file
from gpu_worker.validation import FileValidator
from scheduler import jobs
from scheduler.models import File, Job
from scheduler.settings import Settings

log = logging.getLogger("tuneforge.scheduler")

MIN_EXAMPLES = 10


@dataclasses.dataclass(frozen=True)
class FileProblem:
    code: str
    message: str
    param: str | None


def _file_problem(param: str, message: str) -> FileProblem:
    # the worker's codes (gpu_worker.train._failure): a validation file's, or a training file's for the others
    return FileProblem("invalid_validation_file" if param == "validation_file" else "invalid_training_file", message, param)


@dataclasses.dataclass(frozen=True)
class _JobFile:
    param: str
    key: str
    declared: DataFormat
    row: File | None


def _job_files(session: Session, job: Job, spec: JobSpec) -> list[_JobFile]:
    rows = {row.storage_key: row for row in session.scalars(select(File).where(File.org_id == job.org_id, File.storage_key.in_(
        [spec.training_file_key, spec.validation_file_key, *(f.key for f in spec.data.extra_training_files)])))}
    files = [_JobFile("training_file", spec.training_file_key, spec.data.format, rows.get(spec.training_file_key))]
    files += [_JobFile(f"extra_training_files[{i}]", f.key, f.format, rows.get(f.key)) for i, f in enumerate(spec.data.extra_training_files)]
    if spec.validation_file_key:
        files.append(_JobFile("validation_file", spec.validation_file_key, spec.data.format, rows.get(spec.validation_file_key)))
    return files


def _rows(store: ObjectStore, key: str, fmt: DataFormat) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """``(line, example, None)`` for each example of the file read in ``fmt``, ``(line, None, reason)``
    for the first line that cannot be (then stops)."""
    validator = FileValidator(min_examples=0, format=fmt)
    for raw in iter_lines(store, key):
        example = validator.feed(raw)
        if validator.error_count:
            yield validator.line, None, validator.finish().errors[0].reason
            return
        if example is not None:
            yield validator.line, example, None


def _first_bad_line(store: ObjectStore, key: str, fmt: DataFormat) -> str | None:
    return next((f"line {line}: {reason}" for line, _, reason in _rows(store, key, fmt) if reason), None)


def _row_fields(example: dict[str, Any]) -> set[str]:
    """The fields a prompt row shows the rewards (gpu_worker.data_preference.parse_prompt)."""
    fields = set(example) - {"prompt", "messages"}
    messages = example.get("messages")
    if "prompt" not in example and isinstance(messages, list) and messages and messages[-1].get("role") == "assistant":
        fields.add("answer")
    return fields


def _missing_reference(store: ObjectStore, key: str, required: Iterable[str]) -> str | None:
    """The first prompt row without a field the rewards compare with, as the trainer reports it."""
    required = tuple(required)
    for line, example, reason in _rows(store, key, DataFormat.prompt):  # the GRPO recipe reads every file as prompts
        if reason:
            return f"line {line}: {reason}"
        missing = [f for f in required if f not in _row_fields(example)]
        if missing:
            return f"line {line}: missing field {missing[0]!r} that the exact_match reward compares with"
    return None


def _exists(store: ObjectStore, files: list[_JobFile]) -> FileProblem | None:
    for f in files:
        if f.row is None or not store.exists(f.key):
            return _file_problem(f.param, f"file {f.row.id if f.row is not None else 'of ' + f.param} no longer exists")
        if f.param == "training_file" and f.row.examples < MIN_EXAMPLES:
            return _file_problem(f.param, f"training file has {f.row.examples} examples; at least {MIN_EXAMPLES} are required")
    return None


def _line_problems(spec: JobSpec, files: list[_JobFile], store: ObjectStore) -> FileProblem | None:
    """Steps 2 and 3: what reading the files' lines finds, with no tokenizer."""
    required: tuple[str, ...] = ()
    if spec.method == Method.grpo:
        try:
            required = build_rewards(spec.method_params).reference_fields
        except MethodParamsError as err:  # the API checked the rewards; a spec stored before that may fail here
            return FileProblem(err.code, str(err), err.param)
    for f in files:
        try:
            if spec.method == Method.supervised and f.declared != DataFormat.auto and f.row.format != f.declared.value:
                why = _first_bad_line(store, f.key, f.declared)
            elif required:
                why = _missing_reference(store, f.key, required)
            else:
                continue
        except ObjectNotFound:  # deleted since _exists looked
            why = f"file {f.row.id} no longer exists"
        if why:
            return _file_problem(f.param, why)
    return None


def check_job(session: Session, store: ObjectStore, settings: Settings, job: Job) -> FileProblem | None:
    """The job's first file problem, or None; stores ``estimated_tokens`` (and says so in an event)
    when the base model's tokenizer is here."""
    spec = JobSpec.model_validate(job.spec)
    files = _job_files(session, job, spec)
    uploaded = sum(f.row.examples for f in files if f.param != "validation_file") if all(f.row for f in files) else None
    return (_exists(store, files) or _line_problems(spec, files, store) or _spec_rules(spec, uploaded)
            or _count(store, settings, session, job, spec))


def _spec_rules(spec: JobSpec, training_examples: int | None) -> FileProblem | None:
    problem = spec_problem(spec, training_examples=training_examples)
    return FileProblem(SpecError.failure_code, problem[1], problem[0]) if problem else None


def _count(store: ObjectStore, settings: Settings, session: Session, job: Job, spec: JobSpec) -> FileProblem | None:
    tokenizer_dir = local_tokenizer_dir(job.model, settings.data_dir)
    if tokenizer_dir is None:
        jobs.add_event(session, job, f"No tokenizer for {job.model} on the scheduler (not a built-in model created here, a local folder, or in "
                       "the Hugging Face cache): no token estimate is made before training, and examples that truncation would leave with "
                       "nothing to train on are found by the worker")
        return None
    try:
        counts = count_job_files(store, spec, tokenizer_dir, validation=True)
    except TokenCountError as err:
        return _file_problem(err.param, str(err))
    except Exception as err:  # a tokenizer here that tokenizers/jinja cannot use: the worker loads its own
        log.exception("job %s: counting tokens with %s failed", job.id, tokenizer_dir)
        jobs.add_event(session, job, f"Counting tokens with the tokenizer of {job.model} found here failed ({type(err).__name__}): no token "
                       "estimate is made before training", level="warn")
        return None
    if unusable := unusable_file(spec, counts):
        return _file_problem(*unusable)
    if problem := _spec_rules(spec, sum(c.stats.usable for c in counts if c.param != "validation_file")):
        return problem
    job.estimated_tokens = job_tokens(spec, counts)
    jobs.add_event(session, job, f"Estimated trained tokens: {job.estimated_tokens:,} (all epochs)", data={"estimated_tokens": job.estimated_tokens})
    return None
