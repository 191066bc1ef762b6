"""The refusal messages every framework adapter hands the model (sudo_queue/toolcall.py)."""

from __future__ import annotations

from datetime import date
from typing import Any

from sudo_queue.errors import GateUnavailable, RequestDenied, WaitTimeout
from sudo_queue.models import Decision, Status
from sudo_queue.toolcall import Refusal, check_call


class StubGate:
    """Answers gate.request with a fixed outcome and records the args it was asked about."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.asked: list[Any] = []

    async def request(self, resource: str, action: str, args: Any, **_: Any) -> Decision:
        self.asked.append(args)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome  # type: ignore[no-any-return]


def decision(status: Status, **fields: Any) -> Decision:
    return Decision(request_id="r1", status=status, args_digest="d", **fields)


async def check(outcome: Any, args: Any = None) -> tuple[Decision | Refusal, StubGate]:
    gate = StubGate(outcome)
    result = await check_call(gate, "stripe", "charge", args or {"a": 1}, tool="charge_card")  # type: ignore[arg-type]
    return result, gate


async def test_granted_call_returns_the_decision() -> None:
    """A granted call gets its Decision back, so the adapter runs the tool."""
    granted = decision(Status.APPROVED, decided_by="alice")
    result, _ = await check(granted)
    assert result == granted


async def test_rejection_names_who_the_rule_and_the_reason() -> None:
    """A rejection tells the model who rejected, under which rule, why, and not to retry."""
    denied = decision(Status.REJECTED, decided_by="bob", rule="big-charges", reason="flagged")
    result, _ = await check(RequestDenied(denied))
    assert isinstance(result, Refusal)
    assert result.decision == denied
    assert result.message == (
        "Not run: the call stripe.charge (tool 'charge_card') was rejected by bob "
        "(rule 'big-charges'): flagged. Do not retry it; tell the user. [request r1]"
    )


async def test_timeout_says_the_request_is_still_open() -> None:
    """No decision in time: the model hears the call did not run and still awaits approval."""
    result, _ = await check(WaitTimeout("r2", 30))
    assert isinstance(result, Refusal)
    assert "nobody decided the call stripe.charge (tool 'charge_card') within 30s" in (
        result.message
    )
    assert "stays open" in result.message
    assert result.request_id == "r2"


async def test_gate_unavailable_fails_closed_with_a_message() -> None:
    """Redis down: the tool does not run and the model is told why, without internals."""
    result, _ = await check(GateUnavailable("could not reach redis://:secret@host"))
    assert isinstance(result, Refusal)
    assert "approval service is unavailable" in result.message
    assert "secret" not in result.message


async def test_framework_values_are_sent_as_plain_json() -> None:
    """Validated arguments such as dates reach the gate as JSON strings, not Python objects."""
    _, gate = await check(decision(Status.ALLOWED), {"day": date(2026, 1, 2), "n": 3})
    assert gate.asked == [{"day": "2026-01-02", "n": 3}]
