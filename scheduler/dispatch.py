"""How the scheduler nudges workers. A nudge says "job X is queued on queue Q; take it if you can";
it is never the only record of the work (the job row is), so a lost nudge only costs a re-nudge and a
duplicated one is ignored by the claim.

Production: a Celery task on the queue's Redis list (``tuneforge.jobs.offer``). Embedded: an
in-process queue the local agent reads.
"""

from __future__ import annotations

import queue as _queue
from typing import Protocol

OFFER_TASK = "tuneforge.jobs.offer"


class Dispatcher(Protocol):
    def nudge(self, job_id: str, queue: str) -> None: ...


class InProcessDispatcher:
    """The embedded queue: one FIFO the in-process agent drains."""

    def __init__(self) -> None:
        self.queue: _queue.Queue[str] = _queue.Queue()

    def nudge(self, job_id: str, queue: str) -> None:
        self.queue.put(job_id)


class CeleryDispatcher:
    def __init__(self, app) -> None:
        self.app = app

    def nudge(self, job_id: str, queue: str) -> None:
        # By name: the scheduler never imports the worker's task code.
        self.app.send_task(OFFER_TASK, args=[job_id], queue=queue)
