"""Every error sudo-queue raises, under one root.

```
SudoQueueError
├── RequestDenied (also PermissionError)   the call must not run: denied/rejected/expired/cancelled
├── WaitTimeout (also TimeoutError)        this coroutine stopped waiting; the request is still open
├── GateUnavailable                        Redis unreachable, or a malformed record: fail closed
├── IdempotencyConflict                    the same key was used before with different args
├── InvalidRequest (also ValueError)       the request itself is malformed (names, args, context)
├── RequestNotFound (also LookupError)     no request with that id
└── PolicyError (also ValueError)          a policy file that cannot be loaded
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import Decision

__all__ = [
    "GateUnavailable",
    "IdempotencyConflict",
    "InvalidRequest",
    "PolicyError",
    "RequestDenied",
    "RequestNotFound",
    "SudoQueueError",
    "WaitTimeout",
]


class SudoQueueError(Exception):
    """Root of every error sudo-queue raises."""


class RequestDenied(SudoQueueError, PermissionError):
    """The request ended without a grant; `.decision` says how and why."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        who = f" by {decision.decided_by}" if decision.decided_by else ""
        rule = f" (rule {decision.rule!r})" if decision.rule else ""
        why = f": {decision.reason}" if decision.reason else ""
        super().__init__(
            f"request {decision.request_id} was {decision.status.value}{who}{rule}{why}"
        )


class WaitTimeout(SudoQueueError, TimeoutError):
    """This coroutine's wait ran out; the request stays open and can be re-attached later."""

    def __init__(self, request_id: str, timeout: float) -> None:
        self.request_id = request_id
        self.timeout = timeout
        super().__init__(
            f"no decision on request {request_id} within {timeout:g}s; it is still open: "
            f"call gate.wait({request_id!r}) or repeat gate.request(...) with the same key "
            "to re-attach"
        )


class GateUnavailable(SudoQueueError):
    """Redis is unreachable or returned something unusable; nothing was allowed."""


class IdempotencyConflict(SudoQueueError):
    """The agent reused an idempotency key with different args."""

    def __init__(self, agent: str, key: str, request_id: str) -> None:
        self.agent = agent
        self.key = key
        self.request_id = request_id
        super().__init__(
            f"key {key!r} of agent {agent!r} already belongs to request {request_id} with "
            "different args; use a new key for a different call"
        )


class InvalidRequest(SudoQueueError, ValueError):
    """The request is malformed: a name is empty, or args/context are not plain JSON."""


class RequestNotFound(SudoQueueError, LookupError):
    """No request exists with that id (never created, or past its retention)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        super().__init__(
            f"no request {request_id!r}: check the id (`sudo-queue pending` lists open ones); "
            "decided requests are kept for the retention period only"
        )


class PolicyError(SudoQueueError, ValueError):
    """A policy file could not be loaded; the message names the file, the rule and the problem."""
