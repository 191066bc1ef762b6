"""The stock-arq baseline: arq's own Worker, default 0.5 s polling, running our job functions.

`python -m bench.stock_worker POLICY_FILE` (Redis URL from SUDO_QUEUE_REDIS_URL). This is what a
user gets who writes the policy jobs for arq without sudo-queue's event-driven worker: the same
functions, the same JSON jobs, but arq finds each job only at its next poll.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from arq import Worker

from sudo_queue.constants import DEFAULT_REDIS_URL
from sudo_queue.logs import configure_logging
from sudo_queue.workers.policy import PolicyHolder, WorkerConfig, worker_kwargs

from .common import STOCK_POLL_S


def main() -> None:
    configure_logging("json", "warning")
    config = WorkerConfig(
        redis_url=os.environ.get("SUDO_QUEUE_REDIS_URL", DEFAULT_REDIS_URL),
        policy_path=Path(sys.argv[1]),
    )
    kwargs = worker_kwargs(config, PolicyHolder(config.policy_path))
    kwargs.update(poll_delay=STOCK_POLL_S, handle_signals=True)
    Worker(**kwargs).run()


if __name__ == "__main__":
    main()
