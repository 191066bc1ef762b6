"""A test agent process: makes requests and prints one JSON line per outcome.

python -m tests.faults.agent URL --count N [--prefix P] [--amount-mod M] [--timeout S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from sudo_queue import Gate, RequestDenied, SudoQueueError
from sudo_queue.logs import configure_logging


async def one(gate: Gate, index: int, args: argparse.Namespace) -> dict[str, object]:
    kind = index % 3  # 0: allowed, 1: denied, 2: needs approval
    resource, action, payload = {
        0: ("stripe", "charge", {"amount": 10 + index % 40}),
        1: ("postgres", "drop_table", {"table": f"t{index}"}),
        2: ("stripe", "charge", {"amount": 5000 + index}),
    }[kind]
    key = f"{args.prefix}-{index}"
    try:
        decision = await gate.request(resource, action, payload, key=key, timeout=args.timeout)
        status, request_id = decision.status.value, decision.request_id
    except RequestDenied as exc:
        status, request_id = exc.decision.status.value, exc.decision.request_id
    except SudoQueueError as exc:
        status, request_id = f"error:{type(exc).__name__}", ""
    return {"key": key, "status": status, "request_id": request_id}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--prefix", default="agent")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    configure_logging("json", "warning")
    async with Gate.connect(args.url, agent=f"soak-{args.prefix}") as gate:
        print(json.dumps({"ready": True}), flush=True)
        results = await asyncio.gather(*(one(gate, i, args) for i in range(args.count)))
    for result in results:
        sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
