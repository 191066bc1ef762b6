"""policy: `Policy.evaluate` with 100 rules, in process (no Redis, no worker).

The policy has 99 rules over 25 resources and 4 actions, every third with a CEL condition, and a
catch-all with a condition last. Requests hit the first rule, a conditional rule in the middle,
the end of the list and nothing at all (the default: every rule looked at). A last row, not the
goal's case, shows the cost when every one of the 100 rules matches by name and its condition
has to run: the cost grows with the conditions that run, not with the rules listed.
"""

from __future__ import annotations

import time
from typing import Any

from .common import Result, goal, header

ACTIONS = ("read", "write", "delete", "charge")
DECISIONS = ("allow", "deny", "require_approval")


def policy_text(rules: int = 100) -> str:
    lines = ["version: 1", "default: deny", "rules:"]
    for i in range(rules - 1):
        lines += [
            f"  - name: rule-{i:02d}",
            f"    resource: svc{i // 4:02d}",
            f"    action: {ACTIONS[i % 4]}",
        ]
        if i % 3 == 0:
            lines.append(f'    when: "args.amount > {i}"')
        lines.append(f"    decision: {DECISIONS[i % 3]}")
    lines += [
        "  - name: catch-all",
        '    resource: "*"',
        '    when: "has(args.amount) && args.amount < 0"',
        "    decision: deny",
    ]
    return "\n".join(lines) + "\n"


def all_conditions_text(rules: int = 100) -> str:
    lines = ["version: 1", "default: deny", "rules:"]
    for i in range(rules):
        lines += [f"  - name: rule-{i:02d}", f'    when: "args.amount > {1000 + i}"']
        lines.append("    decision: allow")
    return "\n".join(lines) + "\n"


CASES: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("first rule matches", "svc00", "read", {"amount": 5}),
    ("a condition decides, mid-list", "svc12", "charge", {"amount": 100}),
    ("last rule matches", "svc24", "charge", {"amount": -1}),
    ("no rule matches (default)", "other", "read", {"amount": 5}),
)


def _time(policy: Any, resource: str, action: str, args: dict[str, Any], count: int) -> Result:
    samples: list[float] = []
    clock = time.perf_counter
    for _ in range(count // 10):  # warm-up
        policy.evaluate(agent="bench", resource=resource, action=action, args=args, context={})
    started = clock()
    for _ in range(count):
        t0 = clock()
        policy.evaluate(agent="bench", resource=resource, action=action, args=args, context={})
        samples.append(clock() - t0)
    return Result(name="", samples_s=samples, elapsed_s=clock() - started, operations=count)


def _table(rows: list[Result]) -> str:
    width = max(len(r.name) for r in rows) + 2
    cols = ("n", "p50 us", "p90 us", "p99 us", "max us", "evals/s")
    lines = [f"{'':<{width}}" + "".join(f"{c:>11}" for c in cols)]
    for r in rows:
        p = r.p
        cells = [str(len(r.samples_s))] + [f"{p[k] * 1000:.1f}" for k in ("p50", "p90", "p99")]
        cells += [f"{p['max'] * 1000:.0f}", f"{r.rate:,.0f}"]
        lines.append(f"{r.name:<{width}}" + "".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)


def run(count: int = 20_000) -> list[Result]:
    """Time each case; print the table; return the results (the goal's case first)."""
    from sudo_queue.policy import Policy

    print(header("policy", "Policy.evaluate with 100 rules, in process"))
    policy = Policy.from_yaml(policy_text(), source="bench-100-rules")
    rows = []
    for name, resource, action, args in CASES:
        row = _time(policy, resource, action, args, count)
        decided = policy.evaluate(
            agent="bench", resource=resource, action=action, args=args, context={}
        )
        row.name = f"{name}: {decided.rule}"
        rows.append(row)
    every = [sample for row in rows for sample in row.samples_s]
    overall = Result(
        name="all four cases",
        samples_s=every,
        elapsed_s=sum(r.elapsed_s for r in rows),
        operations=len(every),
    )
    worst = _time(
        Policy.from_yaml(all_conditions_text(), source="bench-100-conditions"),
        "any",
        "any",
        {"amount": 5},
        max(count // 10, 100),
    )
    worst.name = "every rule's condition runs"
    print(_table([*rows, overall, worst]))
    print("baselines: not applicable (no Redis, no worker, no polling on this path)")
    print(goal("policy evaluation p50, 100 rules", overall.p["p50"] * 1000, 50, "us"))
    print(goal("policy evaluation p99, 100 rules", overall.p["p99"] * 1000, 50, "us"))
    return [overall, *rows, worst]
