"""The Celery application: Redis broker, JSON only, one thin task.

The task is a nudge handler: it asks this process's agent to claim the job and returns at once. The
training itself is supervised by the agent outside any task, so the broker never holds (and never
redelivers) hours of work; a redelivered nudge for a job that already moved on does nothing.
"""

from __future__ import annotations

from celery import Celery

from scheduler.dispatch import OFFER_TASK
from scheduler.settings import Settings

# Set by `tuneforge worker` in the worker process before the consumer starts.
_agent = None


def set_agent(agent) -> None:
    global _agent
    _agent = agent


def make_celery(settings: Settings) -> Celery:
    app = Celery("tuneforge", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=False,  # ack on receipt: a nudge is cheap to lose, the scheduler re-sends it
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name=OFFER_TASK, ignore_result=True)
    def offer(job_id: str) -> bool:
        if _agent is None:  # a misconfigured consumer: leave the job for a real worker
            return False
        return _agent.offer(job_id)

    return app
