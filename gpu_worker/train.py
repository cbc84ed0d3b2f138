"""The trainer process: ``python -m gpu_worker.train``, one job per process.

Protocol with the supervising worker agent:

- stdin: the first line is the ``JobSpec`` as JSON. Nothing else is expected after it, but stdin stays
  open for the whole run: end-of-file means the agent died, and the trainer exits at once (code 70)
  without writing anything, since the job's lease will lapse and another worker will resume it from
  its last checkpoint.
- stdout: only ``JobEvent`` JSON lines (``contract.dump_event``), one per event, flushed each time.
  Anything a library prints is redirected to stderr so it can never corrupt the stream.
- stderr: human-readable logs. The trainer's own warnings (``gpu_worker``'s: an ``offload`` host budget
  reached, weights kept in device memory, a kernel not taken) also become warn-level LogEvents.
- environment: ``TUNEFORGE_STORAGE_URL`` (the object store, required) and ``TUNEFORGE_DATA_DIR`` (for
  built-in models; default ``./.tuneforge``).
- CPU threads (no GPU): ``TUNEFORGE_TORCH_THREADS``, else ``OMP_NUM_THREADS``, else one core fewer
  than the machine has: the API, scheduler and engine share it, and torch threads fighting them for
  cores thrash (the demo's training took 190 s with 2 threads on a loaded 2-core machine, 24 s with 1).
- SIGTERM (cancel or preemption) or SIGINT: the current step is finished or abandoned, a checkpoint
  is saved, CheckpointEvent and StoppedEvent are written, and the process exits 0.
- a spec with ``runtime.distributed`` (the scheduler planned several GPUs): this process starts the
  node's DeepSpeed ranks under torchrun and passes rank 0's events on (``gpu_worker.distributed``);
  the protocol above is unchanged.

Exit codes:
    0   the last event is CompletedEvent or StoppedEvent
    1   the job failed; the last event is FailedEvent (``invalid_training_file``,
        ``invalid_validation_file``, ``model_load_failed``, ``checkpoint_load_failed``,
        ``invalid_adapter_config``, ``out_of_memory``, ``internal_error``)
    2   the trainer was started wrongly (unreadable spec: FailedEvent ``invalid_job_spec``;
        no storage URL: FailedEvent ``worker_misconfigured``)
    70  the supervising agent went away (stdin closed, or stdout's reader gone); nothing is written
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from pydantic import ValidationError

from gpu_worker.allocator import configure_cuda_allocator
from gpu_worker.contract import FailedEvent, JobEvent, JobSpec, LogEvent, dump_event

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ORPHANED = 0, 1, 2, 70
_MAX_SPEC_BYTES = 1 << 20

log = logging.getLogger("gpu_worker.train")


class EventStream:
    """Writes JobEvents as JSON lines to a private duplicate of the original stdout."""

    def __init__(self, fd: int):
        self._fd = fd
        self._lock = threading.Lock()

    def emit(self, event: JobEvent) -> None:
        data = (dump_event(event) + "\n").encode()
        with self._lock:
            try:
                while data:
                    data = data[os.write(self._fd, data) :]
            except (BrokenPipeError, OSError):
                os._exit(EXIT_ORPHANED)  # nobody reads our events: the agent is gone


def _read_first_line(fd: int) -> bytes | None:
    """The bytes of stdin's first line, without touching anything after it (the watchdog reads on);
    None at end-of-file before a newline."""
    buf = b""
    while b"\n" not in buf:
        chunk = os.read(fd, 1)  # one byte at a time: this runs once, for a few kilobytes
        if not chunk:
            return buf or None
        buf += chunk
        if len(buf) > _MAX_SPEC_BYTES:
            break
    return buf.split(b"\n", 1)[0]


def _watch_stdin(fd: int) -> None:
    """Exit the process the moment stdin reaches end-of-file (the supervising agent died)."""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            os._exit(EXIT_ORPHANED)


@contextlib.contextmanager
def warnings_as_events(emit):
    """Within: a warning raised from ``gpu_worker``'s own files is shown as before and also emitted as a
    warn-level LogEvent (its first line), so the job's events say what the run chose (Python shows each
    warning once per place by default)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    show = warnings.showwarning

    def show_and_emit(message, category, filename, lineno, file=None, line=None):
        show(message, category, filename, lineno, file, line)
        if os.path.abspath(filename).startswith(package):
            emit(LogEvent(level="warn", message=str(message).splitlines()[0]))

    warnings.showwarning = show_and_emit
    try:
        yield
    finally:
        warnings.showwarning = show


def _failure(err: BaseException) -> FailedEvent:
    """Map a known error to its FailedEvent code; anything else is an internal error."""
    from gpu_worker.checkpoint import CheckpointError
    from gpu_worker.data import DataError
    from gpu_worker.loading import ModelLoadError
    from gpu_worker.recipes.model_setup import AdapterConfigError

    if isinstance(err, DataError):
        code = "invalid_validation_file" if err.param == "validation_file" else "invalid_training_file"
        return FailedEvent(code=code, message=str(err), param=err.param)
    if isinstance(err, ModelLoadError):
        return FailedEvent(code="model_load_failed", message=str(err), param="model")
    if isinstance(err, CheckpointError):
        return FailedEvent(code="checkpoint_load_failed", message=str(err))
    if isinstance(err, AdapterConfigError):
        return FailedEvent(code="invalid_adapter_config", message=str(err), param="adapter")
    if getattr(err, "failure_code", None):  # errors that name their own code (device, method params, eval gate)
        return FailedEvent(code=err.failure_code, message=str(err), param=getattr(err, "param", None))
    if type(err).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return FailedEvent(code="out_of_memory", message=f"out of GPU memory: {err}".splitlines()[0])
    return FailedEvent(code="internal_error", message=f"internal error in the trainer ({type(err).__name__})")


def _set_cpu_threads() -> None:
    import torch

    if torch.cuda.is_available():
        return
    wanted = os.environ.get("TUNEFORGE_TORCH_THREADS") or os.environ.get("OMP_NUM_THREADS")
    threads = int(wanted) if wanted and wanted.isdigit() and int(wanted) > 0 else max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    log.info("CPU training with %d torch thread(s)", threads)


def main() -> int:
    # Keep the real stdout for events only; whatever else writes to fd 1 lands on stderr.
    events = EventStream(os.dup(1))
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    line = _read_first_line(0)
    if line is None:
        return EXIT_ORPHANED
    try:
        spec = JobSpec.model_validate_json(line)
    except ValidationError as err:
        events.emit(FailedEvent(code="invalid_job_spec", message=f"unreadable job spec: {err.errors()[0]['msg'] if err.errors() else err}"))
        return EXIT_USAGE
    threading.Thread(target=_watch_stdin, args=(0,), name="stdin-watchdog", daemon=True).start()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: (log.info("signal %s: stopping after this step", signum), stop.set()))

    storage_url = os.environ.get("TUNEFORGE_STORAGE_URL")
    if not storage_url:
        events.emit(FailedEvent(code="worker_misconfigured", message="TUNEFORGE_STORAGE_URL is not set"))
        return EXIT_USAGE
    data_dir = Path(os.environ.get("TUNEFORGE_DATA_DIR", "./.tuneforge"))
    log.info("job %s: %s on %s", spec.job_id, spec.method.value, spec.base_model)
    if spec.runtime.distributed is not None:  # several GPUs: this process supervises the node's ranks
        from gpu_worker.distributed import supervise

        try:
            return supervise(spec, events.emit, stop.is_set)
        except ValueError as err:  # a launch the environment cannot make (no master address)
            events.emit(FailedEvent(code="worker_misconfigured", message=str(err)))
            return EXIT_USAGE
    # one GPU (the DeepSpeed ranks above keep torch's defaults): before anything allocates on it
    configure_cuda_allocator()
    try:
        from gpu_worker.recipes import RunContext, recipe_for
        from gpu_worker.storage import open_store

        _set_cpu_threads()

        ctx = RunContext(store=open_store(storage_url), data_dir=data_dir, emit=events.emit, should_stop=stop.is_set)
        with warnings_as_events(events.emit):
            recipe_for(spec.method)(spec, ctx)
    except Exception as err:
        failed = _failure(err)
        # An unexpected error keeps its traceback in the logs; the event carries no internals.
        (log.error if failed.code != "internal_error" else log.exception)("job %s failed: %s", spec.job_id, err)
        events.emit(failed)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
