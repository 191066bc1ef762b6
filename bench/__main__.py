"""python -m bench latency [--count N]"""

from __future__ import annotations

import argparse

from . import latency


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("latency", help="allowed request round trip")
    p.add_argument("--count", type=int, default=500)
    args = parser.parse_args()
    if args.bench == "latency":
        latency.run(args.count)


main()
