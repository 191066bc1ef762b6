"""sudo-queue: a human-approval gate for AI-agent tool calls, on Redis."""

from __future__ import annotations

from .errors import (
    GateUnavailable,
    IdempotencyConflict,
    InvalidRequest,
    PolicyError,
    RequestDenied,
    RequestNotFound,
    SudoQueueError,
    WaitTimeout,
)
from .gate import Gate
from .models import Decision, RequestRecord, Status
from .store import Outcome, Store, TransitionResult

__all__ = [
    "Decision",
    "Gate",
    "GateUnavailable",
    "IdempotencyConflict",
    "InvalidRequest",
    "Outcome",
    "PolicyError",
    "RequestDenied",
    "RequestNotFound",
    "RequestRecord",
    "Status",
    "Store",
    "SudoQueueError",
    "TransitionResult",
    "WaitTimeout",
]

__version__ = "0.1.0"
