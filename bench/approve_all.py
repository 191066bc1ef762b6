"""Bulk approval from a separate process, as `sudo-queue approve` or the Slack app would do it.

`python -m bench.approve_all URL AGENT` approves every pending request of AGENT (as "alice") through
`Store.approve`, 8 at a time, and prints one line per approval: `<request id> <time.time() when
the approval was committed>` (taken when Redis answered, so at most one round trip late).
"""

from __future__ import annotations

import asyncio
import sys
import time

from redis.asyncio import Redis

from sudo_queue.models import Status
from sudo_queue.store import Store

# Approvals in flight at once, as a few Slack handlers or CLI loops would send them. Each one is
# a Lua script of a few hundred microseconds (its audit entries are hash-chained in Lua), so 64
# in flight keep Redis saturated and the waiters' own reads queue behind them for seconds; that
# measures Redis, not the wake-up.
CONCURRENCY = 8


async def approve_all(url: str, agent: str) -> list[tuple[str, float]]:
    committed: list[tuple[str, float]] = []
    async with Redis.from_url(url, decode_responses=True) as redis:
        store = Store(redis)
        ids = await store.open_ids(Status.PENDING, limit=1_000_000)
        records = await store.records(ids)
        mine = [r.id for r in records if r.agent == agent]
        queue: asyncio.Queue[str] = asyncio.Queue()
        for request_id in mine:
            queue.put_nowait(request_id)

        async def approver() -> None:
            while not queue.empty():
                request_id = queue.get_nowait()
                result = await store.approve(request_id, actor="alice")
                committed.append((request_id, time.time()))
                if not result.changed:
                    raise SystemExit(f"approving {request_id} changed nothing: {result}")

        await asyncio.gather(*(approver() for _ in range(CONCURRENCY)))
    return committed


def main() -> None:
    committed = asyncio.run(approve_all(sys.argv[1], sys.argv[2]))
    sys.stdout.write("".join(f"{rid} {at:.6f}\n" for rid, at in committed))


if __name__ == "__main__":
    main()
