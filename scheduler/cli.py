"""``tuneforge``: one command line for every deployable.

    tuneforge up         the whole platform on embedded defaults, in one process group
    tuneforge demo       the quick start: fine-tune the built-in model and chat with it
    tuneforge api        the REST API                       (python -m api)
    tuneforge serve      the OpenAI-compatible gateway      (python -m serving)
    tuneforge engine     the built-in inference engine      (python -m gpu_worker.engine)
    tuneforge scheduler  the scheduler loop (embedded: with its in-process queue and worker)
    tuneforge worker     a Celery worker agent for one GPU queue (production)
    tuneforge run-job    claim and run one job, then exit (the pod of a Kubernetes Job)
    tuneforge migrate    upgrade the database schema
    tuneforge create-key an API key for an organization

Configuration comes from ``TUNEFORGE_*`` environment variables (docs/configuration.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from scheduler.settings import Settings, get_settings


def _configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("TUNEFORGE_LOG_LEVEL", "INFO"),
        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}',
        stream=sys.stderr,
    )


def _exec_module(module: str, argv: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_scheduler(args) -> None:
    from scheduler import loop
    from scheduler.migrate import upgrade

    settings = get_settings()
    stop = _stop_event()
    if settings.embedded:
        from scheduler.agent import Agent
        from scheduler.dispatch import InProcessDispatcher

        upgrade(settings.database_url)
        dispatcher = InProcessDispatcher()
        agent = Agent(settings)

        def consume() -> None:
            import queue

            while not stop.is_set():
                try:
                    agent.offer(dispatcher.queue.get(timeout=0.5))
                except queue.Empty:
                    pass

        threading.Thread(target=consume, name="in-process-worker", daemon=True).start()
        logging.getLogger("tuneforge.scheduler").info("scheduler running with an in-process queue and worker")
        loop.run_forever(settings, dispatcher, stop)
        agent.shutdown()
    elif settings.scheduler_backend == "kube":
        from scheduler.kube import KubeBackend, KubeDispatcher, KubeSettings, batch_api, reconcile

        backend = KubeBackend(batch_api(), KubeSettings())
        loop.run_forever(settings, KubeDispatcher(backend, settings.database_url), stop, interval=1.0, extra=lambda: reconcile(backend, settings.database_url))
    else:
        from scheduler.celery_app import make_celery
        from scheduler.dispatch import CeleryDispatcher

        loop.run_forever(settings, CeleryDispatcher(make_celery(settings)), stop, interval=1.0)


def cmd_run_job(args) -> None:
    """One job in this process (a Kubernetes Job's pod): claim it, train it, report, exit."""
    from scheduler.agent import Agent

    settings = get_settings()
    agent = Agent(settings)
    if not agent.offer(args.job_id):
        print(f"job {args.job_id} is not queued (already taken, finished or cancelled): nothing to do")
        return
    stop = _stop_event()
    while not agent.wait_idle(timeout=1.0):
        if stop.is_set():  # pod eviction: checkpoint and hand the job back to the queue
            agent.shutdown()


def cmd_worker(args) -> None:
    from scheduler.agent import Agent
    from scheduler.celery_app import make_celery, set_agent
    from scheduler.routing import SINGLE_GPU_QUEUE

    settings = get_settings()
    if settings.embedded:
        sys.exit("tuneforge worker consumes a Celery queue: set TUNEFORGE_BROKER_URL (embedded mode runs its worker inside `tuneforge scheduler`)")
    agent = Agent(settings)
    set_agent(agent)
    app = make_celery(settings)
    app.worker_main(["worker", "-P", "solo", "-c", "1", "-Q", args.queue or SINGLE_GPU_QUEUE, "--loglevel", "INFO", "--without-gossip", "--without-mingle", "-n", f"tuneforge-{agent.owner}"])
    agent.shutdown()


def cmd_up(args) -> None:
    from scheduler.platform import Platform

    settings = _settings_for(args)
    platform = Platform(settings, host=args.host, port=args.port)
    stop = _stop_event()
    platform.start()
    print(f"Tuneforge is up: {platform.api_url}/v1  (data in {settings.data_dir}; Ctrl-C stops)", flush=True)
    try:
        while not stop.wait(1.0):
            platform.check_alive()
    finally:
        platform.stop()


def _settings_for(args) -> Settings:
    if args.data_dir:
        os.environ["TUNEFORGE_DATA_DIR"] = str(Path(args.data_dir).resolve())
    get_settings.cache_clear()
    return get_settings()


def cmd_migrate(args) -> None:
    from scheduler.migrate import upgrade

    upgrade(get_settings().database_url)
    print("database is at the latest schema")


def _org_name(value: str) -> str:
    from scheduler.tenancy import check_org_name

    try:
        return check_org_name(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_create_key(args) -> None:
    from scheduler.db import session_scope
    from scheduler.migrate import upgrade
    from scheduler.models import Role
    from scheduler.tenancy import create_api_key, get_or_create_org

    settings = get_settings()
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        org = get_or_create_org(session, args.org)
        _, key = create_api_key(session, org, args.name, Role(args.role))
    print(key)


def cmd_demo(args) -> None:
    from scheduler.demo import run_demo

    logging.getLogger().setLevel(logging.WARNING)  # the demo talks through its own console output

    sys.exit(run_demo(_settings_for(args), port=args.port))


def main(argv: list[str] | None = None) -> None:
    _configure_logging()
    parser = argparse.ArgumentParser(prog="tuneforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole platform on embedded defaults")
    demo = sub.add_parser("demo", help="fine-tune the built-in model on a small task and chat with it")
    for p in (up, demo):
        p.add_argument("--port", type=int, default=8000, help="API port; the gateway and engine take the next two")
        p.add_argument("--data-dir", help="where the database, objects and models live (default ./.tuneforge)")
    up.add_argument("--host", default="127.0.0.1")
    for name in ("api", "serve", "engine"):
        sub.add_parser(name, help=f"run the {name} deployable (arguments pass through)", add_help=False)
    sub.add_parser("scheduler", help="run the scheduler loop")
    worker = sub.add_parser("worker", help="run a Celery worker agent")
    worker.add_argument("--queue", help="the GPU-class queue to consume")
    run_job = sub.add_parser("run-job", help="claim and run one job, then exit (a Kubernetes Job's pod)")
    run_job.add_argument("--job-id", required=True)
    sub.add_parser("migrate", help="upgrade the database schema")
    key = sub.add_parser("create-key", help="create an API key (printed once)")
    key.add_argument("--org", default="default", type=_org_name, help="its name (created if new)")
    key.add_argument("--name", default="cli")
    key.add_argument("--role", default="admin", choices=["admin", "member", "viewer"])

    argv = sys.argv[1:] if argv is None else argv
    passthrough = {"api": "api", "serve": "serving", "engine": "gpu_worker.engine"}
    if argv and argv[0] in passthrough:
        _exec_module(passthrough[argv[0]], argv[1:])
    args = parser.parse_args(argv)
    handlers = {"up": cmd_up, "demo": cmd_demo, "scheduler": cmd_scheduler, "worker": cmd_worker, "migrate": cmd_migrate, "run-job": cmd_run_job, "create-key": cmd_create_key}
    handlers[args.command](args)
