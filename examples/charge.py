"""Ask the gate before charging a card; prints the request id, then the Decision.

    python examples/charge.py 5000 --key order-123

With `sudo-queue worker` running and config/policy.yaml, 5000 needs a human:
run the `sudo-queue approve ...` line this prints, and the agent resumes at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from sudo_queue import Gate, RequestDenied, WaitTimeout
from sudo_queue.logs import configure_logging


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("amount", type=int)
    parser.add_argument("--key", help="idempotency key: rerun with it to re-attach")
    parser.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args()
    url = os.environ.get("SUDO_QUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
    configure_logging(os.environ.get("SUDO_QUEUE_LOG_FORMAT", "auto"), "warning")

    async with Gate.connect(url, agent="billing-bot") as gate:
        request_id = await gate.submit("stripe", "charge", {"amount": args.amount}, key=args.key)
        print(f"request {request_id}: waiting for a decision", flush=True)
        print(f"  approve with: sudo-queue approve {request_id} --as alice", flush=True)
        try:
            decision = await gate.wait(request_id, timeout=args.timeout)
        except RequestDenied as exc:
            print(f"not charged: {exc.decision}", flush=True)
            return 1
        except WaitTimeout as exc:
            print(f"still waiting: {exc}", flush=True)
            return 2
        print(f"charged {args.amount}: {decision}", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
