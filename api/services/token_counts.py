"""Counting a job's tokens inside a request (the estimate, job creation) with the trainer's own
tokenization (``gpu_worker.tokencount``, no torch), where that is cheap: the base model's tokenizer is
on this machine and the job's files are small. A file the worker would refuse for what only the count
shows (no example left to train on) is then a 400 naming it; otherwise the scheduler finds it before
the job is queued (``scheduler.file_checks``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from api.errors import InvalidRequest
from api.settings import ApiSettings
from gpu_worker.contract import JobSpec
from gpu_worker.storage import ObjectStore
from gpu_worker.tokencount import TokenCountError, count_job_files, job_tokens, local_tokenizer_dir, unusable_file
from scheduler.models import File

log = logging.getLogger("api.token_counts")

# The most file bytes counted inside a request: counting ran at 1.2 MB/s on a loaded 2-core machine
# (20,000 chat examples, 11 MB, 9.0 s), so 8 MiB answers within ~7 s; larger jobs are not counted here.
COUNT_MAX_BYTES = 8 << 20


def _file_param(param: str) -> str:
    """The request field naming a file that tokencount names by its job field."""
    return f"data.{param}.file" if param.startswith("extra_training_files[") else param


def count_in_request(store: ObjectStore, settings: ApiSettings, spec: JobSpec, files: Iterable[File | None]) -> int | None:
    """Tokens the job processes over all epochs, or None when counting here is not cheap; a file the
    worker would refuse (a bad line, no usable example) is a 400 naming its request field."""
    tokenizer_dir = local_tokenizer_dir(spec.base_model, settings.data_dir)
    if tokenizer_dir is None or sum(f.bytes for f in files if f is not None) > COUNT_MAX_BYTES:
        return None
    try:
        counts = count_job_files(store, spec, tokenizer_dir, validation=True)
    except TokenCountError as err:
        raise InvalidRequest(f"Invalid file: {err}.", param=_file_param(err.param), code="invalid_file") from None
    except Exception:  # a tokenizer here that tokenizers/jinja cannot use: not the caller's fault, and not counted
        log.exception("counting tokens with %s failed; the job is not counted here", tokenizer_dir)
        return None
    if unusable := unusable_file(spec, counts):
        param, message = unusable
        raise InvalidRequest(f"Invalid file: {param}: {message}.", param=_file_param(param), code="invalid_file")
    return job_tokens(spec, counts, trained=False)
