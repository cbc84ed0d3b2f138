"""What a job's inputs must be at creation, checked before anything is written: its base model (one of the
catalog the caller's org is entitled to), its files (the caller's,
purpose ``fine-tune``, in a format the method trains on and, when declared, one they can be read in) and
its exports (a GGUF only of a base the exporter supports), and the rules joining several of the spec's
fields (``gpu_worker.spec_rules``: an option meaningless for the method, or one acting on validation data
the job cannot have). Each refusal is a 400 naming the field."""

from __future__ import annotations

from contextlib import closing

from sqlalchemy.orm import Session

from api.errors import InvalidRequest
from api.services.scoping import owned
from gpu_worker.contract import METHOD_FORMATS, DataFormat, ExportOptions, JobSpec, Method
from gpu_worker.gguf_support import gguf_problem
from gpu_worker.spec_rules import spec_problem
from gpu_worker.storage import ObjectNotFound, ObjectStore, iter_lines
from gpu_worker.validation import FileValidator, check_format_for_method
from api.settings import ApiSettings
from scheduler.entitlements import entitled_bases
from scheduler.estimator import UnknownModel, read_model_facts
from scheduler.models import File
from scheduler.tenancy import Principal

FINE_TUNE_PURPOSE = "fine-tune"


def check_base_model(session: Session, settings: ApiSettings, principal: Principal, model: str) -> None:
    """A base model of the catalog the caller's org is entitled to (scheduler.entitlements: a model it
    could not call once tuned is not offered for tuning either); the refusal lists the ones it may tune."""
    available = entitled_bases(session, principal.org_id, settings.base_models, settings.default_base_models)
    if model not in available:
        raise InvalidRequest(
            f"Model {model!r} is not available for fine-tuning. Available: {', '.join(available) or 'none'}.",
            param="model",
            code="model_not_available",
        )


def training_input(session: Session, principal: Principal, file_id: str, param: str) -> File:
    """A file the job may train on. Another org's id reads exactly like one that never existed."""
    row = owned(session, File, file_id, principal)
    if row is None:
        raise InvalidRequest(f"Invalid file ID {file_id!r}: no such file.", param=param, code="invalid_file")
    if row.purpose != FINE_TUNE_PURPOSE:
        raise InvalidRequest(
            f"File {file_id} has purpose {row.purpose!r}; fine-tuning needs a file uploaded with purpose 'fine-tune'.",
            param=param,
            code="invalid_file",
        )
    return row


def _check_detected(row: File, method: Method, param: str) -> None:
    """A file whose detected format the method cannot train on is refused before anything is written."""
    if row.format and DataFormat(row.format) not in METHOD_FORMATS[method]:
        accepted = ", ".join(sorted(f.value for f in METHOD_FORMATS[method]))
        raise InvalidRequest(
            f"File {row.id} is in {row.format!r} format; method {method.value!r} trains on: {accepted}.",
            param=param,
            code="invalid_file",
        )


def _first_example_problem(store: ObjectStore, key: str, declared: DataFormat) -> str | None:
    """Why the file's first example cannot be read in the declared format (as the worker reads it), or
    None. One line, not the whole file: a file's lines share their shape, and the scheduler reads every
    line before the job is queued (``scheduler.file_checks``)."""
    validator = FileValidator(min_examples=0, format=declared)
    try:
        with closing(iter_lines(store, key)) as lines:
            for raw in lines:
                example = validator.feed(raw)
                if validator.error_count:
                    return f"line {validator.line}: {validator.finish().errors[0].reason}"
                if example is not None:
                    return None
    except ObjectNotFound:  # the scheduler fails the job for its missing file
        return None
    return None


def check_file_format(store: ObjectStore, row: File, method: Method, declared: DataFormat, param: str, format_param: str) -> None:
    """The file's format, declared (``format_param``) or detected, is one the method trains on, and a
    declared format is one the file can be read in. Only the supervised recipe reads a file in its
    declared format; the others read their method's format whatever is declared (gpu_worker.recipes),
    so for them the detected format is what must fit."""
    if declared != DataFormat.auto and (why := check_format_for_method(declared, method)) is not None:
        raise InvalidRequest(f"Invalid value for '{format_param}': {why}.", param=format_param, code="invalid_value")
    if method != Method.supervised or declared == DataFormat.auto:
        _check_detected(row, method, param)
    elif row.format and row.format != declared.value and (problem := _first_example_problem(store, row.storage_key, declared)):
        raise InvalidRequest(
            f"Invalid value for '{format_param}': file {row.id} ({param}) is in {row.format!r} format and cannot be read as "
            f"{declared.value}: {problem}.",
            param=format_param, code="invalid_value",
        )


def check_export(base_model: str, export: ExportOptions) -> None:
    """A GGUF export of a base whose architecture the exporter does not support is refused (the job
    succeeded with a warning and no GGUF). An unknown base (no config.json here) keeps that path."""
    if not export.gguf:
        return
    try:
        facts = read_model_facts(base_model)
    except UnknownModel:
        return
    if (problem := gguf_problem({"model_type": facts.architecture})) is not None:
        raise InvalidRequest(f"Invalid value for 'export.gguf': {problem} (a merged model, export.merged, is written for any base).",
                             param="export.gguf", code="unsupported_export")


def check_spec_rules(spec: JobSpec, training_files: list[File]) -> None:
    """The worker's own rules across the spec's fields (``spec_rules.spec_problem``, which it would fail
    the job with as ``invalid_job_spec``), refused now. ``training_files``: the training file and the
    extra ones, whose examples as counted at upload decide whether the automatic held-out split can
    happen. A job that dedupes (``data.dedupe``, the default) keeps none of a file's exact repeats (the
    same JSON line: the same tokens), which the upload counted; repeats across files, or the same
    example in two formats, are known only once tokenized (the scheduler checks again with its count)."""
    def kept(f: File) -> int:
        repeats = (f.duplicates or {}).get("exact", 0) if spec.data.dedupe else 0
        return f.examples - repeats

    problem = spec_problem(spec, training_examples=sum(kept(f) for f in training_files))
    if problem is not None:
        param, message = problem
        raise InvalidRequest(f"Invalid value for '{param}': {message}.", param=param, code="invalid_value")
