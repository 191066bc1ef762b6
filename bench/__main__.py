"""Benchmarks of sudo-queue against the baselines a user would otherwise pick.

    python -m bench latency | resume | throughput | waiters | policy | all  [--quick]

Each starts its own redis-server on a free port of 127.0.0.1 and its own worker processes, runs
a bounded load, prints a table (p50, p90, p99, max, rate, Redis commands per second, memory) and
the ratios to the baselines measured in the same invocation. `--quick` runs tiny loads: it checks
that a benchmark works, its figures mean little.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import latency, policy, resume, throughput, waiters
from .common import BenchError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    quick = argparse.ArgumentParser(add_help=False)
    quick.add_argument("--quick", action="store_true", help="tiny loads (a smoke test)")

    p = sub.add_parser("latency", parents=[quick], help="allowed request round trip")
    p.add_argument("--count", type=int, default=500, help="sequential requests (500)")
    p = sub.add_parser("resume", parents=[quick], help="approval to waiting coroutine returning")
    p.add_argument("--count", type=int, default=300, help="approvals, one at a time (300)")
    p = sub.add_parser("throughput", parents=[quick], help="decisions/s, 200 agents, 2 workers")
    p.add_argument("--agents", type=int, default=200, help="concurrent agents (200)")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each variant (5)")
    p = sub.add_parser("waiters", parents=[quick], help="10,000 waiters in one agent process")
    p.add_argument("--count", type=int, default=10_000, help="waiting requests (10000)")
    p.add_argument(
        "--window",
        type=float,
        default=None,
        help="every quiet window, seconds (default: 120 with the idle worker, 30 without it, "
        "5 for the baseline: each as long as the periodic work it measures)",
    )
    p = sub.add_parser("policy", parents=[quick], help="policy evaluation with 100 rules")
    p.add_argument("--count", type=int, default=20_000, help="evaluations per case (20000)")
    sub.add_parser("all", parents=[quick], help="every benchmark, default sizes")
    args = parser.parse_args(argv)

    started = time.monotonic()
    try:
        if args.bench in ("latency", "all"):
            count = 30 if args.quick else getattr(args, "count", 500)
            latency.run(
                count, baseline_count=2 if args.quick else 8, spread_s=0 if args.quick else 2
            )
        if args.bench in ("resume", "all"):
            count = 20 if args.quick else getattr(args, "count", 300)
            resume.run(count, baseline_count=2 if args.quick else 10)
        if args.bench in ("throughput", "all"):
            agents = 20 if args.quick else getattr(args, "agents", 200)
            seconds = 0.5 if args.quick else getattr(args, "seconds", 5.0)
            throughput.run(agents, seconds, baseline_s=1.0 if args.quick else seconds)
        if args.bench in ("waiters", "all"):
            count = 200 if args.quick else getattr(args, "count", 10_000)
            window = 0.5 if args.quick else getattr(args, "window", None)
            waiters.run(count, window_s=window)
        if args.bench in ("policy", "all"):
            policy.run(500 if args.quick else getattr(args, "count", 20_000))
    except BenchError as exc:
        print(f"benchmark could not run: {exc}", file=sys.stderr)
        return 2
    print(f"\n(took {time.monotonic() - started:.0f} s)")
    return 0


sys.exit(main())
