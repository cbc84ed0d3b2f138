"""Multi-GPU jobs: the launch on each node, and the life of each rank.

``python -m gpu_worker.train`` is still the one process the worker agent starts and talks to (the
job spec on stdin, events on stdout, SIGTERM to stop). When the spec carries a placement
(``spec.runtime.distributed``), it does not train itself: ``supervise`` starts ``torchrun`` with one
rank per GPU of this node, and each rank runs ``python -m gpu_worker.distributed`` (``rank_main``):
the job's recipe (SFT, or the preference loop of DPO/IPO/ORPO/SimPO, KTO and GRPO) on a DeepSpeed
engine (``gpu_worker.recipes.deepspeed_engine``).

- The spec reaches the ranks as a file in a private run folder; stdin (the agent's pipe, which stays
  open) is inherited by every rank, so when the agent dies each rank sees end-of-file and exits,
  exactly like a single-GPU trainer.
- Events: global rank 0 writes JobEvents on its stdout, which ``supervise`` reads, checks and passes
  on; every other rank's stdout goes to stderr. If the ranks end without a final event (a rank
  crashed or was killed), ``supervise`` reports a FailedEvent: the failing rank's own (each rank
  writes ``failed-rank-N.json`` to the run folder) or ``internal_error``.
- Stopping: SIGTERM to the trainer creates ``stop`` in the run folder; every rank polls it before
  each forward pass and the ranks agree (an all-reduce), so all of them finish or abandon the same
  step, take part in the checkpoint and end with a StoppedEvent. ``torchrun`` itself is not signalled:
  it would kill the ranks 30 s later, too soon for a large checkpoint.
- Several nodes: the same command on every node, with ``TUNEFORGE_NODE_RANK`` (or the Indexed Job's
  ``JOB_COMPLETION_INDEX``), ``TUNEFORGE_MASTER_ADDR`` and ``TUNEFORGE_MASTER_PORT`` pointing at node
  0; one node alone uses torchrun's standalone rendezvous on a free local port.
- No GPU (CI): DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``) over gloo, one core per rank.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from gpu_worker.contract import CompletedEvent, Distributed, FailedEvent, JobEvent, JobSpec, StoppedEvent, parse_event

log = logging.getLogger("gpu_worker.distributed")

SPEC_FILE, STOP_FILE = "spec.json", "stop"
_FAILED_FILE = "failed-rank-{rank}.json"
_DEFAULT_MASTER_PORT = 29500


def launch_command(d: Distributed, run_dir: Path, env: dict[str, str] | None = None) -> list[str]:
    """The torchrun command line that starts this node's ranks."""
    env = os.environ if env is None else env
    node_rank = env.get("TUNEFORGE_NODE_RANK") or env.get("JOB_COMPLETION_INDEX") or "0"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={d.gpus_per_node}"]
    if d.nodes == 1:
        cmd += ["--standalone", "--nnodes=1"]
    else:
        master = env.get("TUNEFORGE_MASTER_ADDR")
        if not master:
            raise ValueError(f"a job on {d.nodes} nodes needs TUNEFORGE_MASTER_ADDR (node 0's address)")
        port = env.get("TUNEFORGE_MASTER_PORT") or str(_DEFAULT_MASTER_PORT)
        cmd += [f"--nnodes={d.nodes}", f"--node-rank={int(node_rank)}", f"--master-addr={master}", f"--master-port={int(port)}"]
    return [*cmd, "-m", "gpu_worker.distributed", "--run-dir", str(run_dir)]


def _die_with_parent() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def supervise(spec: JobSpec, emit: Callable[[JobEvent], None], should_stop: Callable[[], bool]) -> int:
    """Run ``spec`` on this node's ranks; pass rank 0's events to ``emit``. Returns the trainer's
    exit code (``gpu_worker.train``'s codes)."""
    import torch

    from gpu_worker.train import EXIT_FAILED, EXIT_OK

    run_dir = Path(tempfile.mkdtemp(prefix=f"tuneforge-{spec.job_id}-"))
    (run_dir / SPEC_FILE).write_text(spec.model_dump_json())
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = launch_command(spec.runtime.distributed, run_dir, env)
    log.info("job %s: %s", spec.job_id, " ".join(cmd))
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, preexec_fn=_die_with_parent)
    stopper = threading.Thread(target=_forward_stop, args=(should_stop, run_dir, proc), daemon=True)
    stopper.start()
    terminal = None
    try:
        for raw in proc.stdout:
            try:
                event = parse_event(raw)
            except ValidationError:
                log.info("[ranks] %s", raw.decode(errors="replace").rstrip())
                continue
            emit(event)
            if isinstance(event, (CompletedEvent, StoppedEvent, FailedEvent)):
                terminal = event
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()  # the ranks' stdin reaches end-of-file: any straggler exits
    try:
        if terminal is None:
            emit(_rank_failure(run_dir) or FailedEvent(code="internal_error", message=f"the training ranks ended without a result (torchrun exit code {code})"))
            return EXIT_FAILED
        return EXIT_FAILED if isinstance(terminal, FailedEvent) else EXIT_OK
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _forward_stop(should_stop: Callable[[], bool], run_dir: Path, proc: subprocess.Popen) -> None:
    while proc.poll() is None:
        if should_stop():
            (run_dir / STOP_FILE).touch()
            return
        threading.Event().wait(0.2)


def _rank_failure(run_dir: Path) -> FailedEvent | None:
    for path in sorted(run_dir.glob("failed-rank-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
        try:
            return FailedEvent.model_validate_json(path.read_text())
        except (OSError, ValidationError):
            continue
    return None


# --- one rank ----------------------------------------------------------------------------------------


def _local_stop(run_dir: Path) -> Callable[[], bool]:
    flag = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # torchrun forwards these when it is itself stopped
        signal.signal(sig, lambda signum, frame: flag.set())
    stop_file = run_dir / STOP_FILE
    return lambda: flag.is_set() or stop_file.exists()


def rank_main(argv: list[str] | None = None) -> int:
    from gpu_worker import train

    args = _parse(argv)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    events = train.EventStream(os.dup(1)) if rank == 0 else None
    os.dup2(2, 1)  # whatever libraries print goes to stderr, on every rank
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    threading.Thread(target=train._watch_stdin, args=(0,), name="stdin-watchdog", daemon=True).start()
    should_stop = _local_stop(args.run_dir)
    emit = events.emit if events is not None else (lambda event: None)
    spec = JobSpec.model_validate_json((args.run_dir / SPEC_FILE).read_text())
    try:
        from gpu_worker.recipes import RunContext, recipe_for
        from gpu_worker.storage import open_store

        device = _init_process_group(local_rank)
        train._set_cpu_threads()
        ctx = RunContext(store=open_store(os.environ["TUNEFORGE_STORAGE_URL"]), data_dir=Path(os.environ.get("TUNEFORGE_DATA_DIR", "./.tuneforge")),
                         emit=emit, should_stop=should_stop, device=device)
        recipe_for(spec.method)(spec, ctx)  # every recipe's loop runs on the engine (train_engine)
    except Exception as err:
        failed = train._failure(err)
        (log.error if failed.code != "internal_error" else log.exception)("job %s failed on rank %d: %s", spec.job_id, rank, err)
        if events is not None:
            events.emit(failed)
        else:
            (args.run_dir / _FAILED_FILE.format(rank=rank)).write_text(failed.model_dump_json())
        return train.EXIT_FAILED
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return train.EXIT_OK


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gpu_worker.distributed", description="one rank of a multi-GPU job (started by torchrun)")
    parser.add_argument("--run-dir", type=Path, required=True)
    return parser.parse_args(argv)


def _init_process_group(local_rank: int) -> str:
    """NCCL on GPUs (one per rank), gloo on the CPU; returns this rank's device."""
    import deepspeed
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    # Collectives wait this long for a slow rank: rank 0 uploads each checkpoint while the others
    # wait at a barrier, and a full model's upload to S3 can outlast DeepSpeed's 30-minute default.
    deepspeed.init_distributed(dist_init_required=True, timeout=timedelta(hours=2))
    return device


if __name__ == "__main__":
    sys.exit(rank_main())
